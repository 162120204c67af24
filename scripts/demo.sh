#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run the demo on the embedded tiny Wan model.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh plot
sparse-vdit demo --out "${DEMO_OUT:-demo_out}" "$@"
