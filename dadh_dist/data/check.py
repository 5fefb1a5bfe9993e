"""check-data: every problem of the configured dataset at once, then a summary of it.

It runs the loaders themselves in scan mode (see problems.Problems), so the checks it makes are
exactly those a training run makes, without stopping at the first problem and without keeping
decoded pixels in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from dadh_dist.config import DataConfig
from dadh_dist.data.base import DataError, Dataset
from dadh_dist.data.problems import Problem, Problems
from dadh_dist.data.sources import load_source


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
        return out


def check_dataset(cfg: DataConfig) -> CheckReport:
    """Examine every file, line, row and image of the configured dataset."""
    problems = Problems(scan=True, skip_bad=cfg.skip_bad)
    ds = None
    try:
        ds = load_source(cfg, problems)
    except DataError as e:
        problems.absorb(e)
    return CheckReport(cfg, problems.items, ds)
