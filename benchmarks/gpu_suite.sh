#!/usr/bin/env bash
# What only a GPU can show, for a session lent one (device tool), one part per call (10-minute cap):
#   bash benchmarks/gpu_suite.sh tests        # GPU-only tests: bf16 at real sizes, inductor compile
#   bash benchmarks/gpu_suite.sh kernel       # kernel sweep vs SDPA backends and FlexAttention
#   bash benchmarks/gpu_suite.sh e2e          # denoising-step speed of real-size transformers
#   bash benchmarks/gpu_suite.sh calibration  # calibration wall time at Wan2.1-1.3B size
# The device has torch and triton but no diffusers: carry wheels in .whl/ (see the device tool's
# README: diffusers, transformers, huggingface_hub, tokenizers, safetensors, regex, einops, tqdm, ...).
# Results land in benchmarks/results/ and are copied to $OUT to come back.
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
case "${1:-}" in
  tests) python3 -m pytest -q -m gpu tests/ 2>&1 | tee "$OUT/gpu_tests.log" ;;
  kernel) python3 -m benchmarks.bench_kernel 2>&1 | tee "$OUT/bench_kernel.log" ;;
  e2e) python3 -m benchmarks.bench_e2e --models wan2.1-1.3b-480p hunyuanvideo-720p 2>&1 | tee "$OUT/bench_e2e.log" ;;
  calibration) python3 -m benchmarks.bench_calibration 2>&1 | tee "$OUT/bench_calibration.log" ;;
  *) echo "usage: $0 {tests|kernel|e2e|calibration}" >&2; exit 2 ;;
esac
cp benchmarks/results/*.json benchmarks/results/*.csv benchmarks/results/*.png "$OUT/" 2>/dev/null || true
