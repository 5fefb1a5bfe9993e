"""Evaluate a trained run: metrics JSON, PR and P@N plots, example retrievals, Markdown report
(--out is a folder).

    python jobs/evaluate.py --checkpoint runs/fashion_mnist_32bit_1a2b3c4d
    python jobs/evaluate.py --checkpoint runs/<run>/checkpoint_000010 --encoders fg --out eval/
"""

import sys

from dadh_dist.cli import evaluate_main  # torch loads only after the arguments parse

if __name__ == "__main__":
    sys.exit(evaluate_main())
