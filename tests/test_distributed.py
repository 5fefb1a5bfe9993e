"""W workers ≡ 1 worker: the same seed and global batch give the same B and the same mAP."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from _gloo import run_workers
from _nontrivial import assert_learned

from dadh_dist import checkpoint as ckpt
from dadh_dist import config, driver, loop, monitor
from dadh_dist.distributed import LocalCollectives, even_split

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "debug_cpu.toml"
OVERRIDES = ["scaling.use_ray=false", "train.outer_iters=2"]


def _cfg(extra=()):
    return config.load(DEBUG, OVERRIDES + list(extra))


def _worker(rank, world, out_dir, extra):
    from dadh_dist.distributed import TorchCollectives

    cfg = _cfg(extra)
    # the in-process config forbids several workers; the loop itself does not care
    cfg.scaling.num_workers = world
    out = Path(out_dir)

    def report(metrics, staged):
        if staged is not None:
            driver.keep_checkpoint(out, staged)

    env = loop.WorkerEnv(collectives=TorchCollectives(), report=report,
                         run_dir=out if rank == 0 else None)
    with _recording_curves() as curves:
        final = loop.train(cfg, env)
    (out / f"final_{rank}.json").write_text(json.dumps({**final, "curves": curves}))


@contextlib.contextmanager
def _recording_curves():
    """The precision–recall curves the loop hands to TensorBoard, as lists."""
    curves: dict = {}

    def record(self, step, tag, precision, recall):
        curves[f"{tag}@{step}"] = [list(map(float, precision)), list(map(float, recall))]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(monitor.Monitor, "pr_curve", record)
        yield curves


def _single(out: Path, extra=()):
    cfg = _cfg(extra)
    out.mkdir(parents=True)

    def report(metrics, staged):
        if staged is not None:
            driver.keep_checkpoint(out, staged)

    # the workers' thread count (_gloo: 1): it sets the order of the convolutions' float sums
    with _recording_curves() as curves, driver.torch_threads(1):
        final = loop.train(cfg, loop.WorkerEnv(collectives=LocalCollectives(), report=report,
                                               run_dir=out))
    return {**final, "curves": curves}


def _B(folder: Path) -> torch.Tensor:
    state, _ = ckpt.load(ckpt.latest_valid(folder))
    return state["B"]


@pytest.mark.parametrize("extra", [
    [],
    # a database of 1,593 rows: not divisible by 2; Ω of 453 leaves a last batch of 5
    ["data.database_limit=1593", "train.num_samples=453"],
])
def test_two_workers_equal_one(tmp_path, extra):
    single = _single(tmp_path / "one", extra)
    assert_learned(single)
    (tmp_path / "two").mkdir()
    run_workers(_worker, 2, str(tmp_path / "two"), extra)
    two = [json.loads((tmp_path / "two" / f"final_{r}.json").read_text()) for r in (0, 1)]
    assert torch.equal(_B(tmp_path / "one"), _B(tmp_path / "two"))
    for key in ("map_all_f", "map_all_g", "map_all_fg", "p_at_1000_fg"):
        assert two[0][key] == two[1][key]
        assert two[0][key] == pytest.approx(single[key], abs=1e-12), key
    # the test PR curves come from every query, not rank 0's share
    assert single["curves"] and two[0]["curves"] == single["curves"]


def test_even_split_covers_without_padding():
    for length in (0, 1, 5, 64, 97):
        for world in (1, 2, 3, 8):
            parts = [even_split(length, world, r) for r in range(world)]
            idx = [i for p in parts for i in range(length)[p]]
            assert idx == list(range(length))
            sizes = [p.stop - p.start for p in parts]
            assert max(sizes) - min(sizes) <= 1
