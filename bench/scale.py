"""Sharded B at database scale: memory per worker, bytes per outer iteration, seconds of the code
step, at n = 1M, 4M and 16M on W = 1 and 2 workers (issue 18; docs/scaling.md).

    python bench/scale.py [--sizes 1M,4M,16M] [--workers 1,2] [--quick] [--json PATH]

No images and no networks: every worker builds only what its own rows of B need, synthetically.

* labels: single-label, 10 classes, one-hot uint8 (the form `dadh_dist.data` gives). Row i's class
  is a pure function of i (a 64-bit mix of i, mod 10), so a worker computes the labels of its
  block without holding the other n − n/W rows; Ω's come from their owners as in the loop
  (`blocks.gather_label_rows`) and are checked against the same function.
* B: `loop.initial_rows` (codes.init = random), which draws each row from its own seeded chunk,
  so a row's initial code does not depend on which worker draws it.
* Ω_t: `loop.sample_omega` (a permutation's head up to n = 2^24, Floyd's O(m) sampler above);
  F, G: (m, k) tanh of seeded normals standing in for the two streams' outputs. The same on
  every rank.

One outer iteration is what `loop.train`, `loop._open_omega` and `loop.update_codes` call, in
their order, less the network step: gather_label_rows → verify → code_stats → gather_rows →
check_identical(F, G, Ω, r) → solve → update. The sizes are k = 64 bits, m =
train.num_samples, and γ, η, codes.sweeps and codes.chunk_rows from `dadh_dist.config`'s
defaults.

Bytes are counted where the bench hands tensors to the collectives (`Counting`): per call, the
nbytes of the tensor given to all_reduce_sum / all_reduce_max, the local tensor's nbytes for
all_gather_rows, and 8 bytes for check_identical (the int64 checksum it all-gathers; the tensor it
is given stays local). That is the payload one worker hands to the collectives, whatever W is;
W = 1 hands the same tensors to `LocalCollectives`, which sends nothing. The wire column adds a
ring estimate per worker: 2(W − 1)/W × payload for an all-reduce, (W − 1) × payload for an
all-gather.

Each (n, W) runs in fresh processes, so no worker inherits another configuration's peak memory:
W = 1 is one process with `LocalCollectives`, W ≥ 2 are W processes joined by a gloo group on
127.0.0.1 (`TorchCollectives`). Each worker gets cores // W torch (and numba) threads, so every
configuration uses the same cores. Peak RSS is the worker's ru_maxrss (getrusage); the RSS
right after the imports is its baseline. Each configuration runs `--iters` outer iterations
(default 2) and the last is reported: the first also loads the numba kernels.

Exit status 1 when a check fails: the counted bytes equal the formula, the new B's checksum is
the same for every W, B per worker halves from W = 1 to 2 and the bytes per outer iteration do
not grow with n (the last two within 3%; all four hold at --quick's sizes too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import _env
import numpy as np
from _common import exit_status, free_port, memory_mib, table

CLASSES = 10
BITS = 64
SEED = 0
CHECK_BYTES = 8
"""What `TorchCollectives.check_identical` hands to its all-gather: one int64, its checksum."""
TOLERANCE = 0.03
"""How close the two ratios of the check must come to 0.5 and 1."""
LABEL_CHUNK = 1 << 20


# ------------------------------------------------------------------------------ synthetic rows


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a 64-bit hash of each uint64."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def classes_of(index: np.ndarray) -> np.ndarray:
    """Row i's class, a pure function of i: (len,) uint8 in [0, CLASSES)."""
    keyed = index.astype(np.uint64) ^ np.uint64(0x9E3779B97F4A7C15 + SEED)
    return (_mix(keyed) % np.uint64(CLASSES)).astype(np.uint8)


def one_hot(cls: np.ndarray) -> np.ndarray:
    out = np.zeros((cls.shape[0], CLASSES), np.uint8)
    out[np.arange(cls.shape[0]), cls] = 1
    return out


