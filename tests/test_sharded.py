"""B sharded by rows: W workers hold W blocks of B and never the whole, and give the identical B
and metrics as one worker; a checkpoint written by W workers resumes on another W.

The two workers run stream-parallel (f on one, g on the other, each on the whole mini-batch), so
their network step is the one process's to the bit, and what is compared is the sharding of B
alone. Under plain DDP the halves of each mini-batch are summed in another order than one
process sums the whole, with and without sharding (measured on this config before B was
sharded: the same 0.73% of B's bits apart as after): test_distributed covers that with its
tolerance."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _checkpoints import keep_merged
from _gloo import run_workers
from _nontrivial import assert_learned
from _repo import DEBUG

from dadh_dist import checkpoint as ckpt
from dadh_dist import config, health, loop
from dadh_dist.data import load_dataset

# the debug config with a database of 1,201 rows (blocks of 601 and 600), three outer
# iterations, checkpoints after each (the last two are kept). By hand, on the real data:
#   DADH_SHARDED_SOURCE=fashion_mnist pytest tests/test_sharded.py   (5,001 rows)
SOURCE = os.environ.get("DADH_SHARDED_SOURCE", "digits")
N = 1201 if SOURCE == "digits" else 5001
EXTRA = ["scaling.use_ray=false", f"data.source={SOURCE}", f"data.database_limit={N}",
         "train.outer_iters=3", "train.num_samples=448"]


def _worker(rank, world, out_dir, resume_from):
    from dadh_dist.distributed import TorchCollectives

    cfg = config.load(DEBUG, EXTRA)
    cfg.scaling.num_workers = world  # the in-process config forbids several; the loop does not
    cfg.scaling.stream_parallel = world == 2
    out = Path(out_dir)
    seen = []

    def report(metrics, staged):
        if staged is not None:  # this rank's part: its own block of B, nobody else's
            seen.append(sorted(p.name for p in staged.glob("codes_*.npy")))
        keep_merged(out, staged, metrics)

    env = loop.WorkerEnv(collectives=TorchCollectives(), report=report,
                         run_dir=out if rank == 0 else None,
                         resume_from=Path(resume_from) if resume_from else None)
    final = loop.train(cfg, env)
    (out / f"final_{rank}.json").write_text(json.dumps({**final, "blocks_written": seen}))


def _run(folder: Path, world: int, resume_from: Path | None = None):
    folder.mkdir()
    run_workers(_worker, world, str(folder), str(resume_from) if resume_from else None,
                timeout_s=120)
    finals = [json.loads((folder / f"final_{r}.json").read_text()) for r in range(world)]
    state, manifest = ckpt.load(ckpt.latest_valid(folder))
    return finals, state["B"], manifest


KEYS = ("map_all_f", "map_all_g", "map_all_fg", "p_at_1000_fg", "val/map_all_fg")


def _same_metrics(a: dict, b: dict) -> None:
    # AP sums meet in another order on W blocks than on one: equal to rounding (1e-12), and
    # every count-based value (P@N, the distinct codes) exactly
    for key in KEYS:
        assert a[key] == pytest.approx(b[key], abs=1e-12, rel=0), key
    assert a["distinct_database_codes"] == b["distinct_database_codes"]


def test_two_blocks_equal_one_and_resume_across_worker_counts(tmp_path):
    one, B1, m1 = _run(tmp_path / "w1", 1)
    two, B2, m2 = _run(tmp_path / "w2", 2)
    assert_learned(one[0])
    assert torch.equal(B1, B2)  # bit for bit, though no worker of the pair held all of B
    _same_metrics(one[0], two[0])
    assert B1.shape[0] == N
    # the chance level from the blocks' relevant counts is the one of all labels
    data = load_dataset(config.load(DEBUG, EXTRA).data)
    assert one[0]["chance_map"] == two[0]["chance_map"] == pytest.approx(
        health.chance_map(data.query.labels, data.database.labels), rel=1e-12)
    # each rank wrote its own block only; the manifest lists both
    half = (N + 1) // 2
    assert two[0]["blocks_written"][-1] == [f"codes_{0:012d}_{half:012d}.npy"]
    assert two[1]["blocks_written"][-1] == [f"codes_{half:012d}_{N:012d}.npy"]
    assert [b[:2] for b in m2["codes"]["blocks"]] == [[0, half], [half, N]]
    assert len(m1["codes"]["blocks"]) == 1

    # W=2's checkpoint of outer iteration 2 (two blocks) resumed by one worker, which reads
    # them as one; one block read as two: test_blocks.py's checkpoint test, W = 1, 2, 4, 60
    one_from_two, B12, _ = _run(tmp_path / "w2_to_w1", 1, tmp_path / "w2" / "checkpoint_000002")
    assert torch.equal(B12, B1)
    _same_metrics(one_from_two[0], one[0])
    print(f"\n{SOURCE}, n={N}: B equal bit for bit (W=1, W=2, W=2 resumed by 1); "
          + ", ".join(f"{k} {one[0][k]:.6f} / {two[0][k]:.6f}" for k in KEYS))  # with -s
