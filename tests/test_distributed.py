"""W workers ≡ 1 worker: the same seed and global batch give the same B and the same mAP."""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from _checkpoints import keep_merged
from _gloo import run_workers
from _nontrivial import assert_learned, assert_same_run, assert_same_up_to_rounding
from _repo import DEBUG

from dadh_dist import checkpoint as ckpt
from dadh_dist import config, loop, monitor
from dadh_dist import distributed as dist_mod
from dadh_dist import run as runner
from dadh_dist.distributed import LocalCollectives, even_split

OVERRIDES = ["scaling.use_ray=false", "train.outer_iters=2"]


def _cfg(extra=()):
    return config.load(DEBUG, OVERRIDES + list(extra))


def _worker(rank, world, out_dir, extra, stream_parallel=False):
    from dadh_dist.distributed import TorchCollectives

    cfg = _cfg(extra)
    # the in-process config forbids several workers; the loop itself does not care
    cfg.scaling.num_workers = world
    cfg.scaling.stream_parallel = stream_parallel
    out = Path(out_dir)

    def report(metrics, staged):
        keep_merged(out, staged, metrics)

    env = loop.WorkerEnv(collectives=TorchCollectives(), report=report,
                         run_dir=out if rank == 0 else None)
    with _recording_curves() as curves, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final = loop.train(cfg, env)
    # torch's scheduler-order warning: a stream-parallel worker's other half never steps here
    sched = [str(w.message) for w in caught if "lr_scheduler" in str(w.message)]
    (out / f"final_{rank}.json").write_text(json.dumps({**final, "curves": curves,
                                                        "scheduler_warnings": sched}))


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
            runner.folders.keep_checkpoint(out, staged)

    # the workers' thread count (_gloo: 1): it sets the order of the convolutions' float sums
    with _recording_curves() as curves, runner.local.torch_threads(1):
        final = loop.train(cfg, loop.WorkerEnv(collectives=LocalCollectives(), report=report,
                                               run_dir=out))
    return {**final, "curves": curves}


def _B(folder: Path) -> torch.Tensor:
    state, _ = ckpt.load(ckpt.latest_valid(folder))
    return state["B"]


def _first(folder: Path) -> dict:
    """The state of the run's first outer iteration (2 checkpoints are kept)."""
    return ckpt.load(folder / "checkpoint_000001")[0]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """single(extra) -> (final metrics, B, first checkpoint state) of the one-process run,
    computed once per config for all the tests that compare against it."""
    done: dict = {}

    def get(extra=()):
        key = tuple(extra)
        if key not in done:
            folder = tmp_path_factory.mktemp("one")
            final = _single(folder / "run", extra)
            assert_learned(final)
            done[key] = final, _B(folder / "run"), _first(folder / "run")
        return done[key]

    return get


# a database of 1,593 rows: B's row blocks of 797 and 796 (or 399/398/398/398)
ODD = ["data.database_limit=1593", "train.num_samples=448"]


@pytest.mark.parametrize("extra", [[], ODD])
def test_two_workers_equal_one(tmp_path, single, extra):
    """Plain DDP: the gradient is summed over two half-batches, so float rounding differs from
    one process and only the first outer iteration compares closely (tests/_nontrivial.py)."""
    one, _, first1 = single(extra)
    (tmp_path / "two").mkdir()
    run_workers(_worker, 2, str(tmp_path / "two"), extra)
    two = [json.loads((tmp_path / "two" / f"final_{r}.json").read_text()) for r in (0, 1)]
    for key in ("map_all_f", "map_all_g", "map_all_fg", "p_at_1000_fg"):
        assert two[0][key] == two[1][key]
    assert_learned(two[0])
    assert_same_up_to_rounding(first1, _first(tmp_path / "two"), one, two[0])
    # the test PR curves come from every query, not rank 0's share
    assert one["curves"] and two[0]["curves"].keys() == one["curves"].keys()


