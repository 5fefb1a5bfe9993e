"""Serve a trained hash function on Ray Serve: image search and encoding over HTTP.

    python jobs/serve.py --checkpoint runs/<run>                        # http://127.0.0.1:8000
    python jobs/serve.py --checkpoint runs/<run>/export/<ckpt>_fg --database db.parquet
    python jobs/serve.py --checkpoint runs/<run> --replicas 2 --port 8080
    curl -F image=@a.png -F image=@b.png 'http://127.0.0.1:8000/search?k=5'

The same application runs under `serve run dadh_dist.serve:app checkpoint=runs/<run>`.
"""

import sys

from dadh_dist.serve import main  # Ray and torch load only after the arguments parse

if __name__ == "__main__":
    sys.exit(main())
