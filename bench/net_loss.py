"""The network step's L_code per mini-batch: factored vs naive, as n grows (issue 6 item 3).

    python bench/net_loss.py [--quick]

L_code = ‖X_M·Bᵀ − k·S_M‖² for a mini-batch M of Ω against all n database codes (docs/design.md §2),
forward and backward, single-label data (10 classes), B a ±1 code matrix.

* ours: `objective.code_loss` with `objective.code_stats` (BᵀB, S_Ω·B, Σ S²) computed once per
  outer iteration; a step then costs O(|M|·k²) whatever n is. The table shows the per-step time
  and the once-per-iteration `code_stats` time amortised over the steps of one outer iteration
  (m/|M| steps per inner epoch × `--inner-epochs`).
* naive: `objective.code_loss_naive` with the explicit |M|×n similarity block, built from the
  labels at each step (as a loop that keeps no m×n matrix must), and also timed with the block
  already built (the loss alone).

Loss values and gradients must agree to float32 precision (relative 1e-4). Every time is the
best of its repeats after untimed warm-up calls, at --threads torch threads for both sides. Exit
status 1 when the loss or the gradient differs, or (outside --quick) a target is missed: ours
amortised ≥ 20× the naive step with S_M given, at every n, and ours per step at the largest n
at most 1.5× its time at the smallest.
"""

from __future__ import annotations

import argparse
import sys
import time

import _env
import numpy as np
import torch
from _common import exit_status, ratio, table, timed, verdict

from dadh_dist import objective

TARGET_SPEEDUP = 20.0
FLAT_TOLERANCE = 1.5  # ours at the largest n over ours at the smallest: "does not grow"


