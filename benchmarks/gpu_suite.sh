#!/usr/bin/env bash
# What only a GPU can show, for a machine with one (e.g. a session lent one by the device tool).
#   bash benchmarks/gpu_suite.sh all          # first contact, then everything below, in one run of at most 10 minutes (reduced sizes)
#   bash benchmarks/gpu_suite.sh first        # first-contact checks: GPU tests, odd shapes (+ compute-sanitizer),
#                                             #   reduce-overhead on the tiny Wan, first-call autotune, mass vs torch, flex at N=32k (< 5 min)
#   bash benchmarks/gpu_suite.sh tests        # GPU-only tests: bf16 at real sizes, inductor compile, bf16 gradients
#   bash benchmarks/gpu_suite.sh kernel       # kernel sweep vs SDPA backends and FlexAttention (all shapes)
#   bash benchmarks/gpu_suite.sh e2e          # denoising-step speed of real-size transformers
#   bash benchmarks/gpu_suite.sh calibration  # calibration wall time at Wan2.1-1.3B size (4 prompts, 50 steps)
#   bash benchmarks/gpu_suite.sh backward     # fwd+bwd vs FlexAttention and SDPA at the Wan2.1-1.3B shape
#   bash benchmarks/gpu_suite.sh overhead     # whole sparse layer calls (seam, stock rotation, fused rotary) vs the kernel alone
#   bash benchmarks/gpu_suite.sh static       # compile table for sm_80 .. sm_120 (no GPU needed)
# A machine without diffusers and no network: put wheels in .whl/ (diffusers, transformers, accelerate,
# huggingface_hub, tokenizers, safetensors, regex, tqdm, ...); they are installed to /tmp/site.
# Results land in benchmarks/results/ (with the device name) and are copied to $OUT to come back.
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
rc=0
part() {  # part NAME SECONDS COMMAND...: one step, bounded in time, its log kept
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local status=${PIPESTATUS[0]}
  [ "$status" -eq 0 ] || { echo "== $name: exit $status"; rc=1; }
}
first_contact() {
  part gpu_tests 100 python3 -m pytest -q -m gpu tests/
  part first_contact 160 python3 -m benchmarks.first_contact
}
case "${1:-}" in
  first) first_contact ;;
  all)
    first_contact
    part bench_kernel 120 python3 -m benchmarks.bench_kernel --shapes wan2.1-1.3b-480p cogvideox-5b --densities 1.0 0.3 0.1 --reps 20
    part bench_e2e 90 python3 -m benchmarks.bench_e2e --models wan2.1-1.3b-480p --steps 50 --reps 3
    part bench_calibration 60 python3 -m benchmarks.bench_calibration --prompts 1 --steps 10 --out benchmarks/results/calibration_reduced.json
    part bench_backward 50 python3 -m benchmarks.bench_backward --densities 1.0 0.2 --reps 10
    ;;
  tests) part gpu_tests 600 python3 -m pytest -q -m gpu tests/ ;;
  kernel) part bench_kernel 600 python3 -m benchmarks.bench_kernel ;;
  e2e) part bench_e2e 600 python3 -m benchmarks.bench_e2e --models wan2.1-1.3b-480p hunyuanvideo-720p ;;
  calibration) part bench_calibration 600 python3 -m benchmarks.bench_calibration ;;
  backward) part bench_backward 600 python3 -m benchmarks.bench_backward ;;
  static) part bench_static 600 python3 -m benchmarks.bench_static ;;
  overhead) part bench_overhead_gpu 300 python3 -m benchmarks.bench_overhead --part gpu --shapes wan2.1-1.3b hunyuan-720p --reps 10 ;;
  *) echo "usage: $0 {all|first|tests|kernel|e2e|calibration|backward|static|overhead}" >&2; exit 2 ;;
esac
cp benchmarks/results/*.json benchmarks/results/*.csv benchmarks/results/*.png "$OUT/" 2>/dev/null || true
exit $rc
