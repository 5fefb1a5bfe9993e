"""The per-worker training function: train streams → update B → evaluate → report/checkpoint.

`train(cfg, env)` runs the alternating optimisation of docs/design.md §2 on one worker. Everything
that differs between one process and a Ray Train worker group arrives in `WorkerEnv`: the
collectives, the device, how to report (and checkpoint), and which checkpoint to resume from. Every
collective is called on every rank; files are written by rank 0 only.

Per outer iteration t (identical on every worker):
  1. Ω_t: m database indices, a pure function of (seed, t).
  2. The F/G buffers are filled by a forward pass over Ω, then T_in epochs of mini-batch steps
     update both streams (DDP averages the gradients) and all-gather the batch outputs.
  3. The code step: each worker holds only its block of B's rows (`blocks`) and solves it; no
     rows of B are exchanged. The code step's inputs and both streams' weights and buffers
     are compared across workers, and each block is re-hashed before it is used again (a
     block changed in memory stops the run).
  4. Validation (and, at the end, test) mAP, sharded by database rows: per-block distance
     histograms are gathered, so every worker ranks all queries against its own block.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dadh_dist import blocks, faults, health, retrieval
from dadh_dist import checkpoint as ckpt
from dadh_dist import objective as obj
from dadh_dist.config import Config
from dadh_dist.data import Dataset, Split, load_dataset
from dadh_dist.data.per_worker import load_block
from dadh_dist.distributed import (
    LocalCollectives,
    StreamGroup,
    broadcast_buffers,
    even_split,
    wrap_ddp,
)
from dadh_dist.encoding import encode, query_codes, stream_outputs
from dadh_dist.models import build_streams
from dadh_dist.monitor import Monitor, progress_bar


@dataclass
class WorkerEnv:
    """What the loop needs from its surroundings (one process, a Ray worker, a test)."""

    collectives: object = field(default_factory=LocalCollectives)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict, Path | None], None] = lambda metrics, folder: None
    """Called once per outer iteration on every rank with this rank's part of the checkpoint
    (its block of B; rank 0's also holds the state and the manifest), or None between
    checkpoints. The parts merged into one folder are the checkpoint (Ray Train merges them)."""
    resume_from: Path | None = None
    run_dir: Path | None = None
    """Folder for TensorBoard and final metrics (written by rank 0)."""
    dataset: Dataset | None = None
    """A whole dataset already in memory (tests); loaded from the config otherwise."""
    publish: Callable[[], object] | None = None
    """Rank 0 calls it after every outer iteration and at the end: sends run_dir's new files on
    to a remote run folder (storage.Publisher)."""
    progress: bool = True
    """Rank 0's per-batch progress bar, where stderr is a terminal (train --quiet: off)."""
    report_restored: bool = False
    """A resumed run first reports its restored iteration's validation once more (no checkpoint,
    nothing logged): a scheduler that decides at fixed iterations (a Tune trial's ASHA) may have
    missed that report when the sweep was interrupted after the checkpoint was written."""


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite."""


def seed_for(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (independent streams for Ω, shuffles, B)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


PERMUTE_MAX = 1 << 24
"""Up to this many database rows Ω is the head of a permutation of all n (O(n) memory: 128 MiB
of int64 at the limit); above it, Floyd's sampler draws Ω in O(m)."""


def sample_omega(seed: int, t: int, n: int, m: int) -> torch.Tensor:
    """Ω_t: m distinct database indices in random order, the same on every worker."""
    gen = torch.Generator().manual_seed(seed_for(seed, 1, t))
    if n <= PERMUTE_MAX or m > n // 2:
        return torch.randperm(n, generator=gen)[:m]
    return _floyd(gen, n, m)


def _floyd(gen: torch.Generator, n: int, m: int) -> torch.Tensor:
    """m distinct values of range(n), uniformly (Floyd's algorithm), then shuffled: O(m)."""
    tops = torch.arange(n - m + 1, n + 1, dtype=torch.float64)  # j + 1 for j in n-m .. n-1
    draws = (torch.rand(m, generator=gen, dtype=torch.float64) * tops).long()
    draws = torch.minimum(draws, tops.long() - 1).tolist()  # u < 1, but rounding could reach j+1
    taken: set[int] = set()
    picked = []
    for j, d in zip(range(n - m, n), draws):
        value = j if d in taken else d
        taken.add(value)
        picked.append(value)
    order = torch.randperm(m, generator=gen)
    return torch.tensor(picked, dtype=torch.int64)[order]


class Streams:
    """f and g with their DDP wrappers, optimisers and schedulers."""

    def __init__(self, cfg: Config, data: Dataset, device: torch.device,
                 group: StreamGroup | None = None, pretrained: bool = True):
        """`pretrained`: load model.pretrained_path (a resume does not: the checkpoint's
        weights replace them, and the file may have moved since)."""
        m = cfg.model
        self.group = group  # stream-parallel: the half of the workers this one trains with
        self.f, self.g = build_streams(
            cfg.objective.bits, data.channels, data.image_size, backbone=m.backbone,
            width=m.width, input_size=m.input_size,
            pretrained_path=m.pretrained_path if pretrained else "",
            two_streams=cfg.objective.two_streams, seed=cfg.train.seed, norm=m.norm)
        self.f.to(device)
        if self.g is not None:
            self.g.to(device)
        if device.type == "cuda":
            self.f.to(memory_format=torch.channels_last)
            if self.g is not None:
                self.g.to(memory_format=torch.channels_last)
        # every worker holds both streams (evaluation, checkpoints); a stream-parallel worker
        # trains only its half's, under DDP within that half
        self.trains_f = group is None or group.stream == "f"
        self.trains_g = self.g is not None and (group is None or group.stream == "g")
        self.f_train = wrap_ddp(self.f, device, group) if self.trains_f else None
        self.g_train = wrap_ddp(self.g, device, group) if self.trains_g else None
        o = cfg.optim
        self.opt_f = self._optimizer(self.f, o.lr_f, cfg)
        self.opt_g = self._optimizer(self.g, o.lr_g, cfg) if self.g is not None else None
        total = cfg.train.outer_iters

        def lr_factor(t: int) -> float:
            if o.schedule == "cosine":
                return 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
            return 1.0

        self.sched_f = torch.optim.lr_scheduler.LambdaLR(self.opt_f, lr_factor)
        self.sched_g = (
            torch.optim.lr_scheduler.LambdaLR(self.opt_g, lr_factor) if self.opt_g else None
        )

    @staticmethod
    def _optimizer(module, lr: float, cfg: Config):
        o = cfg.optim
        if o.optimizer == "sgd":
            return torch.optim.SGD(module.parameters(), lr=lr, momentum=o.momentum,
                                   weight_decay=o.weight_decay)
        return torch.optim.Adam(module.parameters(), lr=lr, weight_decay=o.weight_decay)

    def state(self) -> dict:
        out = {"f": self.f.state_dict(), "opt_f": self.opt_f.state_dict(),
               "sched_f": self.sched_f.state_dict()}
        if self.g is not None:
            out.update(g=self.g.state_dict(), opt_g=self.opt_g.state_dict(),
                       sched_g=self.sched_g.state_dict())
        return out

    def load(self, state: dict) -> None:
        self.f.load_state_dict(state["f"])
        self.opt_f.load_state_dict(state["opt_f"])
        self.sched_f.load_state_dict(state["sched_f"])
        if self.g is not None:
            self.g.load_state_dict(state["g"])
            self.opt_g.load_state_dict(state["opt_g"])
            self.sched_g.load_state_dict(state["sched_g"])

    def share(self, c) -> None:
        """After an outer iteration's steps every worker takes each stream from one source, so
        the F/G refill, the evaluation (each worker encodes its share of the queries) and rank
        0's checkpoint all see the same pair. Plain DDP keeps weights and optimiser states
        identical, but not BatchNorm's running statistics: each worker updates them from its
        own share of the last mini-batch, and DDP sends rank 0's only at the next forward; here
        rank 0's go to every worker at once. Stream-parallel: each half's stream (weights,
        buffers and optimiser state) goes from its leader to every other worker, of both
        halves. Schedulers step on every worker alike."""
        if self.group is None:
            for module in (self.f, self.g):
                if module is not None and c.world_size > 1:
                    broadcast_buffers(c, module, src=0)
            return
        for name in ("f", "g"):
            module, opt = getattr(self, name), getattr(self, f"opt_{name}")
            src = self.group.leaders[name]
            mine = {"model": module.state_dict(), "opt": opt.state_dict()} if c.rank == src \
                else None
            state = c.broadcast_state(mine, src=src)
            if c.rank != src:
                module.load_state_dict(state["model"])
                opt.load_state_dict(state["opt"])

    def step_schedulers(self) -> None:
        """Both schedules step on every worker alike. Under stream-parallel the other half's
        optimiser never steps here (its state arrives through share()), which torch takes for
        a scheduler stepped before its optimiser: that one warning is not a fault here."""
        for sched, trained in ((self.sched_f, self.trains_f), (self.sched_g, self.trains_g)):
            if sched is None:
                continue
            if trained:
                sched.step()
                continue
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=UserWarning,
                                        message=r"Detected call of `lr_scheduler\.step\(\)`")
                sched.step()

    def lrs(self) -> dict[str, float]:
        out = {"lr/f": self.opt_f.param_groups[0]["lr"]}
        if self.opt_g is not None:
            out["lr/g"] = self.opt_g.param_groups[0]["lr"]
        return out