def block_labels(start: int, stop: int) -> np.ndarray:
    """(stop - start, CLASSES) uint8 one-hot labels of rows [start, stop), a chunk at a time so
    the uint64 temporaries stay at LABEL_CHUNK rows."""
    out = np.zeros((stop - start, CLASSES), np.uint8)
    for lo in range(start, stop, LABEL_CHUNK):
        hi = min(stop, lo + LABEL_CHUNK)
        out[lo - start : hi - start] = one_hot(classes_of(np.arange(lo, hi, dtype=np.int64)))
    return out


# ------------------------------------------------------------------------------ counted collectives


class Counting:
    """A collectives object that tallies, per phase of the outer iteration, the calls, the bytes
    handed to them (see the module docstring), a ring estimate of the bytes each worker puts on
    the wire, and the phase's wall time. Delegates every call to `inner`."""

    def __init__(self, inner):
        self.inner = inner
        self.rank, self.world_size = inner.rank, inner.world_size
        self._phase = "setup"
        self.reset()

    def reset(self) -> None:
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self.wire: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        before, self._phase = self._phase, name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self._phase = before

    def _tally(self, nbytes: int, wire: float) -> None:
        p = self._phase
        self.calls[p] = self.calls.get(p, 0) + 1
        self.bytes[p] = self.bytes.get(p, 0) + nbytes
        self.wire[p] = self.wire.get(p, 0.0) + wire

    def _reduced(self, nbytes: int) -> None:
        W = self.world_size
        self._tally(nbytes, 2.0 * (W - 1) / W * nbytes)  # ring all-reduce: reduce-scatter + gather

    def all_reduce_sum(self, t):
        self._reduced(t.nbytes)
        return self.inner.all_reduce_sum(t)

    def all_reduce_max(self, t):
        self._reduced(t.nbytes)
        return self.inner.all_reduce_max(t)

    def all_gather_rows(self, t):
        self._tally(t.nbytes, float((self.world_size - 1) * t.nbytes))
        return self.inner.all_gather_rows(t)

    def check_identical(self, what: str, t):
        self._tally(CHECK_BYTES, float((self.world_size - 1) * CHECK_BYTES))  # an all-gather
        return self.inner.check_identical(what, t)

    def barrier(self) -> None:
        self._tally(0, 0.0)
        self.inner.barrier()

    def broadcast_object(self, obj, src: int = 0):
        raise NotImplementedError("the code side of an outer iteration broadcasts no objects")


