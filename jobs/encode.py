"""Encode images with a trained hash function into a Parquet codes file (--out is a file).

    python jobs/encode.py --checkpoint runs/<run> --images photos/ --out photos.codes.parquet
    python jobs/encode.py --checkpoint runs/<run> --split database --learned --out db.parquet
    python jobs/encode.py --checkpoint runs/<run> --images shards/ --parquet-split query --out q.pq
"""

import sys

from dadh_dist.cli import encode_main  # torch loads only after the arguments parse

if __name__ == "__main__":
    sys.exit(encode_main())
