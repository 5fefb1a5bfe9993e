"""Shared test setup.

Tests run in two pytest-xdist workers (`make test`: `-n 2 --dist loadgroup`). Every test that
starts Ray (an in-process cluster, `ray start` nodes, Serve, Tune: those that use a fixture of
RAY_FIXTURES) is in one group, so they run one after another in one worker while the other
takes the rest (in-process and gloo runs). Two
Ray clusters at once on two cores were measured slower, not faster: the suite took 651 and 703 s
on three workers with the Ray tests in two concurrent groups, against 535 and 604 s this way, and
the killed-worker test alone went from ~90 s to 300 s.
"""

from __future__ import annotations

import os

import pytest

# Ray Train's optional side actors, each one more process to start per run on two cores: the
# preemption watcher (no preemptible nodes here), the state-actor reconciliation and metrics.
# The clusters the tests start (in-process and `ray start`) inherit them from this environment.
for _key in ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION",
             "RAY_TRAIN_METRICS_ENABLED"):
    os.environ.setdefault(_key, "0")
# Ray starts its worker processes at nice 15. On two cores shared with the other pytest worker
# (nice 0), the Ray tests' training workers then wait whenever the other worker computes: the
# killed-worker test took 122 s in the suite against 73 s alone. At the same priority, the two
# workers share the cores
os.environ.setdefault("RAY_worker_niceness", "0")
# the controller's poll (default 2 s): a finished or failed worker group is seen sooner. The
# restart tests of test_ray.py keep Ray's default, where the newest-checkpoint rule matters
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# the fixtures that start Ray (an in-process cluster, `ray start` nodes, Serve): a test that uses
# one, directly or through another fixture, joins the Ray group; the other tests of the same
# files (parsing, gloo runs, Serve's handler without a server) run in either worker
RAY_FIXTURES = {"ray_local", "head_node", "ray_tune", "service"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups from the markers
def pytest_collection_modifyitems(config, items):
    def starts_ray(item) -> bool:
        return bool(RAY_FIXTURES & set(getattr(item, "fixturenames", ())))

    for item in items:
        if starts_ray(item):
            item.add_marker(pytest.mark.xdist_group("ray"))
    # the Ray group is the longest unit of work: first, so that one worker starts on it while
    # the other takes the rest (the order within each file stays as written)
    items.sort(key=lambda item: not starts_ray(item))
