# Sourced by scripts/demo and scripts/test: create (once) and activate the project's
# virtual environment in .venv, reinstalling only when pyproject.toml or the extras change.
#   SLUICE_EXTRAS   extras to install (default: cpu,dev)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
EXTRAS="${SLUICE_EXTRAS:-cpu,dev}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
STAMP=".venv/.sluice-installed-$(sha1sum pyproject.toml | cut -c1-12)-${EXTRAS//,/_}"
if [ ! -f "$STAMP" ]; then
  python -m pip install -q --upgrade pip >/dev/null
  case ",$EXTRAS," in
    *,train,*)
      # Torch first, pinned: left to the `train` extra's range, pip would resolve the newest
      # release with several GB of CUDA packages; 2.13.0 is the CPU build where one is provided.
      python -m pip install -q "torch==${SLUICE_TORCH_VERSION:-2.13.0}" ;;
  esac
  python -m pip install -q -e ".[${EXTRAS}]"
  touch "$STAMP"
fi