# ------------------------------------------------------------------------------ one worker


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(spec: dict) -> None:
    """One worker of one (n, W): build its rows, run the outer iterations, print a JSON line."""
    import torch

    from dadh_dist import blocks, config, loop
    from dadh_dist.distributed import LocalCollectives, TorchCollectives
    from dadh_dist.distributed import init_process_group_for_test as init_group

    torch.set_num_threads(spec["threads"])
    rss_imports = memory_mib()[0]
    maxrss_imports = _maxrss_mib()
    rank, world, n = spec["rank"], spec["world"], spec["n"]
    if world > 1:
        init_group(rank, world, spec["port"], spec["timeout_s"])
        inner = TorchCollectives()
    else:
        inner = LocalCollectives()
    c = Counting(inner)
    cfg = config.load(None, {"objective.bits": spec["bits"], "codes.init": "random"})
    o, m = cfg.objective, spec["m"]
    t0 = time.perf_counter()
    rows = blocks.block_rows(n, c)
    labels_rows = torch.from_numpy(block_labels(rows.start, rows.stop))
    block = blocks.open_block(c, loop.initial_rows(cfg, rows), rows, n, labels_rows)
    setup_s = time.perf_counter() - t0
    hwm_setup = memory_mib()[1]
    iters = []
    for t in range(spec["iters"]):
        omega = loop.sample_omega(SEED, t, n, m)
        want_omega = torch.from_numpy(one_hot(classes_of(omega.numpy())))
        gen = torch.Generator().manual_seed(loop.seed_for(SEED, 5, t))
        F = torch.tanh(torch.randn(m, o.bits, generator=gen))
        G = torch.tanh(torch.randn(m, o.bits, generator=gen))
        inner.barrier()  # start together, uncounted: each phase's time is then its own
        c.reset()
        with c.phase("gather_labels"):  # as the loop does: from the owners of Ω's rows
            labels_omega = blocks.gather_label_rows(c, block, labels_rows, omega)
        if not torch.equal(labels_omega, want_omega):
            raise RuntimeError("Ω's labels gathered from the blocks are not Ω's labels")
        with c.phase("verify"):
            blocks.verify(c, block, f"before outer iteration {t + 1}")
        with c.phase("code_stats"):
            _, sim = blocks.code_stats(c, block, o.similarity, labels_omega, labels_rows,
                                       cfg.codes.chunk_rows)
        with c.phase("gather_rows"):
            blocks.gather_rows(c, block, omega)
        # the network step would run here, on (CodeStats, B_Ω); F and G stand in for its output
        with c.phase("check_identical"):
            c.check_identical("the code step's inputs (F, G, Ω, r)",
                              loop.code_step_inputs(F, G, omega, sim.r))
        with c.phase("solve"):
            B_new = blocks.solve(block, F, G, omega, labels_omega, labels_rows, sim,
                                 gamma=o.gamma, eta=o.eta, bits=o.bits, sweeps=cfg.codes.sweeps,
                                 chunk_rows=cfg.codes.chunk_rows)
        with c.phase("update"):
            metrics = blocks.update(c, block, B_new)
        del B_new
        iters.append({"calls": c.calls, "bytes": c.bytes, "wire": c.wire, "seconds": c.seconds,
                      "metrics": metrics})
    out = {"rank": rank, "world": world, "n": n, "m": m, "bits": o.bits, "rows": block.B.shape[0],
           "threads": spec["threads"], "gamma": o.gamma, "eta": o.eta,
           "sweeps": cfg.codes.sweeps, "B_bytes": block.B.nbytes,
           "labels_bytes": labels_rows.nbytes, "rss_imports": rss_imports,
           "maxrss_imports": maxrss_imports, "hwm_setup": hwm_setup, "hwm": memory_mib()[1],
           "maxrss": _maxrss_mib(), "setup_s": setup_s, "iters": iters}
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # leave together (tests/_gloo.py: a rank tearing down early can abort)
        dist.destroy_process_group()
    print(json.dumps(out))


# ------------------------------------------------------------------------------ parent



