"""Shared test setup.

Tests run in pytest-xdist workers (`make test`: `-n 3 --dist loadgroup`). The tests that start
Ray are in two groups, each run one after another in one worker: "ray" (test_ray, test_serve,
test_tune: one in-process cluster per module, `ray.init()`) and "nodes" (test_lost_node: a
`ray start` head and a second node). The two can run at the same time: every node the tests
start has a temp dir of its own (`_ray_nodes.Node`), where `ray start` writes its address, so a
`ray.init()` never finds and joins it, and an in-process cluster writes no address at all. The
rest, in-process and gloo runs, share the workers. Most of a Ray test's time is waiting (worker
processes starting, the controller's polls, restarts), so three workers keep two cores busy.
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
# the controller's poll (default 2 s): a finished or failed worker group is seen sooner. The
# restart tests of test_ray.py keep Ray's default, where the newest-checkpoint rule matters
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# test file -> its xdist group (tests of one group run one after another, in one worker)
RAY_GROUPS = {"test_ray.py": "ray", "test_serve.py": "ray", "test_tune.py": "ray",
              "test_lost_node.py": "nodes"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups from the markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        group = RAY_GROUPS.get(item.path.name)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    # the Ray groups are the longest units of work: first, so that two workers start on them
    # while the third takes the rest (the order within each file stays as written)
    items.sort(key=lambda item: item.path.name not in RAY_GROUPS)
