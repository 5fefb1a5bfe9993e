"""Build the retrieval-quality table (docs/results.md): methods × code lengths × seeds.

    python jobs/quality.py --bits 12,24,32,48 --methods dadh,adsh,dadh-no-code,dadh-no-pair
    python jobs/quality.py --bits 32 --seeds 0,1,2 --parallel 2
    python jobs/quality.py --config configs/fashion_mnist_grid_32.toml --methods dadh,adsh

Each cell is an ordinary `jobs/train.py` run (its command is recorded in rows.json); rerunning
reuses the cells that already finished.
"""

import sys

from dadh_dist.cli import quality_main  # torch loads only after the arguments parse

if __name__ == "__main__":
    sys.exit(quality_main())