def encode_sharded(module, images, env: WorkerEnv, batch: int, amp: bool) -> torch.Tensor:
    """Each worker encodes its share of the images; every worker gets all outputs, in order."""
    c = env.collectives
    share = even_split(images.shape[0], c.world_size, c.rank)
    return c.all_gather_rows(encode(module, images[share], env.device, batch, amp))


def evaluate(
    streams: Streams, split, block: blocks.Block, labels_rows: np.ndarray, cfg: Config,
    env: WorkerEnv, with_curves: bool = False,
) -> dict:
    """mAP@all (and @k), P@N per encoder, sharded by database rows: each worker encodes a share
    of the queries, every worker ranks all of them against its own block of B, and per-block
    distance histograms and partial AP sums combine into the single-process values
    (`retrieval.block_histograms`, docs/design.md §3.8)."""
    c = env.collectives
    share = even_split(split.images.shape[0], c.world_size, c.rank)
    images = torch.from_numpy(split.images[share])
    # fp32 whatever train.amp: the reported metrics are what evaluate and encode reproduce
    # (bf16 outputs change the sign of some near-0 units: 6.6% of rows' codes, measured on CPU)
    outputs = stream_outputs(streams.f, streams.g, images, cfg.eval.encoders, env.device,
                             cfg.eval.batch_size, amp=False)
    B_rows, n = block.B.numpy(), block.n
    limit = cfg.eval.topk or None
    db_distinct = blocks.distinct_codes(c, block)[0] if with_curves else None
    out: dict = {}
    for enc in cfg.eval.encoders:
        mine = torch.from_numpy(query_codes(outputs, enc)).float()
        q = c.all_gather_rows(mine).to(torch.int8).numpy()  # every query, on every worker
        hist = retrieval.block_histograms(q, B_rows, split.labels, labels_rows,
                                          single=block.single)
        every = c.all_gather_rows(torch.from_numpy(hist).unsqueeze(0)).numpy()
        items_before, hits_before = retrieval.block_offsets(every, c.rank)
        partial = retrieval.block_rank_sums(
            q, B_rows, split.labels, labels_rows, items_before, hits_before,
            limit=limit, ns=[cfg.eval.precision_at], single=block.single)
        summed = c.all_reduce_sum(torch.from_numpy(partial)).numpy()
        per = retrieval.combine_rank_sums(summed, every, n, cfg.eval.precision_at, limit)
        out[f"map_all_{enc}"] = float(per["ap_all"].mean())
        if cfg.eval.topk:
            out[f"map_at_{cfg.eval.topk}_{enc}"] = float(per["ap_topk"].mean())
        out[f"p_at_{cfg.eval.precision_at}_{enc}"] = float(per["p_at_n"].mean())
        if with_curves:
            counts, hits = every[:, :, 0].sum(0), every[:, :, 1].sum(0)
            out[f"distinct_query_codes_{enc}"] = health.distinct_codes(q)
            chance = health.chance_of(hits.sum(1), n)  # from the relevant counts per query
            out["chance_map"] = chance  # the same for every encoder
            warning = health.collapse_warning(q, None, split.labels, None,
                                              out[f"map_all_{enc}"], db_distinct=db_distinct,
                                              db_rows=n, chance=chance)
            if warning:
                out[f"_warning_{enc}"] = warning
            if c.rank == 0:
                out[f"_pr_{enc}"] = retrieval.precision_recall_from_histograms(counts, hits)
    return out


