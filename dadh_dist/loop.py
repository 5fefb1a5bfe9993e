"""The per-worker training function: train streams → update B → evaluate → report/checkpoint.

`train(cfg, env)` runs the alternating optimisation of DESIGN §2 on one worker. Everything that
differs between one process and a Ray Train worker group arrives in `WorkerEnv`: the collectives,
the device, how to report (and checkpoint), and which checkpoint to resume from. Every
collective is called on every rank; files are written by rank 0 only.

Per outer iteration t (identical on every worker):
  1. Ω_t: m database indices, a pure function of (seed, t).
  2. The F/G buffers are filled by a forward pass over Ω, then T_in epochs of mini-batch steps
     update both streams (DDP averages the gradients) and all-gather the batch outputs.
  3. The code step solves B's rows block by block (one block per worker) and all-gathers them;
     a checksum of B is compared across workers.
  4. Validation (and, at the end, test) mAP, sharded by queries and gathered per query.
"""

from __future__ import annotations

import functools
import hashlib
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dadh_dist import checkpoint as ckpt
from dadh_dist import codes, faults, health, retrieval
from dadh_dist import objective as obj
from dadh_dist.config import Config
from dadh_dist.data import Dataset, load_dataset
from dadh_dist.distributed import LocalCollectives, StreamGroup, even_split, wrap_ddp
from dadh_dist.encoding import encode, query_codes, stream_outputs
from dadh_dist.models import build_streams
from dadh_dist.monitor import Monitor, progress_bar


