"""Train DADH hash functions.

    python jobs/train.py                                  # Fashion-MNIST, 32 bits, local Ray
    python jobs/train.py --config configs/debug_cpu.toml --name debug objective.gamma=100
    ray job submit --working-dir . -- python jobs/train.py --config configs/fashion_mnist_32.toml
"""

import sys

from dadh_dist.cli import train_main  # torch loads only after the arguments parse

if __name__ == "__main__":
    sys.exit(train_main())
