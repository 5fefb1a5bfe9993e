#!/usr/bin/env bash
# Training wall time per outer iteration under Ray Train at Ray's default report poll (2 s) and at
# the product's (0.25 s): the debug config, 2 workers x 1 CPU, two alternating rounds
# (docs/benchmarks.md, note 5b). Runs are written to a temporary folder removed at the end.
# Every run trains the same thing, so every run must end on the same test mAP: exit status 1
# otherwise. No target: the ratio is reported.
#
#   bash bench/ray_poll.sh            # 2 rounds x 12 outer iterations (~3 min)
#   bash bench/ray_poll.sh --quick    # smoke run: 1 round x 4 outer iterations (~1 min)
set -euo pipefail
rounds=2 iters=12
case "${1:-}" in
  --quick) rounds=1 iters=4 ;;
  "") ;;
  -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
  *) echo "error: unknown argument $1 (only --quick)" >&2; exit 2 ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for round in $(seq 1 "$rounds"); do
  for poll in 2.0 0.25; do
    name="poll${poll}_${round}"
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=$poll python "$repo/jobs/train.py" \
      --config "$repo/configs/debug_cpu.toml" --name "$name" --quiet \
      scaling.num_workers=2 "train.outer_iters=$iters" "log.run_dir=$out" >/dev/null 2>&1
    python - "$out/$name/final_metrics.json" "$poll" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"poll {sys.argv[2]:>4} s: {m['wall_s'] / m['outer_iters']:.3f} s per outer iteration, "
      f"test mAP(fg) {m['map_all_fg']:.4f}")
PY
  done
done
python - "$out"/*/final_metrics.json <<'PY'
import json, sys
maps = {json.load(open(path))["map_all_fg"] for path in sys.argv[1:]}
same = len(maps) == 1
print(f"\n- every run's test mAP(fg) the same: {'yes' if same else 'NO: ' + str(sorted(maps))}")
sys.exit(0 if same else 1)
PY
