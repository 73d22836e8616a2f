# Sourced by scripts/demo and scripts/test: create (once) and activate the project's
# virtual environment in .venv, reinstalling only when pyproject.toml changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
EXTRAS="${SLUICE_EXTRAS:-dev}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
STAMP=".venv/.sluice-installed-$(sha1sum pyproject.toml | cut -c1-12)-${EXTRAS//,/_}"
if [ ! -f "$STAMP" ]; then
  python -m pip install -q --upgrade pip >/dev/null
  python -m pip install -q -e ".[${EXTRAS}]"
  touch "$STAMP"
fi
