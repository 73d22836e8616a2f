import sys

from workers.cli import main

# Guarded: multiprocessing's spawn start method re-imports the main module in children.
if __name__ == "__main__":
    sys.exit(main())