def _agree_finite(finite: list[bool], terms: dict[str, torch.Tensor], t: int, step: int,
                  rank: int, skip_allowed: bool = False) -> bool:
    """Every worker's finite flag for one mini-batch (exchanged with the outputs, so all agree
    before any update). Returns True when the mini-batch is finite everywhere; False when it is
    to be skipped by every worker (only if `skip_allowed`); otherwise raises NonFiniteLoss on
    every worker, with context. `t` and `step` (the mini-batch's index in the outer iteration,
    skipped ones included) count from 0; the message counts both from 1, as the progress line
    and the per-batch bar do."""
    if all(finite):
        return True
    if skip_allowed:
        return False
    bad = [r for r, ok in enumerate(finite) if not ok]
    detail = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
    raise NonFiniteLoss(
        f"non-finite loss on worker(s) {bad} at outer iteration {t + 1}, step {step + 1} "
        f"(worker {rank}'s terms: {detail})")


def _exchange(c, om: _Omega, batch: torch.Tensor, mine: torch.Tensor, finite: torch.Tensor):
    """Start a mini-batch step's one collective: every worker's outputs for its share of the
    batch, with its finite flag (a 0-d bool tensor, still on the device) as one extra row.
    Returns a function that waits for it and gives the outputs in rank order and every
    worker's flag: the step's one read of the device by the host. Shares are the even split
    of the batch over each stream's workers, so every rank knows every rank's row count."""
    shares = [even_split(batch.shape[0], om.share_world, r % om.share_world)
              for r in range(c.world_size)]
    counts = [share.stop - share.start + 1 for share in shares]
    flag = finite.to(mine.device, mine.dtype).reshape(1, 1).expand(1, mine.shape[1])
    started = c.start_gather_rows(torch.cat([mine.detach(), flag]), counts)

    def result() -> tuple[torch.Tensor, list[bool]]:
        got = started()
        ends = np.cumsum(counts).tolist()
        flags = (got[[end - 1 for end in ends], 0] > 0.5).tolist()
        return torch.cat([got[end - n : end - 1] for n, end in zip(counts, ends)]), flags

    return result


@dataclass
class _Omega:
    """What the mini-batch steps of one outer iteration share: Ω's images and similarities, and
    the F/G buffers (m, k) every step refreshes on every worker."""

    images: torch.Tensor
    """(m, C, H, W) uint8, Ω's images in Ω's order."""
    sim: obj.SoftSimilarity
    stats: obj.CodeStats
    S01: torch.Tensor
    """(m, m) 0/1 similarity within Ω, for L_pair."""
    B_omega: torch.Tensor
    F: torch.Tensor
    G: torch.Tensor | None
    share_world: int
    """Workers a global mini-batch is split over: all of them, or this stream's half."""
    share_rank: int
    amp: bool
    """bf16 autocast (train.amp on a GPU)."""