def run_config(n: int, world: int, args) -> list[dict]:
    """The W workers of one (n, W), each a fresh interpreter; their JSON lines in rank order."""
    base = {"n": n, "world": world, "m": args.m, "bits": BITS, "iters": args.iters,
            "threads": max(1, args.cores // world), "port": free_port(),
            "timeout_s": args.timeout_s}
    procs = [subprocess.Popen([sys.executable, __file__, "--child",
                               json.dumps({**base, "rank": r})],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    results, failed = [], []
    for r, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=args.timeout_s)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(
                f"n={n:,} W={world}: rank {r} ran past {args.timeout_s} s") from None
        if p.returncode != 0:
            failed.append(f"rank {r} (exit {p.returncode}):\n{err[-3000:]}")
        else:
            results.append(json.loads(out.strip().splitlines()[-1]))
    if failed:
        raise RuntimeError(f"n={n:,} W={world}: " + "\n".join(failed))
    return results


def summarise(workers: list[dict]) -> dict:
    """One row of the table from the workers of one (n, W): memory per worker and seconds are
    the largest over the workers, bytes are per worker (every worker hands the same)."""
    last = [w["iters"][-1] for w in workers]
    bytes_per_worker = {sum(it["bytes"].values()) for it in last}
    if len(bytes_per_worker) != 1:
        raise RuntimeError(f"workers handed different bytes to the collectives: {bytes_per_worker}")

    def most(phases: tuple[str, ...]) -> float:
        return max(sum(it["seconds"][p] for p in phases) for it in last)

    w0 = workers[0]
    solve = max(it["seconds"]["solve"] / w["rows"] * 1e6 * w["threads"]
                for it, w in zip(last, workers))
    return {
        "n": w0["n"], "W": w0["world"], "threads": w0["threads"], "m": w0["m"], "k": w0["bits"],
        "rows": max(w["rows"] for w in workers),
        "B_bytes": max(w["B_bytes"] for w in workers),
        "labels_bytes": max(w["labels_bytes"] for w in workers),
        "rss_imports_mib": max(w["rss_imports"] for w in workers),
        "peak_rss_mib": max(w["maxrss"] for w in workers),
        "peak_hwm_mib": max(w["hwm"] for w in workers),
        "setup_peak_mib": max(w["hwm_setup"] for w in workers),
        "bytes_per_iter": bytes_per_worker.pop(),
        "wire_per_iter": max(sum(it["wire"].values()) for it in last),
        "calls_per_iter": sum(last[0]["calls"].values()),
        "bytes_by_phase": last[0]["bytes"], "calls_by_phase": last[0]["calls"],
        "seconds_by_phase": {p: most((p,)) for p in last[0]["seconds"]},
        "verify_s": most(("verify",)),
        "stats_s": most(("code_stats", "gather_rows")),
        "step_s": most(("solve", "update")),
        "solve_s": most(("solve",)),
        "first_iter_s": max(sum(w["iters"][0]["seconds"].values()) for w in workers),
        "iter_s": most(tuple(last[0]["seconds"])),
        "solve_s_per_mrow_core": solve,
        "setup_s": max(w["setup_s"] for w in workers),
        "checksum": last[0]["metrics"]["codes/checksum"],
    }


def predicted_bytes(W: int, m: int, k: int, c: int) -> int:
    """What the iteration hands to the collectives, from the shapes in `blocks` (single-label):
    gather_labels Ω's labels m×c int8; verify W float32 flags; code_stats float64 BᵀB,
    colsum, class sums, class counts; gather_rows B_Ω int8; check_identical two int64; update
    float64 (flipped, checksum lo, hi, column sums)."""
    return m * c + 4 * W + 8 * (k * k + k + c * k + c) + m * k + CHECK_BYTES + 8 * (3 + k)


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _ratio_check(name: str, got: float | None, want: float) -> tuple[str, dict]:
    if got is None:
        return f"- {name}: n/a (needs both ends in this run)", {"ratio": None, "ok": None}
    ok = abs(got / want - 1.0) <= TOLERANCE
    return (f"- {name}: {got:.4f} (want {want} ± {TOLERANCE:.0%}) "
            f"{'PASS' if ok else 'MISS'}", {"ratio": got, "ok": ok})


def main() -> int:
    from dadh_dist import config

    defaults = config.Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1M,4M,16M", help="database sizes n (k, M suffixes)")
    parser.add_argument("--workers", default="1,2", help="worker counts W")
    parser.add_argument("--quick", action="store_true",
                        help="n = 20k, 40k (smoke test, well under a minute)")
    parser.add_argument("--m", type=int, default=defaults.train.num_samples,
                        help="|Ω| (default: train.num_samples)")
    parser.add_argument("--iters", type=int, default=2,
                        help="outer iterations per configuration; the last is reported")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                        help="cores shared by the W workers (cores // W threads each)")
    parser.add_argument("--timeout-s", type=int, default=900, help="per configuration")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.quick:
        args.sizes = "20k,40k"
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    load0 = _env.load_average()
    wall0 = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    rows = {}
    for W in workers:
        for n in sizes:
            print(f"... n={n:,} W={W}", file=sys.stderr, flush=True)
            rows[n, W] = summarise(run_config(n, W, args))

    mib = 2.0**20
    headers = ["n", "W", "threads / worker", "rows / worker", "B MiB / worker",
               "labels MiB / worker", "RSS after imports MiB", "peak RSS MiB", "peak − imports MiB",
               "bytes / outer iter", "ring wire est. B / worker", "calls", "verify s",
               "code_stats + gather_rows s", "code step s (solve + update)",
               "solve s / M rows / core", "first iter s"]
    body = [[f"{r['n']:,}", r["W"], r["threads"], f"{r['rows']:,}", r["B_bytes"] / mib,
             r["labels_bytes"] / mib, r["rss_imports_mib"], r["peak_rss_mib"],
             r["peak_rss_mib"] - r["rss_imports_mib"], f"{r['bytes_per_iter']:,}",
             f"{r['wire_per_iter']:,.0f}", r["calls_per_iter"], r["verify_s"], r["stats_s"],
             r["step_s"], r["solve_s_per_mrow_core"], r["first_iter_s"]]
            for (n, W), r in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    any_row = next(iter(rows.values()))
    m, k = any_row["m"], any_row["k"]
    print(f"# Sharded B: k = {k}, m = {m:,}, single-label ({CLASSES} classes), "
          f"outer iteration {args.iters} of {args.iters} (gather_labels → verify → code_stats → "
          "gather_rows → check_identical → solve → update)\n")
    print(table(headers, body))
    print()
    phases = ("gather_labels", "verify", "code_stats", "gather_rows", "check_identical", "solve",
              "update")
    big = max(sizes)
    print(f"## Bytes handed to the collectives per outer iteration, by phase (n = {big:,})\n")
    print(table(["W", *phases, "total", "formula"],
                [[W, *(f"{rows[big, W]['bytes_by_phase'].get(p, 0):,}" for p in phases),
                  f"{rows[big, W]['bytes_per_iter']:,}", f"{predicted_bytes(W, m, k, CLASSES):,}"]
                 for W in workers]))
    print()
    print(f"## Seconds by phase, largest over workers (n = {big:,})\n")
    print(table(["W", "threads / worker", *phases, "whole iteration"],
                [[W, rows[big, W]["threads"],
                  *(rows[big, W]["seconds_by_phase"][p] for p in phases), rows[big, W]["iter_s"]]
                 for W in workers]))
    print()
    formula_ok = all(r["bytes_per_iter"] == predicted_bytes(r["W"], m, k, CLASSES)
                     for r in rows.values())
    print(f"- formula mc + 4W + 8(k² + k + ck + c) + mk + {CHECK_BYTES} + 8(k + 3) equals every "
          f"counted total: {'yes' if formula_ok else 'NO'}")
    same_b = all(len({rows[n, W]["checksum"] for W in workers}) == 1 for n in sizes)
    print(f"- codes/checksum of the new B the same for every W at each n: "
          f"{'yes' if same_b else 'NO'}")
    print("- peak RSS: ru_maxrss of each worker (largest over workers); seconds: largest over "
          "workers; solve s / M rows / core = solve s × threads / (rows / 10⁶)")

    lo, hi = min(sizes), max(sizes)
    checks = {}
    print("\n## Checks (ratios from this run)\n")
    b_ratio = (rows[hi, 2]["B_bytes"] / rows[hi, 1]["B_bytes"]
               if (hi, 1) in rows and (hi, 2) in rows else None)
    line, checks["B_per_worker_W2_over_W1"] = _ratio_check(
        f"B bytes per worker, W = 2 / W = 1 at n = {hi:,}", b_ratio, 0.5)
    print(line)
    for W in workers:
        flat = rows[hi, W]["bytes_per_iter"] / rows[lo, W]["bytes_per_iter"] if hi > lo else None
        line, checks[f"bytes_per_iter_flat_W{W}"] = _ratio_check(
            f"bytes per outer iteration, n = {hi:,} / n = {lo:,} at W = {W}", flat, 1.0)
        print(line)
    total_s = time.perf_counter() - wall0
    print(f"\n- started {started}, took {total_s:.0f} s")
    _env.print_environment(load0)
    if args.json:
        result = {"configs": [rows[key] for key in sorted(rows)], "checks": checks,
                  "formula_matches": formula_ok, "same_B_across_W": same_b,
                  "started": started, "seconds": total_s, "environment": _env.environment()}
        args.json.write_text(json.dumps(result, indent=1))
    return exit_status([("counted bytes = the formula", formula_ok),
                        ("B's checksum the same for every W", same_b)]
                       + [(name, check["ok"]) for name, check in checks.items()
                          if check["ok"] is not None])


if __name__ == "__main__":
    sys.exit(main())
