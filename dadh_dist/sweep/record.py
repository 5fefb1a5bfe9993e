"""`sweep.json` (docs/design.md §4): what a sweep is and the resources its trials were given.

A rerun under the same name must be the same sweep (it resumes it) and gives its trials the
same resources as the first run, whatever the cluster is now: a trial's config must not change
on resume.
"""

from __future__ import annotations

import dataclasses
import json

from dadh_dist.checkpoint import write_atomic
from dadh_dist.config import ConfigError
from dadh_dist.sweep.resources import Resources
from dadh_dist.sweep.spec import Sweep


def check_identity(s: Sweep) -> dict | None:
    """Refuse a changed sweep under an existing name; returns the saved record (or None)."""
    saved = s.folder / "sweep.json"
    if not saved.is_file():
        return None
    record = json.loads(saved.read_text())
    old, new = record["sweep"], json.loads(json.dumps(s.identity()))
    if old != new:
        changed = [k for k in new if old.get(k) != new[k]]
        if "base" in changed:
            changed.remove("base")
            changed += [k for k in new["base"] if old["base"].get(k) != new["base"][k]][:3]
        raise ConfigError(f"name: sweep {s.name!r} already exists in {s.folder.parent} with a "
                          f"different sweep ({', '.join(changed[:4])}); use another name")
    asked, now = record.get("asked_cpus_per_worker"), s.base.scaling.cpus_per_worker
    if asked is not None and now != asked:  # the trials keep theirs: the new value would be lost
        raise ConfigError(f"scaling.cpus_per_worker: {now:g} would not reach the trials of "
                          f"sweep {s.name!r}, which resume with the "
                          f"{saved_resources(record).cpus_per_worker:g} CPU per worker they "
                          f"started with (asked {asked:g}); use {asked:g} to resume it, or "
                          "another name for a new sweep")
    return record


def saved_resources(record: dict) -> Resources:
    return Resources(**record["resources"])


def save_record(s: Sweep, res: Resources) -> None:
    s.folder.mkdir(parents=True, exist_ok=True)
    record = {"sweep": s.identity(), "sweep_file": str(s.path),
              "resources": dataclasses.asdict(res),
              "asked_cpus_per_worker": s.base.scaling.cpus_per_worker}
    write_atomic(s.folder / "sweep.json", json.dumps(record, indent=1).encode())
