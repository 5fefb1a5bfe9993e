#!/usr/bin/env bash
# Training wall time per outer iteration under Ray Train at Ray's default report poll (2 s) and at
# the product's (0.25 s): the debug config, 2 workers x 1 CPU, two alternating rounds
# (docs/benchmarks.md, note 5b). Runs are written to a temporary folder removed at the end.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for round in 1 2; do
  for poll in 2.0 0.25; do
    name="poll${poll}_${round}"
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=$poll python "$repo/jobs/train.py" \
      --config "$repo/configs/debug_cpu.toml" --name "$name" --quiet \
      scaling.num_workers=2 train.outer_iters=12 "log.run_dir=$out" >/dev/null 2>&1
    python - "$out/$name/final_metrics.json" "$poll" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"poll {sys.argv[2]:>4} s: {m['wall_s'] / m['outer_iters']:.3f} s per outer iteration, "
      f"test mAP(fg) {m['map_all_fg']:.4f}")
PY
  done
done
