"""ASHA whose rung records survive a resumed sweep.

Ray Tune does not save its scheduler with the experiment (ray-project/ray#30838, open): a
restored Tuner unpickles the scheduler from `tuner.pkl`, written when the sweep started, so
every score ASHA recorded at its rungs before Ctrl-C is gone. The resumed sweep then compares a
new trial only with the trials that report after the resume, and keeps trials that the
uninterrupted sweep would have stopped.

`ResumableASHA` writes its rungs to `<sweep>/asha_rungs.json` whenever a record is added, and
reads them back when it is unpickled: the restored scheduler knows what the first run knew.
Records are keyed by Tune's trial id, which a restored trial keeps.

Imports Ray Tune: loaded only where a sweep runs (`runner._scheduler`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler

from dadh_dist.checkpoint import write_atomic
from dadh_dist.config import ConfigError

FILE = "asha_rungs.json"


def read(path: Path) -> list[list[tuple[float, dict[str, float]]]]:
    """The rungs saved at `path`: per bracket, (milestone, {trial id: score}) from the highest
    milestone down; [] when there is no file. A file that is not one raises ConfigError."""
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
        brackets = [[(float(m), {str(k): float(v) for k, v in rec.items()})
                     for m, rec in rungs] for rungs in doc["brackets"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: not a rung record of ASHA ({type(e).__name__}: {e}); "
                          "delete it to resume the sweep without the scores recorded before "
                          "the interruption") from None
    return brackets


class ResumableASHA(ASHAScheduler):
    """`ASHAScheduler` (Ray's asynchronous successive halving) plus a rung log at `log_path`."""

    def __init__(self, log_path: str | os.PathLike, **kwargs):
        super().__init__(**kwargs)
        self._log_path = str(log_path)

    def _records(self) -> list[list[tuple[float, dict]]]:
        return [[(m, rec) for m, rec in b._rungs] for b in self._brackets]

    def _save(self) -> None:
        path = Path(self._log_path)
        doc = {"brackets": [[[m, rec] for m, rec in rungs] for rungs in self._records()]}
        # a kill mid-write leaves the previous log, never half of one
        write_atomic(path, json.dumps(doc).encode())

    def _merge(self, saved: list[list[tuple[float, dict]]]) -> None:
        mine = self._records()
        shape = [[m for m, _ in rungs] for rungs in mine]
        if [[m for m, _ in rungs] for rungs in saved] != shape:
            raise ConfigError(f"{self._log_path}: its rungs {saved and saved[0]} are not this "
                              f"sweep's (milestones {shape}); delete it to resume without them")
        for rungs, old in zip(mine, saved):
            for (_, rec), (_, rec_old) in zip(rungs, old):
                for trial_id, score in rec_old.items():
                    rec.setdefault(trial_id, score)

    def on_trial_result(self, tune_controller, trial, result):
        before = self._count()
        action = super().on_trial_result(tune_controller, trial, result)
        if self._count() != before:
            self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        before = self._count()
        super().on_trial_complete(tune_controller, trial, result)
        if self._count() != before:
            self._save()

    def _count(self) -> int:
        return sum(len(rec) for b in self._brackets for _, rec in b._rungs)

    def __setstate__(self, state: dict) -> None:
        # unpickled: the Tuner being restored from tuner.pkl (or any copy Tune makes)
        self.__dict__.update(state)
        self._merge(read(Path(self._log_path)))