def test_ragged_last_batch_two_workers_within_tolerance(tmp_path):
    """Ω of 453 leaves a last mini-batch of 5, split 3/2: the convolutions' backward then sums
    the batch in other blocks than one process does (5 at once), so float rounding differs and
    B is not bit-identical (measured: 2 of 25,488 bits). The stated tolerance: at most 0.1% of
    B's bits and 0.01 mAP apart."""
    extra = ["data.database_limit=1593", "train.num_samples=453"]
    single = _single(tmp_path / "one", extra)
    assert_learned(single)
    (tmp_path / "two").mkdir()
    run_workers(_worker, 2, str(tmp_path / "two"), extra)
    two = json.loads((tmp_path / "two" / "final_0.json").read_text())
    B1, B2 = _B(tmp_path / "one"), _B(tmp_path / "two")
    assert float((B1 != B2).float().mean()) <= 1e-3
    for key in ("map_all_f", "map_all_g", "map_all_fg"):
        assert two[key] == pytest.approx(single[key], abs=0.01), key


@pytest.mark.parametrize("world,extra", [
    # (2 workers, the debug config as it is: test_sharded.py, which also resumes across W)
    (2, ["objective.use_pair=false"]),
    # two workers per stream: DDP inside each half, a batch of 32 split 16/16 in each
    (4, ODD),
])
def test_stream_parallel_equals_one_worker(tmp_path, single, world, extra):
    """f on one half of the workers, g on the other: the same B and mAP as one process that
    trains both streams in turn. With one worker per stream each stream's sums are one
    process's and the whole run compares closely; with two per stream the gradient is DDP's
    sum of two half-batches, so, as for plain DDP, only the first outer iteration does
    (measured here: 1.7% of B's bits apart after iteration 2 at W=4)."""
    one, B1, first1 = single(extra)
    (tmp_path / "sp").mkdir()
    run_workers(_worker, world, str(tmp_path / "sp"), extra, True, timeout_s=120)
    finals = [json.loads((tmp_path / "sp" / f"final_{r}.json").read_text())
              for r in range(world)]
    for key in ("map_all_f", "map_all_g", "map_all_fg", "p_at_1000_fg"):
        assert all(f[key] == finals[0][key] for f in finals)
    assert not any(f["scheduler_warnings"] for f in finals), finals[0]["scheduler_warnings"]
    assert_learned(finals[0])
    if world == 2:
        assert_same_run(B1, _B(tmp_path / "sp"), one, finals[0])
    else:
        assert_same_up_to_rounding(first1, _first(tmp_path / "sp"), one, finals[0])
    state_sp = ckpt.load(ckpt.latest_valid(tmp_path / "sp"))[0]
    assert state_sp["workers"] == world and state_sp["opt_g"]["state"]


def test_even_split_covers_without_padding():
    for length in (0, 1, 5, 64, 97):
        for world in (1, 2, 3, 8):
            parts = [even_split(length, world, r) for r in range(world)]
            idx = [i for p in parts for i in range(length)[p]]
            assert idx == list(range(length))
            sizes = [p.stop - p.start for p in parts]
            assert max(sizes) - min(sizes) <= 1