def train_streams(run: _Run, omega: torch.Tensor, y_omega: torch.Tensor, t: int, cfg: Config,
                  env: WorkerEnv,
                  ) -> tuple[torch.Tensor, torch.Tensor | None, obj.SoftSimilarity, dict]:
    """T_in epochs over Ω (y_omega: its labels); returns the F, G buffers (m, k), Ω's
    similarity and the loss terms with the learning rates they were trained at."""
    c, tr = env.collectives, cfg.train
    om = _open_omega(run, omega, y_omega, t, cfg, env)
    m, bsz = omega.shape[0], tr.batch_size
    sums: dict[str, torch.Tensor] = {}
    steps = skipped = seen = 0
    t0 = time.time()
    # rate and ETA of this outer iteration's mini-batches, on rank 0's terminal only (a Ray
    # worker's or a redirected stderr is no terminal: the progress line per iteration remains)
    bar = progress_bar(tr.inner_epochs * math.ceil(m / bsz), f"iter {t + 1}",
                       c.rank == 0 and env.progress, unit="batch", leave=False)
    for epoch in range(tr.inner_epochs):
        perm = torch.randperm(m, generator=torch.Generator().manual_seed(
            seed_for(tr.seed, 2, t, epoch)))
        for start in range(0, m, bsz):
            batch = perm[start : start + bsz]  # Ω positions of the global mini-batch
            skip_allowed = tr.nonfinite == "skip" and skipped < tr.max_skipped
            try:
                terms = _step(run, om, batch, t, steps + skipped, env, skip_allowed)
            except NonFiniteLoss as e:
                if tr.nonfinite != "skip":
                    raise
                raise NonFiniteLoss(f"{e}; train.nonfinite = skip had already dropped "
                                    f"train.max_skipped = {tr.max_skipped} mini-batch(es) of "
                                    "this outer iteration") from None
            bar.update()
            if terms is None:  # every worker dropped it: no update, F/G rows keep their values
                skipped += 1
                continue
            for k, v in terms.items():  # summed where they are: no host sync per step
                sums[k] = sums.get(k, 0.0) + v.detach().double()
            steps += 1
            seen += batch.shape[0]
    bar.close()
    run.streams.share(c)
    seconds = time.time() - t0
    keys = sorted(sums)
    totals = c.all_reduce_sum(torch.stack([sums[k] for k in keys]).cpu()) if keys else []
    metrics = {f"loss/{k}": float(v) / max(steps, 1) for k, v in zip(keys, totals)}
    w = run.weights
    metrics["loss/total"] = sum(
        weight * metrics.get(f"loss/{term}_{s}", 0.0)
        for term, weight in (("pair", w.alpha), ("quant", w.gamma), ("code", w.eta))
        for s in ("f", "g")
    )
    metrics["perf/images_per_s"] = seen * (2 if om.G is not None else 1) / max(seconds, 1e-9)
    metrics.update(run.streams.lrs())  # the rates these steps took, before the schedules move
    if tr.nonfinite == "skip":
        metrics["train/skipped_batches"] = float(skipped)
    return om.F.float().cpu(), (om.G.float().cpu() if om.G is not None else None), om.sim, metrics


def _open_omega(run: _Run, omega: torch.Tensor, y_omega: torch.Tensor, t: int, cfg: Config,
                env: WorkerEnv) -> _Omega:
    """Ω's similarities and code statistics (once per outer iteration, §2: no n×m matrix) and
    the F/G buffers filled by a forward pass over Ω."""
    c, dev = env.collectives, env.device
    amp = cfg.train.amp == "bf16" and dev.type == "cuda"
    # B's statistics from every block (one all-reduce; nothing of size n leaves a worker)
    blocks.verify(c, run.block, f"before outer iteration {t + 1}")
    stats, sim = blocks.code_stats(c, run.block, cfg.objective.similarity, y_omega,
                                   run.labels_rows, cfg.codes.chunk_rows)
    # Ω's images from their owners: a worker holds only its own block's
    images = blocks.gather_owned(c, run.block, run.data.database.images, omega)
    streams, group = run.streams, run.streams.group
    F = encode_sharded(streams.f, images, env, cfg.eval.batch_size, amp).to(dev)
    G = (encode_sharded(streams.g, images, env, cfg.eval.batch_size, amp).to(dev)
         if streams.g is not None else None)
    return _Omega(
        images=images, sim=sim,
        stats=stats.to(dev), S01=obj.similar01(y_omega, y_omega).to(dev),
        B_omega=blocks.gather_rows(c, run.block, omega).float().to(dev),
        F=F, G=G,
        share_world=group.size if group is not None else c.world_size,
        share_rank=c.rank - group.leaders[group.stream] if group is not None else c.rank,
        amp=amp)