@dataclass
class WorkerEnv:
    """What the loop needs from its surroundings (one process, a Ray worker, a test)."""

    collectives: object = field(default_factory=LocalCollectives)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict, Path | None], None] = lambda metrics, folder: None
    """Called once per outer iteration on every rank; `folder` is rank 0's checkpoint or None."""
    resume_from: Path | None = None
    run_dir: Path | None = None
    """Folder for TensorBoard and final metrics (written by rank 0)."""
    dataset: Dataset | None = None
    """A dataset already in memory (tests); loaded from the config otherwise."""
    publish: Callable[[], object] | None = None
    """Rank 0 calls it after every outer iteration and at the end: sends run_dir's new files on
    to a remote run folder (storage.Publisher)."""


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite."""


def seed_for(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (independent streams for Ω, shuffles, B)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_omega(seed: int, t: int, n: int, m: int) -> torch.Tensor:
    """Ω_t: m distinct database indices, the same on every worker."""
    gen = torch.Generator().manual_seed(seed_for(seed, 1, t))
    return torch.randperm(n, generator=gen)[:m]


class Streams:
    """f and g with their DDP wrappers, optimisers and schedulers."""

    def __init__(self, cfg: Config, data: Dataset, device: torch.device,
                 group: StreamGroup | None = None):
        m = cfg.model
        self.group = group  # stream-parallel: the half of the workers this one trains with
        self.f, self.g = build_streams(
            cfg.objective.bits, data.channels, data.image_size, m.backbone, m.width,
            m.input_size, m.pretrained_path, cfg.objective.two_streams, cfg.train.seed, m.norm,
        )
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
        """Stream-parallel: after an outer iteration's steps, each half's stream (weights and
        optimiser state) goes from its leader to every worker, so all hold the identical pair,
        as in a run that trains both streams everywhere. Schedulers step on every worker alike."""
        if self.group is None:
            return
        for name in ("f", "g"):
            module, opt = getattr(self, name), getattr(self, f"opt_{name}")
            src = self.group.leaders[name]
            mine = {"model": module.state_dict(), "opt": opt.state_dict()} if c.rank == src \
                else None
            state = c.broadcast_object(mine, src=src)
            if self.group.stream != name:
                module.load_state_dict(state["model"])
                opt.load_state_dict(state["opt"])

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
    streams: Streams, split, db_codes: np.ndarray, db_labels: np.ndarray, cfg: Config,
    env: WorkerEnv, with_curves: bool = False,
) -> dict:
    """mAP@all (and @k), P@N per encoder; queries are sharded across workers."""
    c = env.collectives
    share = even_split(split.images.shape[0], c.world_size, c.rank)
    amp = cfg.train.amp == "bf16" and env.device.type == "cuda"
    images = torch.from_numpy(split.images[share])
    outputs = stream_outputs(streams.f, streams.g, images, cfg.eval.encoders, env.device,
                             cfg.eval.batch_size, amp)
    out: dict = {}
    for enc in cfg.eval.encoders:
        q = query_codes(outputs, enc)
        per = retrieval.per_query_metrics(
            q, db_codes, split.labels[share], db_labels, topk=cfg.eval.topk or None,
            precision_at=cfg.eval.precision_at,
        )
        stacked = torch.from_numpy(np.stack([per["ap_all"], per["ap_topk"], per["p_at_n"]], 1))
        gathered = c.all_gather_rows(stacked.double()).numpy()
        out[f"map_all_{enc}"] = float(gathered[:, 0].mean())
        if cfg.eval.topk:
            out[f"map_at_{cfg.eval.topk}_{enc}"] = float(gathered[:, 1].mean())
        out[f"p_at_{cfg.eval.precision_at}_{enc}"] = float(gathered[:, 2].mean())
        if with_curves:  # over every query, as with one worker: all workers gather the codes
            every = c.all_gather_rows(torch.from_numpy(q).float()).to(torch.int8).numpy()
            out[f"distinct_query_codes_{enc}"] = health.distinct_codes(every)
            warning = health.collapse_warning(every, db_codes, split.labels, db_labels,
                                              out[f"map_all_{enc}"])
            if warning:
                out[f"_warning_{enc}"] = warning
            if c.rank == 0:
                out[f"_pr_{enc}"] = retrieval.precision_recall_curve(
                    every, db_codes, split.labels, db_labels)
    return out


def _check_finite(terms: dict[str, torch.Tensor], t: int, step: int, c,
                  skip_allowed: bool = False) -> bool:
    """All workers agree (one reduced flag per worker) before any update. Returns True when the
    mini-batch is finite everywhere; False when it is to be skipped by every worker (only if
    `skip_allowed`); otherwise raises NonFiniteLoss on every worker, with context."""
    flags = torch.zeros(c.world_size)
    flags[c.rank] = 0.0 if all(bool(torch.isfinite(v).all()) for v in terms.values()) else 1.0
    flags = c.all_reduce_sum(flags)
    if float(flags.sum()) == 0:
        return True
    if skip_allowed:
        return False
    bad = [r for r in range(c.world_size) if flags[r] > 0]
    detail = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
    raise NonFiniteLoss(
        f"non-finite loss on worker(s) {bad} at outer iteration {t}, step {step} "
        f"(worker {c.rank}'s terms: {detail})")


def train_streams(
    streams: Streams, data: Dataset, omega: torch.Tensor, B: torch.Tensor, cfg: Config,
    env: WorkerEnv, t: int,
) -> tuple[torch.Tensor, torch.Tensor | None, obj.SoftSimilarity, dict]:
    """T_in epochs over Ω; returns the F, G buffers (m, k), Ω's similarity and the loss terms."""
    c, dev = env.collectives, env.device
    o, tr = cfg.objective, cfg.train
    amp = tr.amp == "bf16" and dev.type == "cuda"
    Y = torch.from_numpy(data.database.labels)
    y_omega = Y[omega]
    sim = obj.make_similarity(o.similarity, y_omega, Y, cfg.codes.chunk_rows)
    stats = obj.code_stats(B, sim, y_omega, Y, cfg.codes.chunk_rows).to(dev)
    S01 = obj.similar01(y_omega, y_omega).to(dev)  # (m, m), for L_pair
    B_omega = B[omega].float().to(dev)
    images = torch.from_numpy(data.database.images)[omega]  # (m, C, H, W) uint8
    weights = obj.LossWeights(o.alpha, o.gamma, o.eta, o.use_pair, o.use_quant, o.use_code,
                              o.pair_norm, o.bits)
    F = encode_sharded(streams.f, images, env, cfg.eval.batch_size, amp).to(dev)
    G = (encode_sharded(streams.g, images, env, cfg.eval.batch_size, amp).to(dev)
         if streams.g is not None else None)
    m, bsz = omega.shape[0], tr.batch_size
    group = streams.group
    # the workers a global mini-batch is split over: all of them, or this stream's half
    share_world = group.size if group is not None else c.world_size
    share_rank = c.rank - group.leaders[group.stream] if group is not None else c.rank
    sums: dict[str, torch.Tensor] = {}
    steps = 0
    skipped = 0
    seen = 0
    t0 = time.time()
    # rate and ETA of this outer iteration's mini-batches, on rank 0's terminal only (a Ray
    # worker's or a redirected stderr is no terminal: the progress line per iteration remains)
    bar = progress_bar(tr.inner_epochs * math.ceil(m / bsz), f"iter {t + 1}", c.rank == 0,
                       unit="batch", leave=False)
    for epoch in range(tr.inner_epochs):
        perm = torch.randperm(m, generator=torch.Generator().manual_seed(
            seed_for(tr.seed, 2, t, epoch)))
        for start in range(0, m, bsz):
            batch = perm[start : start + bsz]  # Ω positions of the global mini-batch
            rows = batch[even_split(batch.shape[0], share_world, share_rank)]
            rows_dev = rows.to(dev)
            x = images[rows].to(dev, non_blocking=True)
            with torch.autocast(dev.type, torch.bfloat16, enabled=amp):
                F_M = streams.f_train(x).float() if streams.trains_f else None
                G_M = streams.g_train(x).float() if streams.trains_g else None
            if steps + skipped == 0 and faults.armed("nan", t, c.rank):
                if F_M is not None:
                    F_M = F_M * float("nan")
                else:
                    G_M = G_M * float("nan")
            # each stream's loss against the other's buffer from before this step: f's and g's
            # steps are independent, which is what lets two worker halves take them at once
            loss = torch.zeros((), device=dev)
            terms: dict[str, torch.Tensor] = {}
            if F_M is not None:
                loss_f, terms_f = obj.stream_loss(
                    F_M, G, S01[rows_dev] if G is not None else None, B_omega[rows_dev], stats,
                    rows_dev, weights, batch.shape[0])
                loss = loss + loss_f
                terms.update({f"{k}_f": v for k, v in terms_f.items()})
            if G_M is not None:
                loss_g, terms_g = obj.stream_loss(G_M, F, S01[rows_dev], B_omega[rows_dev],
                                                  stats, rows_dev, weights, batch.shape[0])
                loss = loss + loss_g
                terms.update({f"{k}_g": v for k, v in terms_g.items()})
            if group is not None:  # the other half's terms count as zero here (summed below)
                for k in list(terms):
                    other = k[:-1] + ("g" if k.endswith("_f") else "f")
                    terms.setdefault(other, torch.zeros_like(terms[k]))
            skip = tr.nonfinite == "skip" and skipped < tr.max_skipped
            if not _check_finite(terms, t, steps + skipped, c, skip_allowed=skip):
                # every worker drops this mini-batch: no update, F/G rows keep their values
                skipped += 1
                bar.update()
                continue
            trained = [o for o, on in ((streams.opt_f, streams.trains_f),
                                       (streams.opt_g, streams.trains_g)) if on]
            for opt in trained:
                opt.zero_grad(set_to_none=True)
            # DDP averages gradients over the share's workers; each share is already divided by
            # the global batch size, so scaling by their count makes the average equal the
            # one-process gradient.
            (loss * share_world).backward()
            for opt in trained:
                opt.step()
            if group is None:
                F[batch] = c.all_gather_rows(F_M.detach())
                if G is not None:
                    G[batch] = c.all_gather_rows(G_M.detach())
            else:  # rank order: f's half's rows of the batch, then g's half's
                both = c.all_gather_rows((F_M if F_M is not None else G_M).detach())
                F[batch], G[batch] = both[: batch.shape[0]], both[batch.shape[0] :]
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().double().cpu()
            steps += 1
            seen += batch.shape[0]
            bar.update()
    bar.close()
    streams.share(c)
    seconds = time.time() - t0
    keys = sorted(sums)
    totals = c.all_reduce_sum(torch.stack([sums[k] for k in keys])) if keys else []
    metrics = {f"loss/{k}": float(v) / max(steps, 1) for k, v in zip(keys, totals)}
    metrics["loss/total"] = sum(
        w * metrics.get(f"loss/{term}_{s}", 0.0)
        for term, w in (("pair", o.alpha), ("quant", o.gamma), ("code", o.eta))
        for s in ("f", "g")
    )
    metrics["perf/images_per_s"] = seen * (2 if G is not None else 1) / max(seconds, 1e-9)
    if tr.nonfinite == "skip":
        metrics["train/skipped_batches"] = float(skipped)
    return F.float().cpu(), (G.float().cpu() if G is not None else None), sim, metrics