def _state_with_every_kind():
    """A module's and an Adam optimiser's state_dict after one step, plus the odd leaves a
    state can hold: 0-d, empty, integer and bfloat16 tensors, tuples, None, strings."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3))
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(2, 1, 5, 5)).sum().backward()
    opt.step()
    extra = {"empty": torch.empty(0, 4), "half": torch.randn(3, dtype=torch.bfloat16),
             "pair": (torch.tensor(7), "seven"), "none": None, "ints": [1, 2, torch.arange(3)]}
    return {"model": net.state_dict(), "opt": opt.state_dict(), "extra": extra}


def _assert_same_state(got, want):
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype
        assert got.shape == want.shape and torch.equal(got, want)
    elif isinstance(want, dict):
        assert type(got) is type(want) and list(got) == list(want)
        assert getattr(got, "_metadata", None) == getattr(want, "_metadata", None)
        for k in want:
            _assert_same_state(got[k], want[k])
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want)
        for a, b in zip(got, want):
            _assert_same_state(a, b)
    else:
        assert got == want


def test_packed_state_unpacks_to_the_same_state_and_its_module_loads_it():
    state = _state_with_every_kind()
    (skeleton, specs), tensors = dist_mod.pack_state(state)
    assert len(specs) == len(tensors) == 7 + 4 * 3 + 4  # conv, BN; Adam's 3 per parameter; extra
    assert all(isinstance(t, torch.Tensor) for t in tensors)
    # what travels pickled holds no tensor
    assert not any(isinstance(x, torch.Tensor) for x in _leaves(skeleton))
    back = dist_mod.unpack_state(skeleton, [t.clone() for t in tensors])
    _assert_same_state(back, state)
    assert back["model"]._metadata  # load_state_dict reads each module's version from it
    torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3)).load_state_dict(
        back["model"])
    assert LocalCollectives().broadcast_state(state) is state


def _leaves(x):
    if isinstance(x, dict):
        return [y for v in x.values() for y in _leaves(v)]
    if isinstance(x, (list, tuple)):
        return [y for v in x for y in _leaves(v)]
    return [x]


def _broadcast_state_worker(rank, world, src):
    from dadh_dist.distributed import TorchCollectives

    state = _state_with_every_kind() if rank == src else {"stale": torch.ones(2)}
    got = TorchCollectives().broadcast_state(state if rank == src else None, src=src)
    if rank == src:
        assert got is state
    want = _state_with_every_kind()
    _assert_same_state(got, want)
    assert all(t.device.type == "cpu" for t in dist_mod.pack_state(got)[1])


def test_broadcast_state_gives_every_rank_the_sources_tensors_bit_for_bit():
    run_workers(_broadcast_state_worker, 2, 1, timeout_s=30)  # the source is not rank 0


# a few steps are enough where only what the workers hold is compared
SMALL = ["train.inner_epochs=1", "train.num_samples=64", "data.database_limit=300"]


def test_logged_learning_rate_is_the_one_the_iteration_trained_with():
    """Cosine over 2 outer iterations: iteration 1 trains at lr·1, iteration 2 at lr·½; the
    value logged for step t is iteration t's, not the next one's (which is 0 after the last)."""
    cfg = _cfg(["optim.schedule=cosine", "optim.lr_f=0.002", "optim.lr_g=0.004", *SMALL])
    seen = []
    loop.train(cfg, loop.WorkerEnv(report=lambda metrics, staged: seen.append(metrics)))
    assert [(m["t"], m["lr/f"], m["lr/g"]) for m in seen] == [
        (1, pytest.approx(0.002, rel=1e-12), pytest.approx(0.004, rel=1e-12)),
        (2, pytest.approx(0.001, rel=1e-12), pytest.approx(0.002, rel=1e-12))]


def _batch_norm_streams(*args, **kwargs):
    """models.build_streams with BatchNorm (running statistics, as resnet's) for GroupNorm."""
    from torch import nn

    from dadh_dist import models

    streams = models.build_streams(*args, **kwargs)
    for stream in streams:
        layers = stream.backbone.features
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.GroupNorm):
                layers[i] = nn.BatchNorm2d(layer.num_channels)
    return streams


