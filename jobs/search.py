"""Top-k Hamming search against a database codes file (table or --json; --out is a file).

    python jobs/search.py --database db.parquet --query q.parquet -k 10
    python jobs/search.py --database db.parquet --query photos/ --checkpoint runs/<run> --json
    python jobs/search.py --database db.parquet --query q.parquet --backend faiss
"""

import sys

from dadh_dist.cli import search_main  # torch loads only after the arguments parse

if __name__ == "__main__":
    sys.exit(search_main())
