"""check-data: every problem of the configured dataset at once, then a summary of it.

It runs the loaders themselves in scan mode (see problems.Problems), so the checks it makes are
exactly those a training run makes, without stopping at the first problem and without keeping
decoded pixels in memory. It also reports images that are pixel-identical across splits (a
query also in the database inflates mAP): a warning in the summary, not a problem, since public
datasets hold a few.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dadh_dist.config import DataConfig
from dadh_dist.data.base import DataError, Dataset, Split
from dadh_dist.data.images import pixel_digests
from dadh_dist.data.problems import Problem, Problems
from dadh_dist.data.sources import load_source

# (a, b): every image of split a that is pixel-identical to one of split b is reported.
LEAKS = (("query", "database"), ("validation", "database"), ("query", "validation"))
DUPLICATE_EXAMPLES = 3


@dataclass
class CheckReport:
    cfg: DataConfig
    problems: list[Problem]
    dataset: Dataset | None
    """What loads once the lines and rows with problems are left out (None if nothing does)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """One line per problem, then the summary, then the verdict."""
        out = [str(p) for p in self.problems]
        if out:
            out.append("")
        out += self.summary()
        skippable = sum(p.skippable for p in self.problems)
        if skippable and self.cfg.skip_bad:
            blocking = len(self.problems) - skippable
            out.append(f"with data.skip_bad = true a run skips the {skippable} unreadable or "
                       f"missing image(s); {blocking} other problem(s) would still stop it")
        n = len(self.problems)
        out.append(f"check-data: {n} problem{'s' * (n != 1)} found" if n
                   else "check-data: no problems found")
        return out

    def summary(self) -> list[str]:
        cfg, ds = self.cfg, self.dataset
        where = f", root {cfg.root}" if cfg.root else ""
        if ds is None:
            return [f"dataset: source {cfg.source}{where}: nothing to summarise, loading stopped "
                    "at the problems above"]
        splits = ds.splits()
        out = [
            f"dataset: {ds.name} (source {cfg.source}{where})"
            + (" - lines and rows with problems left out" if self.problems else ""),
            f"images: {ds.channels} channel{'s' * (ds.channels != 1)}, {ds.image_size} x "
            f"{ds.database.images.shape[3]}; {ds.num_classes} classes, "
            + ("multi-label (an image counts in each of its classes)" if ds.multi_label
               else "single-label"),
        ]
        table = [("class", *splits)]
        table += [(str(c), *(str(int(s.labels[:, c].sum())) for s in splits.values()))
                  for c in range(ds.num_classes)]
        table.append(("images", *(str(len(s)) for s in splits.values())))
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        out += ["  ".join([row[0].ljust(widths[0])]
                          + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)])
                for row in table]
        return out + duplicates(ds)


def digests(split: Split) -> np.ndarray:
    """(N,) uint64 pixel digests: those kept by the scan of a file-based source, else (an
    in-memory source keeps its pixels) hashed from the rows of the images."""
    return split.digests if split.digests is not None else pixel_digests(split.images)


def duplicates(ds: Dataset) -> list[str]:
    """One line per pair of LEAKS whose splits share pixel-identical images, with examples by
    id, or one line saying that none do."""
    splits = ds.splits()
    hashed = {name: digests(s) for name, s in splits.items()}
    out = []
    for a, b in LEAKS:
        if not (len(hashed[a]) and len(hashed[b])):
            continue
        order = np.argsort(hashed[b], kind="stable")
        sorted_b = hashed[b][order]
        pos = np.minimum(np.searchsorted(sorted_b, hashed[a]), len(sorted_b) - 1)
        hit = np.flatnonzero(sorted_b[pos] == hashed[a])
        if not hit.size:
            continue
        pairs = [f"{a} id {splits[a].ids[i]} = {b} id {splits[b].ids[order[pos[i]]]}"
                 for i in hit[:DUPLICATE_EXAMPLES]]
        more = ", ..." if hit.size > DUPLICATE_EXAMPLES else ""
        one = hit.size == 1
        out.append(f"duplicates: {hit.size} {a} image{'s' * (not one)} {'is' if one else 'are'} "
                   f"pixel-identical to {b} images ({', '.join(pairs)}{more})")
    return out or ["duplicates: no query or validation image is pixel-identical to a database "
                   "image, nor a query image to a validation image"]


def check_dataset(cfg: DataConfig) -> CheckReport:
    """Examine every file, line, row and image of the configured dataset."""
    problems = Problems(scan=True, skip_bad=cfg.skip_bad)
    ds = None
    try:
        ds = load_source(cfg, problems)
    except DataError as e:
        problems.absorb(e)
    return CheckReport(cfg, problems.items, ds)
