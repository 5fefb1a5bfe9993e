"""The code step at database scale: factored vs the dense similarity matrix (issue 6 item 2).

    python bench/code_step.py [--quick] [--repeats N]

One code step (docs/design.md §2): H = FᵀF + GᵀG, Q = 2ηk·S_Ωᵀ(F + G) + 2γ·(F̄ + Ḡ), then one
DCC sweep over the k bit columns, from B = 0 (the first outer iteration; `codes.init = "zeros"`).

* ours: what the training loop runs: `codes.code_hessian`, `codes.code_linear(by_class=True)`
  (single-label: a `codes.ClassQ`, the c class rows of S_Ωᵀ·U, a class a row and the Ω rows'
  γ term; the n×k Q is never built) and `codes.dcc` (the compiled `kernels.dcc_classes`: rows
  in blocks, each block's Q rows built from the classes, each block transposed, blocks on
  numba's threads).
* ours, 1 thread: the same with `torch.set_num_threads(1)`, which the kernels follow (the
  baselines keep --threads: this row's ratios give ours fewer threads than the baseline's).
* ours, Q written: `codes.code_linear` (Q written in one pass, `kernels.class_linear`, what
  other callers get) + `codes.dcc` on it (`kernels.dcc`).
* before the Q fix: the torch Q the library had before `codes.ClassQ`, written out below (the
  class rows gathered into an n×k matrix, scaled into another, added to zeros, the γ term by
  `index_add_`) + the compiled DCC: the library as it was.
* torch DCC: the written Q, then the torch DCC the library used before issue 17
  (`codes._dcc_torch`, still its form for CUDA tensors): the baseline of the DCC target.
* dense: the reference way, written naively below: S_Ω built explicitly as an m×n float32
  matrix from the labels, Q = 2ηk·S_Ωᵀ(F+G) + 2γ·(F̄+Ḡ) with F̄, Ḡ as n×k scatter matrices, and
  the torch DCC: the baseline of the whole-step target.

Every variant runs in a fresh interpreter that reports its own peak resident memory (VmHWM),
because tracemalloc does not see torch's allocations. B must be identical across variants. The
kernels' first calls (compile, or load from numba's on-disk cache) happen before the clock
starts; what they cost is measured on its own, in fresh processes with an empty cache and then
with the cache they filled.
Multi-label part: peak memory of `codes.code_linear` alone at growing n, chunked vs dense; Q
must equal the dense Q to float32 precision.

Exit status 1 when some variant's B differs from the baseline's or a multi-label Q from the
dense one, or (outside --quick) a target is missed: the whole step of "ours" (the loop's path,
at the baselines' thread count) ≥ 20× the dense one, its DCC ≥ 5× the torch DCC, and the
multi-label scratch beyond Q growing at most 1.25× from the smallest to the largest n.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _env
import numba
import numpy as np
from _common import (
    exit_status,
    first_call_seconds,
    memory_mib,
    ratio,
    run_child,
    table,
    verdict,
)

TARGET_SPEEDUP = 20.0  # whole code step vs dense
TARGET_DCC = 5.0  # compiled DCC vs torch DCC
TARGET_MULTI_GROWTH = 1.25  # multi-label scratch beyond Q, largest n over smallest: "bounded"
MULTI_RTOL = 1e-5  # chunked float64 Q vs the dense float32 product, relative to max |Q|
GAMMA, ETA = 200.0, 1.0  # the config defaults (objective.gamma, objective.eta)


# ------------------------------------------------------------------------------ one variant


def make_inputs(n: int, m: int, bits: int, classes: int, multi: bool, seed: int):
    """Labels (n, c) uint8, Ω (m,), F, G (m, k) in (-1, 1), B0 = 0, and the soft similarity."""
    import torch

    from dadh_dist import objective

    rng = np.random.default_rng(seed)
    if multi:  # 1-3 labels a row, as the Fashion-MNIST grids
        Y = np.zeros((n, classes), np.uint8)
        count = rng.integers(1, 4, n)
        for j in range(3):
            rows = np.flatnonzero(count > j)
            Y[rows, rng.integers(0, classes, rows.size)] = 1
    else:
        Y = np.eye(classes, dtype=np.uint8)[rng.integers(0, classes, n)]
    Y = torch.from_numpy(Y)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randperm(n, generator=gen)[:m]
    F = torch.tanh(torch.randn(m, bits, generator=gen))
    G = torch.tanh(torch.randn(m, bits, generator=gen))
    B0 = torch.zeros(n, bits, dtype=torch.int8)
    sim = objective.make_similarity("soft", Y[omega], Y)
    return Y, omega, F, G, B0, sim


def dense_linear(Y, omega, F, G, sim, bits: int):
    """Q the reference way: the m×n similarity matrix in float32, then one product."""
    import torch

    S = (Y[omega].float() @ Y.float().T > 0).float()  # S01: (m, n)
    S.mul_(1.0 + sim.r).sub_(sim.r)  # soft S, in place (a copy would double the peak)
    U = F + G
    Q = 2.0 * ETA * bits * (S.T @ U)  # (n, k)
    del S
    bar = torch.zeros(Y.shape[0], bits)  # F̄ + Ḡ: rows of Ω at their database positions
    bar[omega] = U
    return (Q + 2.0 * GAMMA * bar).double()


COMPILED = ("ours", "written", "before")  # the variants that run a compiled DCC


def gathered_linear(Y, omega, F, G, sim, bits: int):
    """Q as `codes.code_linear` computed it for single-label data before `codes.ClassQ`."""
    import torch

    from dadh_dist import objective

    U = F.double() + G.double()
    assert objective.is_single_label(Y) and objective.is_single_label(Y[omega])  # its test
    Q = torch.zeros(Y.shape[0], bits, dtype=torch.float64)
    Q += 2.0 * ETA * bits * objective.class_similarity_rows(sim, Y[omega], U)[Y.argmax(1)]
    Q.index_add_(0, omega, 2.0 * GAMMA * U)
    return Q


def child(spec: dict) -> None:
    """Run one variant, save B, print a JSON line with times and memory."""
    import torch

    from dadh_dist import codes

    torch.set_num_threads(spec["threads"])
    Y, omega, F, G, B0, sim = make_inputs(spec["n"], spec["m"], spec["bits"], spec["classes"],
                                          spec["multi"], spec["seed"])
    variant, bits, n = spec["variant"], spec["bits"], spec["n"]
    kw = dict(gamma=GAMMA, eta=ETA, bits=bits, chunk_rows=spec["chunk_rows"])
    if variant in COMPILED and not spec["linear_only"]:  # the kernels' first calls (cache
        H = codes.code_hessian(F, G)  # loads) before the clock
        for by_class in (True, False):
            codes.dcc(B0[:4], H, codes.code_linear(slice(0, 4), Y, omega, F, G, sim,
                                                   by_class=by_class, **kw), ETA)
    rss0, _ = memory_mib()
    t0 = time.perf_counter()
    if variant == "dense":
        Q = dense_linear(Y, omega, F, G, sim, bits)
    elif variant == "before":
        Q = gathered_linear(Y, omega, F, G, sim, bits)
    else:
        Q = codes.code_linear(slice(0, n), Y, omega, F, G, sim, by_class=variant == "ours", **kw)
    t_linear = time.perf_counter() - t0
    _, hwm_linear = memory_mib()
    out = {"t_linear": t_linear, "rss0": rss0, "hwm_linear": hwm_linear}
    if isinstance(Q, torch.Tensor):
        out["q_mib"] = Q.numel() * Q.element_size() / 2**20
    if not spec["linear_only"]:
        t1 = time.perf_counter()
        H = codes.code_hessian(F, G)
        if variant in COMPILED:
            B = codes.dcc(B0, H, Q, ETA, block_rows=spec["dcc_block"])
        else:
            B = codes._dcc_torch(B0, H, Q, ETA, 1, None)
        out["t_dcc"] = time.perf_counter() - t1
    out["t_total"] = time.perf_counter() - t0
    out["hwm"] = memory_mib()[1]
    np.save(spec["out"], (Q if spec["linear_only"] else B).numpy())
    print(json.dumps(out))


# ------------------------------------------------------------------------------------ parent


def _median_run(runs: list[dict]) -> dict:
    """One variant's runs as one row: median times, the total's range, the memory of the run
    with the median total, and whether every run gave the same B."""
    by_total = sorted(runs, key=lambda r: r["t_total"])
    out = dict(by_total[len(by_total) // 2])
    for key in ("t_linear", "t_dcc", "t_total"):
        out[key] = float(np.median([r[key] for r in runs]))
    out["total_range"] = f"{by_total[0]['t_total']:.3f}-{by_total[-1]['t_total']:.3f}"
    out["same_B"] = all(np.array_equal(r["B"], runs[0]["B"]) for r in runs)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (smoke test, ~1.5 min: twelve fresh interpreters; "
                             "targets not judged)")
    parser.add_argument("--n", type=int, default=1_000_000, help="database size (single-label)")
    parser.add_argument("--m", type=int, default=2000, help="|Ω|")
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--multi-n", type=int, nargs="+", default=[100_000, 200_000, 400_000])
    parser.add_argument("--chunk-rows", type=int, default=8192, help="codes.chunk_rows")
    parser.add_argument("--dcc-block", type=int, default=0,
                        help="codes.dcc block_rows (0: the library default)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per variant")
    parser.add_argument("--skip-dense-single", action="store_true",
                        help="leave out the 8 GB dense variant at n = 1M")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of the single-label variants, interleaved (each variant once "
                             "a round, so load drifts hit all alike): times are medians, and the "
                             "total's min-max is shown")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats: must be >= 1, got {args.repeats}")
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.quick:
        args.n, args.multi_n = 100_000, [10_000, 40_000]
    load0 = _env.load_average()
    me = Path(__file__)
    tmp = Path(tempfile.mkdtemp(prefix="dadh_bench_codes_"))
    from dadh_dist import codes

    base = {"m": args.m, "bits": args.bits, "classes": 10, "seed": 0, "threads": args.threads,
            "chunk_rows": args.chunk_rows, "dcc_block": args.dcc_block or codes.DCC_BLOCK_ROWS,
            "linear_only": False}

    def variant(name: str, **kw) -> dict:
        spec = {**base, **kw, "variant": name}
        spec["out"] = str(tmp / f"{name}_{spec['n']}_{spec['threads']}.npy")
        print(f"... {name} n={kw['n']:,}", file=sys.stderr, flush=True)
        res = run_child(me, spec)
        res["B"] = np.load(spec["out"])
        return res

    probe = ("import torch\nfrom dadh_dist import codes, objective\n"
             "Y = torch.eye(3, dtype=torch.uint8)[torch.arange(8) % 3]\n"
             "F = torch.ones(4, 64)\nomega = torch.arange(4)\n"
             "sim = objective.SoftSimilarity(0.5)\n"
             "B, H = torch.zeros(8, 64, dtype=torch.int8), torch.eye(64, dtype=torch.float64)\n"
             "t0 = time.perf_counter()\n"
             "Q = codes.code_linear(slice(0, 8), Y, omega, F, F, sim, gamma=1.0, eta=1.0, bits=64,"
             " by_class={})\ncodes.dcc(B, H, Q, 1.0)\nseconds = time.perf_counter() - t0")
    first = {by_class: first_call_seconds(probe.format(by_class))  # --quick: the loop's path
             for by_class in ((True,) if args.quick else (True, False))}
    plan = [("ours", "ours", {}), ("ours1", "ours", {"threads": 1}), ("written", "written", {}),
            ("before", "before", {}), ("torch", "torch", {})]
    if not args.skip_dense_single:
        plan.append(("dense", "dense", {}))
    runs: dict[str, list[dict]] = {key: [] for key, _, _ in plan}
    for _ in range(args.repeats):
        for key, name, kw in plan:
            runs[key].append(variant(name, n=args.n, multi=False, **kw))
    single = {key: _median_run(rs) for key, rs in runs.items()}
    checks = [(f"{key}: the same B in each of its {args.repeats} runs", r["same_B"])
              for key, r in single.items() if args.repeats > 1]

    ref_key = "dense" if "dense" in single else "torch"
    ref = single[ref_key]
    rows, targets = [], []
    labels = {"dense": "dense S_Ω (m×n float32) + torch DCC (baseline)",
              "torch": "factored S, Q written + torch DCC (DCC baseline)",
              "before": "before the Q fix: torch Q (n×k gather) + compiled DCC",
              "written": f"ours, Q written (`code_linear`) + compiled DCC, {args.threads} threads",
              "ours": f"ours: Q by class, fused into the compiled DCC, {args.threads} threads",
              "ours1": f"ours, 1 thread (baselines at {args.threads})"}
    for key in ("dense", "torch", "before", "written", "ours", "ours1"):
        if key not in single:
            continue
        r = single[key]
        differ = int(np.count_nonzero(r["B"] != ref["B"]))
        row = [labels[key], r["t_linear"], r["t_dcc"], r["t_total"], r["total_range"],
               r["hwm"], r["hwm"] - r["rss0"]]
        d = single.get("dense")
        row.append(f"{ratio(d['t_linear'], r['t_linear'])} / {ratio(d['t_total'], r['t_total'])}"
                   if d else "(no dense run)")
        row.append(ratio(single["torch"]["t_dcc"], r["t_dcc"]))
        row.append("" if key == ref_key else differ)
        if key != ref_key:
            checks.append((f"{labels[key]}: B = the {ref_key} variant's ({differ} bits differ)",
                           differ == 0))
        if key in ("written", "ours", "ours1"):
            dcc_x = single["torch"]["t_dcc"] / r["t_dcc"]
            met = dcc_x >= TARGET_DCC and (d is None or d["t_total"] / r["t_total"]
                                            >= TARGET_SPEEDUP)
            if key == "ours":  # the target is the loop's path at the baselines' threads
                targets.append((f"ours: DCC {dcc_x:.1f}× the torch DCC (≥ {TARGET_DCC:.0f}×)",
                                dcc_x >= TARGET_DCC))
                if d:
                    total_x = d["t_total"] / r["t_total"]
                    targets.append((f"ours: whole step {total_x:.1f}× the dense one "
                                    f"(≥ {TARGET_SPEEDUP:.0f}×)", total_x >= TARGET_SPEEDUP))
            ok = met and differ == 0
            row.append(verdict(ok) if d else verdict(ok) + " (DCC only)")
        else:
            row.append("")
        rows.append(row)

    multi_rows, beyond = [], {"ours": [], "dense": []}
    for n in args.multi_n:
        res = {v: variant(v, n=n, multi=True, linear_only=True) for v in ("ours", "dense")}
        err = float(np.max(np.abs(res["ours"]["B"] - res["dense"]["B"]))
                    / np.max(np.abs(res["dense"]["B"])))
        checks.append((f"multi-label Q at n = {n:,} = the dense Q (max rel. Δ {err:.1e} ≤ "
                       f"{MULTI_RTOL:.0e})", err <= MULTI_RTOL))
        for v in ("ours", "dense"):
            r = res[v]
            extra = r["hwm_linear"] - r["rss0"]
            beyond[v].append(extra - r["q_mib"])
            multi_rows.append([f"{n:,}", "ours: chunked" if v == "ours" else "dense (baseline)",
                               r["t_linear"], r["q_mib"], extra, extra - r["q_mib"],
                               (extra - r["q_mib"]) / r["q_mib"], f"{err:.1e}"])

    print(f"# Code step: n = {args.n:,}, k = {args.bits}, m = {args.m:,}, single-label "
          "(10 classes), one DCC sweep from B = 0\n")
    print(f"({args.repeats} interleaved run(s) per variant: medians)\n")
    print(table(["variant", "Q s", "DCC s", "total s", "total s min-max", "peak RSS MiB",
                 "peak − inputs MiB", "speed-up vs dense: Q / total", "DCC speed-up vs torch DCC",
                 f"bits ≠ {'dense' if 'dense' in single else 'torch DCC'}",
                 "targets: total ≥ 20×, DCC ≥ 5×, same B"], rows))
    print()
    print("- Q s: ours builds the `ClassQ` only (no n×k Q); its DCC s builds each block's Q rows.")
    for by_class, what in ((True, "`code_linear(by_class=True)` + `dcc` (the classes, "
                                  "`dcc_classes`)"),
                           (False, "`code_linear` + `dcc` (the classes, `class_linear`, `dcc`)")):
        if by_class not in first:
            continue
        cold, cached = first[by_class]
        print(f"- first call in a fresh process of {what}: {cold:.2f} s with an empty numba "
              f"cache (the compile), {cached:.3f} s once the cache exists (`cache=True`); not in "
              "the times above.")
    print(f"# Multi-label Q (`codes.code_linear`, chunk_rows = {args.chunk_rows:,}): memory as n "
          f"grows (m = {args.m:,}, k = {args.bits}, 1-3 of 10 labels a row)\n")
    print(table(["n", "variant", "Q s", "Q size MiB", "peak − inputs MiB", "scratch beyond Q MiB",
                 "scratch / Q size", "max rel. ΔQ"], multi_rows))
    print()
    grow = args.multi_n[-1] / args.multi_n[0]
    for v in ("ours", "dense"):
        print(f"- {v}: scratch beyond Q grows {beyond[v][-1] / beyond[v][0]:.2f}× while n grows "
              f"{grow:.0f}×")
    if len(args.multi_n) > 1:
        growth = beyond["ours"][-1] / beyond["ours"][0]
        targets.append((f"multi-label scratch beyond Q grows {growth:.2f}× for n ×{grow:.0f} "
                        f"(≤ {TARGET_MULTI_GROWTH}×)", growth <= TARGET_MULTI_GROWTH))
    print("- peak RSS: VmHWM of a fresh process per variant (torch and inputs included); "
          "'peak − inputs' subtracts the RSS once the inputs are built.")
    print("- Q: the n×k float64 output itself grows with n; 'scratch beyond Q' is what the "
          "similarity costs on top of it (dense: the m×n block, m·n·4 bytes, plus temporaries).")
    print(f"- finished {time.strftime('%Y-%m-%d %H:%M:%S')}")
    _env.print_environment(load0)
    print(f"- numba {numba.__version__}")
    shutil.rmtree(tmp, ignore_errors=True)
    if "dense" not in single:
        print("- no dense run (--skip-dense-single): the whole-step target is not judged")
    return exit_status(checks, targets, judged=not args.quick)


if __name__ == "__main__":
    sys.exit(main())