def update_codes(
    B: torch.Tensor, F: torch.Tensor, G: torch.Tensor | None, omega: torch.Tensor, sim,
    data: Dataset, cfg: Config, env: WorkerEnv, t: int,
) -> tuple[torch.Tensor, dict]:
    """Each worker solves its block of rows of B (all k bits), then one all-gather."""
    c = env.collectives
    o = cfg.objective
    t0 = time.time()
    gamma = o.gamma if o.use_quant else 0.0
    eta = o.eta if o.use_code else 0.0
    Y = torch.from_numpy(data.database.labels)
    n = Y.shape[0]
    rows = even_split(n, c.world_size, c.rank)
    H = codes.code_hessian(F, G)
    Q = codes.code_linear(rows, Y, omega, F, G, sim, gamma, eta, o.bits, cfg.codes.chunk_rows)
    block = codes.dcc(B[rows], H, Q, eta, cfg.codes.sweeps)
    faults.maybe_kill("codes", t, c.rank, env.run_dir)
    B_new = c.all_gather_rows(block)
    if faults.armed("flip", t, c.rank):
        B_new[0, 0] = -B_new[0, 0]
    checksum = c.check_identical("B", B_new)
    Bf = B_new.float()
    quant_g = {} if G is None else {"codes/quant_error_g": _quant_error(G)}
    return B_new, {
        "codes/flipped": float((B_new != B).float().mean()),
        "codes/bit_balance": float(Bf.mean(0).abs().mean()),
        "codes/seconds": time.time() - t0,
        "codes/quant_error": _quant_error(F),  # stream f's (ADSH has only f)
        **quant_g,
        "codes/checksum": float(checksum % 1_000_000_007),
    }


