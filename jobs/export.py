"""Export a trained hash function as a torch.export program plus state_dicts (--out is a folder).

    python jobs/export.py --checkpoint runs/<run> --encoder fg --out exported/
    # then: torch.export.load("exported/hash_fg.pt2").module()(uint8_images) -> int8 ±1 codes
"""

import sys

from dadh_dist.cli import export_main  # torch loads only after the arguments parse

if __name__ == "__main__":
    sys.exit(export_main())
