#!/usr/bin/env bash
# The test suite on a fresh machine: set up, then run pytest (kernels through Triton's interpreter
# when there is no GPU; GPU-only tests skip).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh test
python -m pytest -q "$@"