def _step(run: _Run, om: _Omega, batch: torch.Tensor, t: int, step: int, env: WorkerEnv,
          skip_allowed: bool) -> dict[str, torch.Tensor] | None:
    """One global mini-batch (Ω positions `batch`): this worker's share of the forward pass,
    each stream's loss, the optimiser steps, and the exchange that refreshes F and G on every
    worker. Returns the loss terms, or None when every worker dropped a non-finite batch."""
    c, dev = env.collectives, env.device
    streams, group = run.streams, run.streams.group
    rows = batch[even_split(batch.shape[0], om.share_world, om.share_rank)]
    rows_dev = rows.to(dev)
    x = om.images[rows].to(dev, non_blocking=True)
    with torch.autocast(dev.type, torch.bfloat16, enabled=om.amp):
        F_M = streams.f_train(x).float() if streams.trains_f else None
        G_M = streams.g_train(x).float() if streams.trains_g else None
    if step == 0:
        if F_M is not None:
            F_M = run.faults.poison(t, F_M)
        else:
            G_M = run.faults.poison(t, G_M)
    # each stream's loss against the other's buffer from before this step: f's and g's steps
    # are independent, which is what lets two worker halves take them at once
    loss = torch.zeros((), device=dev)
    terms: dict[str, torch.Tensor] = {}
    if F_M is not None:
        loss_f, terms_f = obj.stream_loss(
            F_M, om.G, om.S01[rows_dev] if om.G is not None else None, om.B_omega[rows_dev],
            om.stats, rows_dev, run.weights, batch.shape[0])
        loss = loss + loss_f
        terms.update({f"{k}_f": v for k, v in terms_f.items()})
    if G_M is not None:
        loss_g, terms_g = obj.stream_loss(G_M, om.F, om.S01[rows_dev], om.B_omega[rows_dev],
                                          om.stats, rows_dev, run.weights, batch.shape[0])
        loss = loss + loss_g
        terms.update({f"{k}_g": v for k, v in terms_g.items()})
    if group is not None:  # the other half's terms count as zero here (summed over workers)
        for k in list(terms):
            other = k[:-1] + ("g" if k.endswith("_f") else "f")
            terms.setdefault(other, torch.zeros_like(terms[k]))
    # one flag for all terms, left on the device: the exchange carries it, so the host waits
    # for the device once a step (reading every worker's flag), not once per term
    finite = torch.stack([torch.isfinite(v).all() for v in terms.values()]).all()
    if group is None:  # every worker's rows of both streams' outputs, side by side
        mine = F_M if G_M is None else torch.cat([F_M, G_M], dim=1)
    else:  # each worker's own stream's rows; rank order: f's half's, then g's half's
        mine = F_M if F_M is not None else G_M
    exchanged = _exchange(c, om, batch, mine.float(), finite)
    trained = [o for o, on in ((streams.opt_f, streams.trains_f),
                               (streams.opt_g, streams.trains_g)) if on]
    for opt in trained:
        opt.zero_grad(set_to_none=True)
    # the backward pass runs while the outputs travel; the update waits for every worker's
    # flag. DDP averages gradients over the share's workers; each share is already divided by
    # the global batch size, so scaling by their count makes the average equal the one-process
    # gradient.
    (loss * om.share_world).backward()
    outputs, finite_on = exchanged()
    if not _agree_finite(finite_on, terms, t, step, c.rank, skip_allowed=skip_allowed):
        for opt in trained:  # a non-finite batch leaves no gradient behind
            opt.zero_grad(set_to_none=True)
        return None
    for opt in trained:
        opt.step()
    # the buffers take the outputs from before this step, the same on every worker
    k = om.F.shape[1]
    if group is None:
        om.F[batch] = outputs[:, :k]
        if om.G is not None:
            om.G[batch] = outputs[:, k:]
    else:
        om.F[batch], om.G[batch] = outputs[: batch.shape[0]], outputs[batch.shape[0] :]
    return terms


def code_step_inputs(F: torch.Tensor, G: torch.Tensor | None, omega: torch.Tensor,
                     r: float) -> torch.Tensor:
    """The bytes every worker's code step starts from, each tensor in its own dtype (Ω cast to
    float32 would round indices above 2^24), for `check_identical`."""
    parts = [F, G, omega, torch.tensor([r], dtype=torch.float64)]
    return torch.cat([t.detach().contiguous().flatten().view(torch.uint8)
                      for t in parts if t is not None])


def replicated_parts(streams: Streams, F: torch.Tensor, G: torch.Tensor | None,
                     omega: torch.Tensor, r: float) -> dict:
    """What every worker must hold alike once the streams are shared, by name, for
    `check_parts_identical`: each stream's weights and persistent buffers (what evaluation
    encodes with and rank 0 checkpoints; a BatchNorm statistic left to diverge passes every
    other check) and the code step's inputs."""
    parts = {"stream f's weights and buffers": streams.f.state_dict()}
    if streams.g is not None:
        parts["stream g's weights and buffers"] = streams.g.state_dict()
    parts["the code step's inputs (F, G, Ω, r)"] = code_step_inputs(F, G, omega, r)
    return parts


def update_codes(run: _Run, F: torch.Tensor, G: torch.Tensor | None, omega: torch.Tensor,
                 labels_omega: torch.Tensor, *, sim, t: int, cfg: Config, env: WorkerEnv,
                 ) -> dict:
    """Each worker solves its own block of B's rows (all k bits) and keeps it: no gather."""
    c = env.collectives
    # the block follows from these and the block's previous rows, the evaluation and the
    # checkpoint from the streams: all workers must agree on them (one all-gather; not in
    # codes/seconds, which hashing two resnet18 streams, ~0.1 s on a CPU core, would swamp)
    c.check_parts_identical(replicated_parts(run.streams, F, G, omega, sim.r))
    t0 = time.time()
    w = run.weights
    B_new = blocks.solve(run.block, F, G, omega, labels_omega, run.labels_rows, sim,
                         gamma=w.gamma, eta=w.eta, bits=cfg.objective.bits,
                         sweeps=cfg.codes.sweeps, chunk_rows=cfg.codes.chunk_rows)
    run.faults.kill("codes", t)
    metrics = blocks.update(c, run.block, B_new)
    run.faults.flip(t, run.block.B)
    quant_g = {} if G is None else {"codes/quant_error_g": _quant_error(G)}
    return {**metrics, "codes/seconds": time.time() - t0,
            "codes/quant_error": _quant_error(F),  # stream f's (ADSH has only f)
            **quant_g}


