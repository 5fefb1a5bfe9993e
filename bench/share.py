"""Stream-parallel's once-per-outer-iteration share: one stream's weights and Adam state from
its half's leader to every worker (`loop.Streams.share`), on W gloo processes.

    python bench/share.py                       # small_cnn (width 32), resnet18, resnet50; W = 2
    python bench/share.py --backbones resnet50 --repeat 5
    python bench/share.py --quick               # smoke run: small_cnn, one timed share each

Baseline, measured in the same run: the state pickled whole (`broadcast_object`, what share()
did before). Ours: `TorchCollectives.broadcast_state` (only the nesting pickled, the tensors as
one flat buffer per dtype). Each set-up times the broadcast plus the receiver's
load_state_dict of model and optimiser; the fastest of --repeat after one warm-up. Every
receiver checks it got the sender's tensors bit for bit (the run fails otherwise). No target:
the ratio is reported.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _env  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
import torch.multiprocessing as mp
from _common import free_port, table


def _worker(rank: int, world: int, port: int, backbone: str, repeat: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from dadh_dist.distributed import (
        TorchCollectives,
        init_process_group_for_test,
        pack_state,
        tensor_checksum,
    )
    from dadh_dist.models import build_streams

    torch.set_num_threads(1)
    init_process_group_for_test(rank, world, port, timeout_s=600)
    c = TorchCollectives()
    f, _ = build_streams(32, 1, 28, backbone=backbone, width=32, two_streams=False)
    opt = torch.optim.Adam(f.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)  # every rank's state differs before the share
    for p in f.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    state = {"model": f.state_dict(), "opt": opt.state_dict()}
    _, tensors = pack_state(state)
    mib = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    sent = [tensor_checksum(t) for t in tensors] if rank == 0 else None
    sent = c.broadcast_object(sent)

    def share(how) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        got = how(state if rank == 0 else None, src=0)
        if rank != 0:
            f.load_state_dict(got["model"])
            opt.load_state_dict(got["opt"])
        dist.barrier()
        return time.perf_counter() - t0

    times = {}
    for name, how in (("pickled", c.broadcast_object), ("flat", c.broadcast_state)):
        runs = [share(how) for _ in range(repeat + 1)][1:]
        now = pack_state({"model": f.state_dict(), "opt": opt.state_dict()})[1]
        if [tensor_checksum(t) for t in now] != sent:
            raise SystemExit(f"rank {rank}: {name} share did not deliver rank 0's state")
        times[name] = min(runs)
    if rank == 0:
        Path(out).write_text(json.dumps({"mib": mib, **times}))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbones", default="small_cnn,resnet18,resnet50",
                    help="comma-separated model.backbone values")
    ap.add_argument("--workers", type=int, default=2, help="gloo processes (W)")
    ap.add_argument("--repeat", type=int, default=3, help="timed shares per set-up")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: --backbones small_cnn --repeat 1 (~15 s)")
    args = ap.parse_args(argv)
    if args.quick:
        args.backbones, args.repeat = "small_cnn", 1
    if args.workers < 2 or args.repeat < 1:
        ap.error("--workers must be >= 2 and --repeat >= 1")
    load_at_start = _env.load_average()
    rows = []
    for backbone in args.backbones.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "times.json")
            mp.start_processes(_worker, args=(args.workers, free_port(), backbone,
                                              args.repeat, out),
                               nprocs=args.workers, join=True, start_method="spawn")
            r = json.loads(Path(out).read_text())
        rows.append((backbone, r["mib"], r["pickled"], r["flat"],
                     f"{r['pickled'] / r['flat']:.2f}×"))
    print(table(["backbone", "state MiB (weights + Adam)", "pickled s", "flat s",
                 "pickled ÷ flat"], rows))
    _env.print_environment(load_at_start)


if __name__ == "__main__":
    main()
