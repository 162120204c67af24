#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install sparse_vdit into it, torch first.
# Usage: source scripts/setup_env.sh [extras]   e.g. "test" or "plot"
# TORCH_SPEC picks the torch build (default torch==2.13.0; on a CUDA machine you may want e.g. "torch>=2.5").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${SPARSE_VDIT_VENV:-.venv}"
EXTRAS="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch before anything that depends on it, so no dependency pulls a different (multi-GB) build.
if ! python -c "import torch" >/dev/null 2>&1; then
  pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
spec="."
[ -n "$EXTRAS" ] && spec=".[${EXTRAS}]"
if ! pip install -q -e "$spec" >"$VENV/pip-install.log" 2>&1; then
  grep -v "^WARNING: Location" "$VENV/pip-install.log" >&2
  echo "setup_env.sh: installing sparse_vdit failed (log above)" >&2
  exit 1
fi
python -c "import sparse_vdit" # fail loudly if the install did not work
