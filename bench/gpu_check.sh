#!/usr/bin/env bash
# The prepared GPU check, in one run of under 8 minutes on one H100/H200, two parts:
#   1. bench/gpu_bench.py (issue 6 item 5), at most 300 s: stream images/s (small CNN,
#      AlexNet@224, ResNet-50@224; bf16, channels_last, uint8 preprocessed on the device), the
#      code step at n = 1M and Hamming ranking of 1,000 queries against 1M codes.
#   2. bench/gpu_train.py, at most 150 s: the training loop on cuda:0 through an NCCL process
#      group without Ray (fp32, bf16, a resume, the CPU for comparison, stream-parallel W=2).
# The second part runs whatever happened to the first. Needs torch, torchvision, numpy, numba,
# scikit-learn and pyarrow (no Ray); dadh_dist is taken from this checkout (no install). Each
# part's output goes to stdout and, where $OUT is set, to $OUT/<part>.md and $OUT/<part>.json;
# $OUT/gpu_check.md holds the GPU's description and both parts' exit statuses. Exit status: 0
# when both parts passed, 1 otherwise.
#
#   bash bench/gpu_check.sh              # on the GPU machine
#   bash bench/gpu_check.sh --cpu-smoke  # toy sizes on the CPU, to test the script anywhere
set -uo pipefail  # no -e: a failed or timed-out part must not stop the next one
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=$(command -v python3 || command -v python)
out="${OUT:-}"
passed=("$@")
summary=()

note() {  # a line on stdout and in $OUT/gpu_check.md
    echo "$@"
    if [[ -n "$out" ]]; then echo "$@" >>"$out/gpu_check.md"; fi
}

part() {  # part NAME SECONDS: bench/NAME.py under a time limit; its output tee'd into $OUT
    local name=$1 limit=$2 rc start=$SECONDS
    # timeout signals its whole process group, so gpu_train.py's worker processes go too
    if [[ -n "$out" ]]; then
        timeout -k 10 "$limit" "$py" "bench/$name.py" "${passed[@]}" --json "$out/$name.json" \
            2>&1 | tee "$out/$name.md"
        rc=${PIPESTATUS[0]}
    else
        timeout -k 10 "$limit" "$py" "bench/$name.py" "${passed[@]}"
        rc=$?
    fi
    local what="exit $rc"
    if [[ $rc == 124 || $rc == 137 ]]; then what="killed at its limit of $limit s (exit $rc)"; fi
    summary+=("- bench/$name.py: $what after $((SECONDS - start)) s")
    return "$rc"
}

if [[ -n "$out" ]]; then mkdir -p "$out" && : >"$out/gpu_check.md"; fi
note "# GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ), ${passed[*]:-on the GPU})"
if [[ "${1:-}" != "--cpu-smoke" ]] && command -v nvidia-smi >/dev/null; then
    note "$(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
        2>&1)"
fi
failed=0
part gpu_bench 300 || failed=1
part gpu_train 150 || failed=1
note ""
for line in "${summary[@]}"; do note "$line"; done
exit "$failed"
