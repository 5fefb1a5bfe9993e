#!/usr/bin/env bash
# The prepared GPU check of issue 6 (item 5): stream images/s (small CNN, AlexNet@224,
# ResNet-50@224; bf16, channels_last, uint8 preprocessed on the device), the code step at
# n = 1M and Hamming ranking of 1,000 queries against 1M codes, in one run of under 8 minutes
# on one H100/H200. Needs torch, torchvision and numpy only; dadh_dist is taken from this
# checkout (no install). Tables go to stdout and, where $OUT is set, to $OUT/gpu_bench.md and
# $OUT/gpu_bench.json.
#
#   bash bench/gpu_check.sh              # on the GPU machine
#   bash bench/gpu_check.sh --cpu-smoke  # toy sizes on the CPU, to test the script anywhere
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=$(command -v python3 || command -v python)
out="${OUT:-}"

if [[ "${1:-}" != "--cpu-smoke" ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
fi
args=("$@")
if [[ -n "$out" ]]; then
    args+=(--json "$out/gpu_bench.json")
    timeout 470 "$py" bench/gpu_bench.py "${args[@]}" 2>&1 | tee "$out/gpu_bench.md"
else
    timeout 470 "$py" bench/gpu_bench.py "${args[@]}"
fi
