"""Run a function on W plain processes joined by a gloo group on 127.0.0.1 (no Ray)."""

from __future__ import annotations

import os
import socket
import sys

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Workers start from a fork server that has imported these once, instead of each spawned
# interpreter importing torch and dadh_dist again (~3 s of CPU per process on these 2 cores):
# the gloo test files ran in 73 s and 141 s alone this way, against 95 s and 181 s spawned.
# The server only imports; it runs nothing, so no OpenMP or numba thread pool is forked
# (torch._dynamo: the first optimizer a process builds imports it, ~1.5 s)
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "dadh_dist.loop",
           "dadh_dist.distributed", "_gloo"]
START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
if START_METHOD == "forkserver":
    mp.get_context(START_METHOD).set_forkserver_preload(PRELOAD)  # read when the server starts


def _entry(rank, world, port, timeout_s, env, fn, args):
    import faulthandler

    # the fork server's environment is the one it started with: each run sees the caller's
    # environment of now, as a spawned process would
    os.environ.clear()
    os.environ.update(env)

    import torch
    import torch.distributed as dist

    from dadh_dist.distributed import init_process_group_for_test

    faulthandler.enable(all_threads=True)  # a C++ abort in a worker shows its Python stacks
    torch.set_num_threads(1)
    init_process_group_for_test(rank, world, port, timeout_s)
    try:
        healthy = fn(rank, world, *args) is not False  # False: the group is broken, skip teardown
    except BaseException:
        dist.destroy_process_group()
        raise
    if healthy:
        # leave together: a rank tearing its gloo group down while a peer still uses it
        # sometimes aborts at exit ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
        # and skip the interpreter's teardown: a gloo thread still joinable when C++ statics are
        # destroyed aborts the process after its work is done ("terminate called without an
        # active exception", seen once in ~40 spawned runs on AMD EPYC)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run_workers(fn, world: int, *args, timeout_s: int = 60) -> None:
    """fn(rank, world, *args) on every rank; raises if any rank fails. A fn that returns False
    leaves its process group as it is (a test that broke the group on purpose)."""
    mp.start_processes(_entry, args=(world, free_port(), timeout_s, dict(os.environ), fn, args),
                       nprocs=world, join=True, start_method=START_METHOD)