def setup(n: int, m: int, bits: int, classes: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    Y = torch.from_numpy(np.eye(classes, dtype=np.uint8)[
        np.random.default_rng(seed).integers(0, classes, n)])
    B = torch.where(torch.rand(n, bits, generator=gen) < 0.5, -1, 1).to(torch.int8)
    omega = torch.randperm(n, generator=gen)[:m]
    sim = objective.make_similarity("soft", Y[omega], Y)
    return Y, B, omega, sim, gen


def measure(n: int, args) -> list[dict]:
    Y, B, omega, sim, gen = setup(n, args.m, args.bits, 10, seed=0)
    t_stats, stats = timed(lambda: objective.code_stats(B, sim, Y[omega], Y), args.repeat, 1)
    rows = torch.randperm(args.m, generator=gen)[: args.batch]  # Ω positions of M
    X0 = torch.tanh(torch.randn(args.batch, args.bits, generator=gen))

    def s_block() -> torch.Tensor:  # (|M|, n)
        return sim.apply(objective.similar01(Y[omega[rows]], Y))

    def step(loss_fn) -> tuple[float, torch.Tensor]:
        X = X0.clone().requires_grad_(True)
        loss = loss_fn(X)
        loss.backward()
        return float(loss.detach()), X.grad

    def ours():
        return step(lambda X: objective.code_loss(X, stats, rows, args.bits))

    def naive():
        return step(lambda X: objective.code_loss_naive(X, B, s_block(), args.bits))

    S_M = s_block()

    def naive_loss_only():
        return step(lambda X: objective.code_loss_naive(X, B, S_M, args.bits))

    steps_per_outer = args.inner_epochs * -(-args.m // args.batch)
    t_ours, (loss_ours, grad_ours) = timed(ours, args.steps, 3)
    t_naive, (loss_naive, grad_naive) = timed(naive, max(3, args.steps // 5), 1)
    t_loss_only, _ = timed(naive_loss_only, max(3, args.steps // 5), 1)
    rel_loss = abs(loss_ours - loss_naive) / abs(loss_naive)
    rel_grad = float((grad_ours - grad_naive).abs().max() / grad_naive.abs().max())
    return [
        {"n": n, "variant": f"naive: S_M ({args.batch}×n) built per step (baseline)",
         "step": t_naive,
         "stats": 0.0, "amortised": t_naive, "rel_loss": None, "rel_grad": None},
        {"n": n, "variant": "naive: loss only, S_M given", "step": t_loss_only,
         "stats": 0.0, "amortised": t_loss_only, "rel_loss": None, "rel_grad": None},
        {"n": n, "variant": "ours: factored", "step": t_ours, "stats": t_stats,
         "amortised": t_ours + t_stats / steps_per_outer, "rel_loss": rel_loss,
         "rel_grad": rel_grad},
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes (smoke test, ~20 s; targets not judged)")
    parser.add_argument("--n", type=int, nargs="+", default=[68_000, 1_000_000])
    parser.add_argument("--m", type=int, default=2000, help="|Ω|")
    parser.add_argument("--batch", type=int, default=64, help="|M|")
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--inner-epochs", type=int, default=3,
                        help="epochs over Ω per outer iteration (amortises code_stats)")
    parser.add_argument("--steps", type=int, default=50,
                        help="timed steps of ours, the fastest kept (the naive ones: a fifth)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    if args.quick:
        args.n, args.steps, args.repeat = [20_000, 100_000], 20, 1
    torch.set_num_threads(args.threads)
    load0 = _env.load_average()
    results = [r for n in args.n for r in measure(n, args)]
    ours = {r["n"]: r for r in results if r["variant"].startswith("ours")}
    base = {r["n"]: r for r in results if "baseline" in r["variant"]}
    given = {r["n"]: r for r in results if "given" in r["variant"]}
    growth = ours[max(args.n)]["step"] / ours[min(args.n)]["step"]
    rows, checks, targets = [], [], []
    for r in results:
        b, g = base[r["n"]], given[r["n"]]
        if r["variant"].startswith("ours"):
            # the verdict uses the stricter baseline: naive with S_M given
            equal = r["rel_loss"] < 1e-4 and r["rel_grad"] < 1e-4
            met = g["step"] / r["amortised"] >= TARGET_SPEEDUP
            checks.append((f"n = {r['n']:,}: loss and gradient = the naive ones (rel. "
                           f"{r['rel_loss']:.1e} / {r['rel_grad']:.1e})", equal))
            targets.append((f"n = {r['n']:,}: {ratio(g['step'], r['amortised'])} the naive step "
                            f"with S_M given (≥ {TARGET_SPEEDUP:.0f}×)", met))
            check, mark = f"{r['rel_loss']:.1e} / {r['rel_grad']:.1e}", verdict(met and equal)
        else:
            check, mark = "", ""
        rows.append([f"{r['n']:,}", r["variant"], 1e3 * r["step"],
                     1e3 * r["stats"] if r["variant"].startswith("ours") else "—",
                     1e3 * r["amortised"],
                     f"{ratio(b['step'], r['amortised'])} / {ratio(g['step'], r['amortised'])}",
                     check, mark])
    steps_per_outer = args.inner_epochs * -(-args.m // args.batch)
    print(f"# Network-step L_code: |M| = {args.batch}, k = {args.bits}, m = {args.m:,}, "
          "single-label (10 classes), forward + backward\n")
    print(table(["n", "variant", "ms / step", "code_stats ms (once per outer iter)",
                 "ms / step amortised", "speed-up vs naive (S_M built / given)",
                 "rel. Δloss / Δgrad", "target ≥ 20× (vs S_M given), equal"],
                rows))
    print()
    print(f"- amortised: step + code_stats / {steps_per_outer} steps per outer iteration "
          f"({args.inner_epochs} epochs × ⌈{args.m}/{args.batch}⌉).")
    print(f"- ours per step at n = {max(args.n):,} vs n = {min(args.n):,}: {growth:.2f}× "
          f"(target: does not grow with n, ≤ {FLAT_TOLERANCE}×: "
          f"{verdict(growth <= FLAT_TOLERANCE)}).")
    print(f"- finished {time.strftime('%Y-%m-%d %H:%M:%S')}")
    _env.print_environment(load0)
    if len(args.n) > 1:
        targets.append((f"ours per step at n = {max(args.n):,} / n = {min(args.n):,}: "
                        f"{growth:.2f}× (≤ {FLAT_TOLERANCE}×)", growth <= FLAT_TOLERANCE))
    return exit_status(checks, targets, judged=not args.quick)


if __name__ == "__main__":
    sys.exit(main())
