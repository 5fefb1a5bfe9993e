"""Encode images with a trained hash function into a Parquet codes file (--out is a file).

    python jobs/encode.py --checkpoint runs/<run> --images photos/ --out photos.codes.parquet
    python jobs/encode.py --checkpoint runs/<run> --split database --learned --out db.parquet
    python jobs/encode.py --checkpoint runs/<run> --images shards/ --parquet-split query --out q.pq
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dadh_dist.cli import encode_main  # noqa: E402  (argparse first; torch after parsing)

if __name__ == "__main__":
    sys.exit(encode_main())