def _same_streams_worker(rank, world):
    from dadh_dist.distributed import ReplicaMismatch, TorchCollectives

    c = TorchCollectives()
    cfg = _cfg(SMALL)
    cfg.scaling.num_workers = world
    checked = []

    def evaluate(streams, *args, **kwargs):
        state = {**streams.f.state_dict(), **streams.g.state_dict()}
        assert any(k.endswith("running_var") for k in state)
        everything = torch.cat([v.detach().flatten().view(torch.uint8) for v in state.values()])
        c.check_identical("the streams, buffers included", everything)
        checked.append(1)
        return evaluate_loop(streams, *args, **kwargs)

    evaluate_loop = loop.evaluate
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "build_streams", _batch_norm_streams)
        mp.setattr(loop, "evaluate", evaluate)
        loop.train(cfg, loop.WorkerEnv(collectives=c, progress=False))
    assert len(checked) == 3  # validation after both iterations, the test queries at the end
    # share()'s buffer broadcast left out (the divergence it fixes): the loop's own check of
    # the streams stops every worker at the first code step, naming both streams
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "build_streams", _batch_norm_streams)
        mp.setattr(loop, "broadcast_buffers", lambda *args, **kwargs: None)
        with pytest.raises(ReplicaMismatch, match=r"^stream f's weights and buffers: worker\(s\) "
                                                  r"\[1\] .*; stream g's weights and buffers: "
                                                  r"worker\(s\) \[1\] .*; stopping"):
            loop.train(cfg, loop.WorkerEnv(collectives=c, progress=False))
    # a mismatch names the workers that differ, on every worker
    with pytest.raises(ReplicaMismatch, match=r"^Ω: worker\(s\) \[1\] hold other values than "
                                              r"worker 0 \(checksums 0: 0x[0-9a-f]+, 1: 0x"):
        c.check_identical("Ω", torch.tensor([rank]))
    # a received state's tensors own their memory: an optimiser state loaded from views of one
    # buffer would keep (and a checkpoint save) the whole buffer, the model's weights included
    got = c.broadcast_state(_state_with_every_kind() if rank == 0 else None)
    for t in dist_mod.pack_state(got)[1]:
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_every_worker_evaluates_the_same_streams_batch_norm_statistics_included():
    """Two DDP workers with BatchNorm streams: each updates the running statistics from its
    own share of the batch, yet every evaluation (each worker encodes a share of the queries)
    and the F/G refill must see the one pair rank 0 checkpoints. One 2-process gloo run (~5 s,
    most of it starting the processes) also checks check_identical's error and that
    broadcast_state hands over tensors that own their memory."""
    run_workers(_same_streams_worker, 2, timeout_s=60)