def _quant_error(X: torch.Tensor) -> float:
    """Mean squared distance of a stream's outputs from their signs."""
    return float(((torch.sign(X) - X) ** 2).mean())


def initial_codes(cfg: Config, n: int) -> torch.Tensor:
    if cfg.codes.init == "random":
        gen = torch.Generator().manual_seed(seed_for(cfg.train.seed, 3))
        return torch.where(torch.rand(n, cfg.objective.bits, generator=gen) < 0.5, -1, 1).to(
            torch.int8)
    return torch.zeros(n, cfg.objective.bits, dtype=torch.int8)


def seed_global_rng(cfg: Config, t: int, rank: int) -> None:
    """Reseed torch's global generators (CPU and CUDA: dropout in the torchvision backbones)
    from (seed, t, rank) at the start of outer iteration t.

    Their state is the only per-rank state of a worker. Deriving it instead of checkpointing it
    makes the resume rule hold for any worker count: a run resumed at t with W workers draws
    what a straight run with W workers draws from t on, whatever W wrote the checkpoint.
    """
    torch.manual_seed(seed_for(cfg.train.seed, 4, t, rank))


def train(cfg: Config, env: WorkerEnv) -> dict:
    """Run (or resume) the whole alternating optimisation on this worker; returns metrics."""
    c = env.collectives
    rank0 = c.rank == 0
    data = env.dataset if env.dataset is not None else load_dataset(cfg.data)
    monitor = Monitor(env.run_dir, rank0, cfg.log.tensorboard, cfg.to_toml())
    group = None
    if cfg.scaling.stream_parallel:
        if c.world_size < 2 or c.world_size % 2:
            raise RuntimeError(f"scaling.stream_parallel: {c.world_size} worker(s) started; "
                               "it needs an even number >= 2")
        group = c.stream_group()
    streams = Streams(cfg, data, env.device, group)
    n = data.database.labels.shape[0]
    m = min(cfg.train.num_samples, n)
    B = initial_codes(cfg, n)
    t_start = 0  # the outer iteration this attempt starts at (> 0: resumed)
    if env.resume_from is not None:
        state, _ = ckpt.load(env.resume_from)
        if tuple(state["B"].shape) != tuple(B.shape):
            raise ckpt.CheckpointError(
                f"{env.resume_from}: its B is {tuple(state['B'].shape)} but this run's database "
                f"and bits give {tuple(B.shape)}; the data changed under the run (use another "
                "log.name)")
        streams.load(state)
        B = state["B"]  # (n, k), the whole matrix: its row blocks follow the current W
        t_start = int(state["t"])
        monitor.progress(
            f"resumed from {env.resume_from.name} at outer iteration {t_start} (written by "
            f"{state.get('workers', '?')} worker(s)), now {c.world_size} worker(s)")
    monitor.progress(
        f"{data.name}: {data.query.labels.shape[0]} queries, {data.validation.labels.shape[0]} "
        f"validation, {n} database; {cfg.objective.bits} bits; {c.world_size} worker(s)"
        + (f" (stream-parallel: {group.size} per stream)" if group is not None else "")
        + (f"; {data.skipped} bad images skipped" if getattr(data, "skipped", 0) else ""))
    wall0 = time.time()
    metrics: dict = {}
    warnings: dict[str, str] = {}
    T = cfg.train.outer_iters
    resumed_at = t_start
    if t_start >= T:  # already finished: report the final state once more
        t_start = T - 1
        finished = True
    else:
        finished = False
    for t in range(t_start, T):
        last = t == T - 1
        metrics = {"t": t + 1}
        if not finished:
            seed_global_rng(cfg, t, c.rank)
            omega = sample_omega(cfg.train.seed, t, n, m)
            faults.maybe_kill("streams", t, c.rank, env.run_dir)
            faults.maybe_kill_node(t, env.run_dir)
            F, G, sim, net = train_streams(streams, data, omega, B, cfg, env, t)
            B, code_metrics = update_codes(B, F, G, omega, sim, data, cfg, env, t)
            streams.sched_f.step()
            if streams.sched_g is not None:
                streams.sched_g.step()
            metrics.update(net)
            metrics.update(code_metrics)
            metrics.update(streams.lrs())
        db_codes = B.numpy()
        db_labels = data.database.labels
        if last or (cfg.train.eval_every and (t + 1) % cfg.train.eval_every == 0):
            val = evaluate(streams, data.validation, db_codes, db_labels, cfg, env)
            metrics.update({f"val/{k}": v for k, v in val.items()})
        if last:
            test = evaluate(streams, data.query, db_codes, db_labels, cfg, env, with_curves=True)
            for enc in cfg.eval.encoders:
                curve = test.pop(f"_pr_{enc}", None)
                if curve is not None:
                    monitor.pr_curve(t + 1, f"test_{enc}", *curve)
                warning = test.pop(f"_warning_{enc}", None)
                if warning:
                    warnings[enc] = warning
                    monitor.progress(f"WARNING: encoder {enc}: {warning}")
            metrics.update({f"test/{k}": v for k, v in test.items()})
        metrics["time/wall_s"] = time.time() - wall0
        monitor.scalars(t + 1, {k: v for k, v in metrics.items() if k != "t"})
        monitor.progress(_progress_line(t + 1, T, metrics))
        if rank0 and env.publish is not None:
            env.publish()
        folder = None
        save_now = last or (t + 1) % cfg.train.checkpoint_every == 0
        tmp = None
        if rank0 and save_now and not finished:
            tmp = tempfile.TemporaryDirectory(prefix="dadh_ckpt_")
            state = {"t": t + 1, "B": B, "workers": c.world_size,
                     "geometry": (data.channels, data.image_size), **streams.state()}
            folder = ckpt.save(  # a "checkpoint" kill lands between its files and manifest
                tmp.name, state, cfg.to_toml(), cfg.fingerprint(),
                functools.partial(faults.maybe_kill, "checkpoint", t, c.rank, env.run_dir))
        env.report(_flat(metrics), folder)
        if tmp is not None:
            tmp.cleanup()
    final = {
        k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/")
    }
    final.update(bits=cfg.objective.bits, wall_s=time.time() - wall0, outer_iters=T,
                 resumed_at=resumed_at,
                 workers=c.world_size, database=n, queries=int(data.query.labels.shape[0]))
    final.update({k: v for k, v in metrics.items() if k.startswith("val/")})
    final.update(chance_map=health.chance_map(data.query.labels, data.database.labels),
                 distinct_database_codes=health.distinct_codes(B.numpy()))
    if warnings:
        final["warnings"] = {enc: w for enc, w in sorted(warnings.items())}
    monitor.write_json("final_metrics.json", final)
    monitor.close()
    if rank0 and env.publish is not None:
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