def _quant_error(X: torch.Tensor) -> float:
    """Mean squared distance of a stream's outputs from their signs."""
    return float(((torch.sign(X) - X) ** 2).mean())


INIT_CHUNK = 1 << 16
"""Rows per random stream of codes.init = random: a row's code depends on (seed, its chunk),
not on which worker draws it."""


def initial_rows(cfg: Config, rows: slice) -> torch.Tensor:
    """The initial codes of rows [start, stop): zeros, or ±1 drawn chunk by chunk."""
    start, stop = rows.start, rows.stop
    k = cfg.objective.bits
    if cfg.codes.init != "random":
        return torch.zeros(stop - start, k, dtype=torch.int8)
    out = torch.empty(stop - start, k, dtype=torch.int8)
    for chunk in range(start // INIT_CHUNK, -(-stop // INIT_CHUNK)):
        gen = torch.Generator().manual_seed(seed_for(cfg.train.seed, 3, chunk))
        drawn = torch.where(torch.rand(INIT_CHUNK, k, generator=gen) < 0.5, -1, 1).to(torch.int8)
        lo, hi = max(start, chunk * INIT_CHUNK), min(stop, (chunk + 1) * INIT_CHUNK)
        out[lo - start : hi - start] = drawn[lo - chunk * INIT_CHUNK : hi - chunk * INIT_CHUNK]
    return out


def seed_global_rng(cfg: Config, t: int, rank: int) -> None:
    """Reseed torch's global generators (CPU and CUDA: dropout in the torchvision backbones)
    from (seed, t, rank) at the start of outer iteration t.

    Their state is the only per-rank state of a worker. Deriving it instead of checkpointing it
    makes the resume rule hold for any worker count: a run resumed at t with W workers draws
    what a straight run with W workers draws from t on, whatever W wrote the checkpoint.
    """
    torch.manual_seed(seed_for(cfg.train.seed, 4, t, rank))


WALL_KEY = "wall_s"
"""The checkpoint state's training wall time up to its iteration, summed over the run's attempts
(s): a resumed run's time/wall_s goes on from it."""


@dataclass
class _Run:
    """One worker's state of a run, as `_start` opens it."""

    data: Dataset
    """Query and validation whole; database: only the block's rows [block.start, block.stop)."""
    monitor: Monitor
    streams: Streams
    weights: obj.LossWeights
    faults: faults.Faults
    block: blocks.Block
    """This worker's rows of B (n, k): the only codes it holds."""
    labels_rows: torch.Tensor
    """(rows, c) the database labels of the block's rows."""
    t_start: int
    """The outer iteration this attempt starts at (> 0: resumed)."""
    wall_s: float
    """Training wall time of the iterations before t_start, summed over the run's attempts
    (from the checkpoint; 0 for a fresh run or a checkpoint from before it was kept)."""
    notes: list[str] = field(default_factory=list)
    """What the config asks beyond this database, and how the run takes it (`beyond_database`);
    printed once and kept in final_metrics.json."""


def train(cfg: Config, env: WorkerEnv) -> dict:
    """Run (or resume) the whole alternating optimisation on this worker; returns metrics.

    Per outer iteration t: sample Ω → train the streams → code step → evaluate → report (and
    checkpoint). A run that had already finished reports its final state once more.
    """
    c = env.collectives
    run = _start(cfg, env)
    n = run.block.n
    m = min(cfg.train.num_samples, n)
    T = cfg.train.outer_iters
    if run.t_start >= T:  # nothing is trained again: the training's wall time stays as it was
        metrics = {"t": T, **_evaluate(run, cfg, env, T - 1), "time/wall_s": run.wall_s}
        _report(run, cfg, env, T - 1, metrics, checkpoint=False)
        return _finish(run, cfg, env, metrics)
    wall0 = time.time() - run.wall_s  # the clock goes on from the checkpoint's
    if run.t_start > 0 and env.report_restored:
        env.report(_flat({"t": run.t_start, **_evaluate(run, cfg, env, run.t_start - 1)}), None)
    for t in range(run.t_start, T):
        seed_global_rng(cfg, t, c.rank)
        omega = sample_omega(cfg.train.seed, t, n, m)
        run.faults.kill("streams", t)
        run.faults.lose_node(t)
        # Ω's labels from their rows' owners: a worker holds only its own block's labels
        y_omega = blocks.gather_label_rows(c, run.block, run.labels_rows, omega)
        F, G, sim, net = train_streams(run, omega, y_omega, t, cfg, env)
        code_metrics = update_codes(run, F, G, omega, y_omega, sim=sim, t=t, cfg=cfg, env=env)
        run.streams.step_schedulers()
        metrics = {"t": t + 1, **net, **code_metrics, **_evaluate(run, cfg, env, t),
                   "time/wall_s": time.time() - wall0}
        _report(run, cfg, env, t, metrics, checkpoint=(
            t == T - 1 or (t + 1) % cfg.train.checkpoint_every == 0))
    return _finish(run, cfg, env, metrics)


def _start(cfg: Config, env: WorkerEnv) -> _Run:
    """Data, monitor, streams and B of this worker: fresh, or from `env.resume_from`."""
    c = env.collectives
    if env.dataset is None and cfg.data.per_worker:
        data, rows, n = load_block(cfg.data, c)  # only this worker's rows are read
    else:
        whole = env.dataset if env.dataset is not None else load_dataset(cfg.data)
        data, rows, n = _block_of(whole, c)
    group = None
    if cfg.scaling.stream_parallel:
        if c.world_size < 2 or c.world_size % 2:
            raise RuntimeError(f"scaling.stream_parallel: {c.world_size} worker(s) started; "
                               "it needs an even number >= 2")
        group = c.stream_group()
    streams = Streams(cfg, data, env.device, group, pretrained=env.resume_from is None)
    t_start, wall_s, resumed = 0, 0.0, None
    if env.resume_from is not None:
        state, manifest = ckpt.load(env.resume_from, codes=False)
        shape = ckpt.codes_shape(manifest, state)
        if tuple(shape) != (n, cfg.objective.bits):
            raise ckpt.CheckpointError(
                f"{env.resume_from}: its B is {tuple(shape)} but this run's database and bits "
                f"give {(n, cfg.objective.bits)}; the data changed under the run (use another "
                "log.name)")
        streams.load(state)
        # this worker's rows, from whichever blocks the writing run's split put them in
        B_rows = ckpt.load_rows(env.resume_from, manifest, state, rows.start, rows.stop)
        t_start = int(state["t"])
        wall_s = float(state.get(WALL_KEY, 0.0))
        resumed = (f"resumed from {env.resume_from.name} after outer iteration {t_start} "
                   f"(written by {state.get('workers', '?')} worker(s)), now {c.world_size} "
                   "worker(s)")
        T = cfg.train.outer_iters
        if t_start >= T:  # a rerun of a finished run: say that nothing is trained
            resumed = (f"the run had already finished ({env.resume_from.name}, {t_start}/{T} "
                       "outer iterations): nothing to train; its final state is evaluated "
                       "and reported again")
        del state
    else:
        B_rows = initial_rows(cfg, rows)
    # a finished run, run again, logs nothing: its events are all there (a writer opened at
    # t_start would hide the last step's)
    monitor = Monitor(env.run_dir, c.rank == 0,
                      cfg.log.tensorboard and t_start < cfg.train.outer_iters, cfg.to_toml(),
                      resumed_at=t_start)
    if resumed:
        monitor.progress(resumed)
    labels_rows = torch.from_numpy(data.database.labels)
    block = blocks.open_block(c, B_rows, rows, n, labels_rows)
    monitor.progress(
        f"{data.name}: {data.query.labels.shape[0]} queries, {data.validation.labels.shape[0]} "
        f"validation, {n} database; {cfg.objective.bits} bits; {c.world_size} worker(s)"
        + (f" (stream-parallel: {group.size} per stream)" if group is not None else "")
        + (f"; {data.skipped} bad images skipped" if getattr(data, "skipped", 0) else ""))
    notes = beyond_database(cfg, n)
    for line in notes:
        monitor.progress(f"note: {line}")
    return _Run(data=data, monitor=monitor, streams=streams,
                weights=obj.LossWeights.from_config(cfg.objective),
                faults=faults.Faults(c.rank, env.run_dir), block=block,
                labels_rows=labels_rows, t_start=t_start, wall_s=wall_s, notes=notes)


def beyond_database(cfg: Config, n: int) -> list[str]:
    """One line per size the config asks that the n database rows cannot give, saying what the
    run does instead: the metrics keep the config's names (map_at_<topk>, p_at_<N>), so a value
    computed over fewer items must say so (retrieval's P@N beyond n is the precision over n)."""
    tr, ev = cfg.train, cfg.eval
    out = []
    if tr.num_samples > n:
        out.append(f"train.num_samples = {tr.num_samples} is more than the {n} database images: "
                   f"Ω is the whole database every outer iteration")
        if tr.batch_size > n:
            out.append(f"train.batch_size = {tr.batch_size} is more than Ω's {n} images: each "
                       f"epoch is one mini-batch of {n}")
    for key, asked, instead in (
            ("eval.topk", ev.topk, f"mAP@{ev.topk} is mAP@all"),
            ("eval.precision_at", ev.precision_at,
             f"P@{ev.precision_at} is the precision over all {n}")):
        if asked > n:
            out.append(f"{key} = {asked} is more than the {n} database codes: {instead}")
    return out


def _block_of(ds: Dataset, c) -> tuple[Dataset, slice, int]:
    """A whole dataset cut to this worker's block of database rows (copies, so the whole arrays
    can go once the caller drops them), the block's rows and n."""
    n = len(ds.database)
    rows = blocks.block_rows(n, c)
    if c.world_size == 1:
        return ds, rows, n

    def copy(s: Split, keep=slice(None)) -> Split:
        return Split(s.images[keep].copy(), s.labels[keep].copy(), s.ids[keep].copy())

    return Dataset(ds.name, copy(ds.query), copy(ds.validation), copy(ds.database, rows),
                   ds.multi_label, ds.skipped), rows, n


def _evaluate(run: _Run, cfg: Config, env: WorkerEnv, t: int) -> dict:
    """Validation mAP when due; at the last outer iteration also the test split, its PR curves
    (TensorBoard) and collapse warnings."""
    last = t == cfg.train.outer_iters - 1
    out: dict = {}
    due = cfg.train.eval_every and (t + 1) % cfg.train.eval_every == 0
    if not (last or due):
        return out
    blocks.verify(env.collectives, run.block, f"before evaluating outer iteration {t + 1}")
    labels_rows = run.labels_rows.numpy()
    val = evaluate(run.streams, run.data.validation, run.block, labels_rows, cfg, env)
    out.update({f"val/{k}": v for k, v in val.items()})
    if last:
        test = evaluate(run.streams, run.data.query, run.block, labels_rows, cfg, env,
                        with_curves=True)
        for enc in cfg.eval.encoders:
            curve = test.pop(f"_pr_{enc}", None)
            if curve is not None:
                run.monitor.pr_curve(t + 1, f"test_{enc}", *curve)
            warning = test.pop(f"_warning_{enc}", None)
            if warning:
                out[f"_warning_{enc}"] = warning
                run.monitor.progress(f"WARNING: encoder {enc}: {warning}")
        out.update({f"test/{k}": v for k, v in test.items()})
    return out


def _report(run: _Run, cfg: Config, env: WorkerEnv, t: int, metrics: dict,
            checkpoint: bool) -> None:
    """TensorBoard and the progress line (rank 0), then `env.report` on every rank, with
    rank 0's checkpoint of the state after iteration t when `checkpoint`."""
    c = env.collectives
    rank0 = c.rank == 0
    run.monitor.scalars(t + 1, {k: v for k, v in metrics.items()
                                if k != "t" and not k.startswith("_")})
    run.monitor.progress(_progress_line(t + 1, cfg.train.outer_iters, metrics))
    if rank0 and env.publish is not None:
        env.publish()
    if not checkpoint:
        env.report(_flat(metrics), None)
        return
    blocks.verify(c, run.block, f"before the checkpoint of outer iteration {t + 1}")
    block = run.block
    with tempfile.TemporaryDirectory(prefix=ckpt.staging_prefix("ckpt")) as tmp:
        # every worker writes its own rows of B; rank 0 writes the rest and the manifest
        # covering every block; Ray merges the workers' folders into one checkpoint
        _, digest = ckpt.save_block(tmp, block.start, block.stop, block.B.numpy())
        words = np.frombuffer(bytes.fromhex(digest), dtype=np.int64)
        mine = torch.tensor([[block.start, block.stop, *words.tolist()]], dtype=torch.int64)
        every = c.all_gather_rows(mine).numpy()
        if rank0:
            listed = [(int(r[0]), int(r[1]), ckpt.BLOCK.format(start=int(r[0]), stop=int(r[1])),
                       r[2:].astype(np.int64).tobytes().hex()) for r in every]
            state = {"t": t + 1, "workers": c.world_size, WALL_KEY: metrics["time/wall_s"],
                     "geometry": (run.data.channels, run.data.image_size),
                     **run.streams.state()}
            ckpt.save(tmp, state, cfg.to_toml(), cfg.fingerprint(),
                      run.faults.during_checkpoint(t), blocks=listed,
                      shape=(block.n, cfg.objective.bits))
        env.report(_flat(metrics), Path(tmp))


def _finish(run: _Run, cfg: Config, env: WorkerEnv, metrics: dict) -> dict:
    """final_metrics.json (rank 0) from the last iteration's metrics; returned on every rank.
    Its wall_s is the training's, summed over the run's attempts: the last report's
    time/wall_s, which the last checkpoint keeps for a rerun of the finished run."""
    c = env.collectives
    data = run.data
    final = {k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/")}
    final.update(bits=cfg.objective.bits, wall_s=metrics["time/wall_s"],
                 outer_iters=cfg.train.outer_iters, resumed_at=run.t_start,
                 workers=c.world_size, database=run.block.n,
                 queries=int(data.query.labels.shape[0]))
    final.update({k: v for k, v in metrics.items() if k.startswith("val/")})
    distinct, exact = blocks.distinct_codes(c, run.block)
    # chance_map came with the test metrics, from the per-block histograms' relevant counts
    final.update(distinct_database_codes=distinct)
    if not exact:
        final["distinct_database_codes_is_lower_bound"] = True
    warnings = {k.removeprefix("_warning_"): v for k, v in sorted(metrics.items())
                if k.startswith("_warning_")}
    if warnings:
        final["warnings"] = warnings
    if run.notes:
        final["notes"] = run.notes
    run.monitor.write_json("final_metrics.json", final)
    run.monitor.close()
    if c.rank == 0 and env.publish is not None:
        env.publish()
    return final


def _flat(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _progress_line(t: int, T: int, m: dict) -> str:
    parts = [f"iter {t}/{T}"]
    if "loss/total" in m:
        parts.append(f"loss {m['loss/total']:.4f}")
    if "codes/flipped" in m:
        parts.append(f"flipped {m['codes/flipped']:.3f}")
    if m.get("train/skipped_batches"):
        parts.append(f"skipped {int(m['train/skipped_batches'])} non-finite batch(es)")
    for key in sorted(m):
        if key.startswith(("val/map_all", "test/map_all")):
            parts.append(f"{key} {m[key]:.4f}")
    if "perf/images_per_s" in m:
        parts.append(f"{m['perf/images_per_s']:.0f} img/s")
    return " | ".join(parts)
