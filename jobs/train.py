"""Train DADH hash functions.

    python jobs/train.py                                  # Fashion-MNIST, 32 bits, local Ray
    python jobs/train.py --config configs/debug_cpu.toml --name debug objective.gamma=100
    ray job submit --working-dir . -- python jobs/train.py --config configs/fashion_mnist_32.toml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dadh_dist.cli import train_main  # noqa: E402  (argparse first; torch after parsing)

if __name__ == "__main__":
    sys.exit(train_main())
