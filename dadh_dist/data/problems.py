"""Problems found in input data, collected by the one validation code that loading and
`check-data` share.

Loading a dataset records every problem it meets in a `Problems` and stops at the next
`barrier()` with one DataError naming the first problem (and how many more there are).
`check-data` runs the same loaders in scan mode, where barriers do not stop, so that every line,
row and image gets examined and all problems are reported at once.

Only an unreadable or missing image is *skippable*: with `data.skip_bad` it is dropped and
counted instead of failing. Everything else (a label row of the wrong width or with values other
than 0/1, a truncated IDX or Parquet file, a missing split, an empty class, overlapping splits)
is structural and always fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CHECK_COMMAND = "python -m dadh_dist check-data --config ..."
"""The command the hint names; a tool that knows its config puts the real one in
(`name_check_command`)."""
CHECK_HINT = f"`{CHECK_COMMAND}` lists them all"


def check_command(config: str | None, overrides: Sequence[str] = ()) -> str:
    """The check-data command line of a config file and its `KEY=VALUE` / `--KEY VALUE`
    overrides, quoted for a shell. log.* keys are left out (check-data reads none), and a URI's
    user-info is masked: the line goes to logs."""
    import shlex

    from dadh_dist.config import override_groups
    from dadh_dist.uris import redact

    kept = [redact(item) for group in override_groups(list(overrides))
            if not group[0].removeprefix("--").startswith("log.") for item in group]
    return shlex.join(["python", "-m", "dadh_dist", "check-data",
                       *(["--config", config] if config is not None else []), *kept])


def with_check_command(text: str, config: str | None, overrides: Sequence[str] = ()) -> str:
    """`text` with the check-data command of `config` and `overrides` in place of the hint's
    placeholder (unchanged where it has none)."""
    if CHECK_COMMAND not in text:
        return text
    return text.replace(CHECK_COMMAND, check_command(config, overrides))


def name_check_command(e: BaseException, config: str | None,
                       overrides: Sequence[str] = ()) -> None:
    """`with_check_command` on a data error's message, in place: the same exception goes on (a
    worker's DataError reaches a Ray driver as another class)."""
    if len(e.args) == 1 and isinstance(e.args[0], str):
        e.args = (with_check_command(e.args[0], config, overrides),)


@dataclass(frozen=True)
class Problem:
    where: str
    """The file, with `:line` for list files or `: row r` for Parquet shards ('' if none)."""
    what: str
    skippable: bool = False
    """An unreadable or missing image, which `data.skip_bad` drops instead of failing."""

    def __str__(self) -> str:
        return f"{self.where}: {self.what}" if self.where else self.what


class DataError(ValueError):
    """Bad or missing input data; the one-line message names the file (and line/row) at fault.

    `problems` holds every problem collected before it was raised (empty when raised directly).
    """

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


class Problems:
    """The problems of one dataset, in the order they were found.

    skip_bad: skippable problems do not stop loading; the loader drops those images.
    scan: check-data mode; barriers never stop, problem images are left out like skipped ones,
    and decoded pixels are not kept (see images.decode_all).
    """

    def __init__(self, *, skip_bad: bool = False, scan: bool = False) -> None:
        self.skip_bad = skip_bad
        self.scan = scan
        self.items: list[Problem] = []

    def add(self, where: str, what: str, *, skippable: bool = False) -> None:
        self.items.append(Problem(str(where), what, skippable))

    def absorb(self, e: DataError) -> None:
        """Record a DataError raised by a helper (unless its problems are already recorded)."""
        known = set(map(id, self.items))
        new = [p for p in e.problems if id(p) not in known]
        if not e.problems:
            new = [Problem("", str(e))]
        self.items.extend(new)

    def blocking(self) -> list[Problem]:
        return [p for p in self.items if not (p.skippable and self.skip_bad)]

    def skipped(self) -> list[Problem]:
        """The images dropped under data.skip_bad."""
        return [p for p in self.items if p.skippable and self.skip_bad and not self.scan]

    def barrier(self) -> None:
        """End of a stage: a loader cannot go on past a blocking problem; a scan goes on."""
        if not self.scan and self.blocking():
            raise self.error()

    def fail(self) -> None:
        """Raise now, in either mode: a problem was just recorded that nothing can follow."""
        raise self.error()

    def error(self) -> DataError:
        shown = (self.items if self.scan else self.blocking()) or self.items
        more = len(shown) - 1
        suffix = f" (and {more} more problem{'s' * (more > 1)}; {CHECK_HINT})" if more else ""
        return DataError(f"{shown[0]}{suffix}", self.items)

@dataclass
class LabelWidth:
    """The label width every list line or Parquet row must have, and where it was first seen."""

    n: int = -1
    where: str = ""


def check_classes(labels: np.ndarray, where: str, problems: Problems, note: str = "") -> None:
    """One problem per class without a single database image. labels: (n, c) 0/1."""
    for c in np.flatnonzero(labels.sum(0) == 0):
        problems.add(where, f"class {c} has no database image{note}")


def limit_note(kept: int, limit: int) -> str:
    """What follows "class c has no database image" when data.database_limit emptied it."""
    return f" among the {kept} kept by data.database_limit = {limit} (raise it)"


def check_limited(labels: np.ndarray, limit: int, problems: Problems) -> None:
    """check_classes for a database cut to data.database_limit rows (labels: those kept)."""
    check_classes(labels, "data.database_limit", problems, limit_note(len(labels), limit))
