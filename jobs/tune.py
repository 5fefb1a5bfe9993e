"""Sweep γ, η, the learning rates (any dotted config key) with Ray Tune.

    python jobs/tune.py --config configs/sweep_debug.toml          # digits, seconds per trial
    python jobs/tune.py --config configs/sweep_fashion_mnist.toml --num-samples 12
    python jobs/tune.py --config configs/sweep_debug.toml log.run_dir=/tmp/runs

Each trial is a full training run in <log.run_dir>/<sweep name>/trial_<id>/; the best trial's
config is written to <log.run_dir>/<sweep name>/best_config.toml. Rerun the same command to resume
an interrupted sweep.
"""

import sys

from dadh_dist.cli import tune_main  # torch loads only after the arguments parse

if __name__ == "__main__":
    sys.exit(tune_main())