def test_state_checksum_sees_one_ulp_names_and_order_not_layout():
    """A state_dict's checksum: bytes on the CPU in the state_dict's order, so one ulp of one
    weight, a renamed or reordered entry change it; a channels_last copy (a GPU stream's
    layout) and odd dtypes and shapes do not trouble it; only tensors are hashed."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    state = net.state_dict()
    base = dist_mod.state_checksum(state)
    assert base == dist_mod.checksum(net.state_dict()) and 0 <= base < 2**63
    nudged = {**state, "0.weight": state["0.weight"].clone()}
    nudged["0.weight"].view(-1)[5] = torch.nextafter(nudged["0.weight"].view(-1)[5],
                                                     torch.tensor(float("inf")))
    assert dist_mod.state_checksum(nudged) != base
    buffer = {**state, "1.running_var": state["1.running_var"] + 1e-6}
    assert dist_mod.state_checksum(buffer) != base
    renamed = {("x" + k if k == "0.bias" else k): v for k, v in state.items()}
    assert dist_mod.state_checksum(renamed) != base
    assert dist_mod.state_checksum(dict(reversed(list(state.items())))) != base
    layout = {k: v.to(memory_format=torch.channels_last) if v.dim() == 4 else v
              for k, v in state.items()}
    assert not layout["0.weight"].is_contiguous()
    assert dist_mod.state_checksum(layout) == base
    odd = {"bf16": torch.ones(3, dtype=torch.bfloat16), "scalar": torch.tensor(2),
           "empty": torch.empty(0, 5)}
    assert dist_mod.state_checksum(odd) != dist_mod.state_checksum({**odd, "scalar":
                                                                    torch.tensor(3)})
    with pytest.raises(TypeError, match="entry 'note' is a str, not a tensor"):
        dist_mod.state_checksum({"note": "x"})
    # one process has nothing to compare with, and hashes nothing
    assert LocalCollectives().check_parts_identical({"x": {"note": "x"}}) is None


def _named_parts_worker(rank, world):
    from dadh_dist.distributed import ReplicaMismatch, TorchCollectives

    c = TorchCollectives()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))

    def parts(net_differs: bool, tensor_differs: bool) -> dict:
        state = net.state_dict()
        if net_differs and rank == 1:
            state = {**state, "1.running_mean": state["1.running_mean"] + 1}
        return {"a tensor": torch.arange(4.0) + (rank if tensor_differs else 0),
                "the net": state, "another": torch.tensor([rank == 1 and tensor_differs])}

    gathers, all_gather = [], dist_mod.dist.all_gather
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dist_mod.dist, "all_gather",
                   lambda *args, **kwargs: gathers.append(1) or all_gather(*args, **kwargs))
        c.check_parts_identical(parts(False, False))  # identical: passes on every rank
    assert len(gathers) == 1  # three parts, one collective
    hexa = r"0x[0-9a-f]+"
    with pytest.raises(ReplicaMismatch) as raised:
        c.check_parts_identical(parts(True, False))
    assert re.fullmatch(rf"the net: worker\(s\) \[1\] hold other values than worker 0 "
                        rf"\(checksums 0: {hexa}, 1: {hexa}\); stopping instead of diverging",
                        str(raised.value)), str(raised.value)
    with pytest.raises(ReplicaMismatch) as raised:
        c.check_parts_identical(parts(True, True))
    assert re.fullmatch(r"a tensor: worker\(s\) \[1\] .*\); the net: worker\(s\) \[1\] .*\); "
                        r"another: worker\(s\) \[1\] .*\); stopping instead of diverging",
                        str(raised.value)), str(raised.value)
    for stream_parallel in (False, True):
        _nudged_g_stops_the_loop(c, world, stream_parallel)


def _nudged_g_stops_the_loop(c, world, stream_parallel):
    """The whole loop: one ulp of one weight of g on rank 1, after share(), stops every worker
    at the first code step, naming g and the rank only; without it the run passes every
    outer iteration's check, both streams' included."""
    from dadh_dist.distributed import ReplicaMismatch

    share = loop.Streams.share

    def share_then_nudge(self, c):
        share(self, c)
        if c.rank == 1:
            with torch.no_grad():
                w = next(self.g.parameters()).view(-1)
                w[0] = torch.nextafter(w[0], torch.tensor(float("inf")))

    cfg = _cfg(SMALL)
    cfg.scaling.num_workers = world
    cfg.scaling.stream_parallel = stream_parallel
    reports, checked = [], []
    env = loop.WorkerEnv(collectives=c, progress=False,
                         report=lambda metrics, staged: reports.append(metrics))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop.Streams, "share", share_then_nudge)
        with pytest.raises(ReplicaMismatch) as raised:
            loop.train(cfg, env)
    assert re.fullmatch(r"stream g's weights and buffers: worker\(s\) \[1\] hold other values "
                        r"than worker 0 \(checksums 0: 0x[0-9a-f]+, 1: 0x[0-9a-f]+\); "
                        r"stopping instead of diverging", str(raised.value)), \
        (stream_parallel, str(raised.value))
    assert reports == []  # stopped at the first outer iteration's code step
    check = c.check_parts_identical

    def recording(parts):
        checked.append(list(parts))
        return check(parts)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(c, "check_parts_identical", recording)
        loop.train(cfg, env)
    assert [m["t"] for m in reports] == [1, 2]
    assert checked == [["stream f's weights and buffers", "stream g's weights and buffers",
                        "the code step's inputs (F, G, Ω, r)"]] * 2


def test_stream_weights_are_compared_with_the_code_steps_inputs_in_one_gather():
    """check_parts_identical on 2 gloo processes: identical parts pass, each differing part is
    named with its ranks; in the loop (plain DDP and stream-parallel) one ulp of one weight of
    g on rank 1 stops both workers with g and rank 1 named, and an unnudged run passes."""
    run_workers(_named_parts_worker, 2, timeout_s=30)
