"""GPU check (issue 6 item 5): stream throughput, the code step at 1M, Hamming ranking at 1M.

    python bench/gpu_bench.py [--cpu-smoke] [--json FILE]      (or: bash bench/gpu_check.sh)

Three parts, each timed with the device synchronised and printed as a Markdown table:

1. Images/s of one hash stream (`models.HashStream`) on Fashion-MNIST-shaped uint8 batches
   (1×28×28) that are copied to the device and preprocessed there (resize, grey → RGB,
   normalise), bf16 autocast, channels_last weights, Adam: training step (forward + backward +
   step) and encoding (forward, no grad), for the small CNN at 28 px, AlexNet@224 and
   ResNet-50@224. A DADH step runs two such streams, so its images/s is about half.
2. The code step at n = 1M, k = 64, m = 2,000 (single-label): `codes.code_hessian`,
   `codes.code_linear(by_class=True)`, `codes.dcc` (the loop's calls) on cuda tensors, against
   the dense m×n similarity form on the same GPU and against the library on this machine's
   CPUs (its compiled kernels loaded by an untimed call first); B must match.
3. Hamming ranking of 1,000 queries against 1M 64-bit codes on the GPU, two ways: packed int64
   XOR + a SWAR popcount, and an fp16 ±1 matrix product (exact for integers this small); then
   a stable sort per query and mAP@all, checked against `retrieval.mean_average_precision` on
   the CPU (the baseline of the ratio, after an untimed call that loads its kernel); the
   distances of the first queries are checked against `retrieval.hamming_distances`.

`--cpu-smoke` runs every part at toy sizes on the CPU (float32 instead of bf16) so the script
can be tested where there is no GPU; its numbers mean nothing. A part that fails prints its error
and the others still run; --json is rewritten after every part, so a run killed at its time
limit keeps the parts it finished. Exit status 1 when a part failed or a result differs from
its baseline. Needs torch, torchvision, numpy and numba (no Ray, no faiss).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # dadh_dist from a bare checkout

import _env  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import exit_status, ratio, table  # noqa: E402

from dadh_dist import codes, retrieval  # noqa: E402
from dadh_dist.models import HashStream  # noqa: E402

GAMMA, ETA = 200.0, 1.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn, device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per call: mean over `steps` calls after `warmup`, the device synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


# ------------------------------------------------------------------------------ 1. streams


def stream_speed(net, host: torch.Tensor, device: torch.device, steps: int,
                 warmup: int) -> tuple[float, float]:
    """Seconds per training step and per encoding pass of one stream on the batch `host`."""
    amp = device.type == "cuda"
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    target = torch.sign(torch.randn(host.shape[0], 64, device=device))

    def train_step():
        x = host.to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            out = net(x).float()
        loss = ((out - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def encode_step():
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
            net(host.to(device, non_blocking=True))

    net.train()
    t_train = clock(train_step, device, steps, warmup)
    net.eval()
    return t_train, clock(encode_step, device, steps, warmup)


def stream_rows(device: torch.device, smoke: bool) -> tuple[list[list], str, list]:
    cases = [("small CNN @ 28", "small_cnn", 0, 1024), ("AlexNet @ 224", "alexnet", 224, 256),
             ("ResNet-50 @ 224", "resnet50", 224, 128)]
    steps, warmup = (2, 1) if smoke else (30, 8)
    # as the training driver does; the code step below turns TF32 off again
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rows = []
    for label, backbone, size, batch in cases:
        if smoke:
            size, batch = (64 if size else 0), 4
        torch.manual_seed(0)
        net = HashStream(64, 1, 28, backbone, 32, size).to(device)
        if device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        host = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8)
        if device.type == "cuda":
            host = host.pin_memory()
        t_train, t_enc = stream_speed(net, host, device, steps, warmup)
        rows.append([label, batch, "bf16" if device.type == "cuda" else "fp32",
                     batch / t_train, batch / t_enc, batch / t_train / 2])
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, "", []


# ---------------------------------------------------------------------------- 2. code step


def code_inputs(n: int, m: int, bits: int, seed: int = 0):
    from dadh_dist import objective

    rng = np.random.default_rng(seed)
    Y = torch.from_numpy(np.eye(10, dtype=np.uint8)[rng.integers(0, 10, n)])
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randperm(n, generator=gen)[:m]
    F = torch.tanh(torch.randn(m, bits, generator=gen))
    G = torch.tanh(torch.randn(m, bits, generator=gen))
    sim = objective.make_similarity("soft", Y[omega], Y)
    return Y, omega, F, G, sim


def code_step(Y, omega, F, G, sim, bits: int, device: torch.device, dense: bool):
    """One code step from B = 0 on `device`; returns B (CPU int8)."""
    n = Y.shape[0]
    Y, omega, F, G = (t.to(device) for t in (Y, omega, F, G))
    with torch.device(device):  # code_linear allocates Q on the default device
        if dense:
            S = (Y[omega].float() @ Y.float().T > 0).float()
            S.mul_(1.0 + sim.r).sub_(sim.r)
            U = F + G
            Q = 2.0 * ETA * bits * (S.T @ U)
            del S
            Q.index_add_(0, omega, 2.0 * GAMMA * U)
            Q = Q.double()
        else:
            Q = codes.code_linear(slice(0, n), Y, omega, F, G, sim, gamma=GAMMA, eta=ETA,
                                  bits=bits, by_class=True)
        H = codes.code_hessian(F, G)
        B = codes.dcc(torch.zeros(n, bits, dtype=torch.int8), H, Q, ETA)
    sync(device)
    return B.cpu()


def code_rows(device: torch.device, smoke: bool) -> tuple[list[list], str, list]:
    n, m, bits = (20_000, 200, 16) if smoke else (1_000_000, 2000, 64)
    # TF32 would round U to 10 mantissa bits in the dense S_Ωᵀ·U and flip bits of B
    torch.backends.cuda.matmul.allow_tf32 = False
    inputs = code_inputs(n, m, bits)
    cpu = torch.device("cpu")
    rows, results, checks = [], {}, []
    for key, label, dev, dense in (("cpu", "ours on the CPU (baseline)", cpu, False),
                                   ("dense", f"dense m×n S on {device.type}", device, True),
                                   ("ours", f"ours on {device.type}", device, False)):
        if dev.type == "cuda":
            code_step(*inputs, bits, dev, dense)  # warm-up: kernels, allocator
        else:  # warm-up: numba's kernels (a compile on a fresh machine), on a small case
            code_step(*code_inputs(1000, 50, bits), bits, dev, dense)
        t0 = time.perf_counter()
        results[key] = code_step(*inputs, bits, dev, dense)
        elapsed = time.perf_counter() - t0
        differ = int((results[key] != results["cpu"]).sum())
        rows.append([label, elapsed, differ])
        if key != "cpu":
            checks.append((f"code step, {label}: B = the CPU's ({differ} bits differ)",
                           differ == 0))
    base = rows[0][1]
    for row in rows:
        row.insert(2, ratio(base, row[1]))
    return rows, f"n = {n:,}, k = {bits}, m = {m:,}", checks


# ------------------------------------------------------------------------------ 3. Hamming


_M1, _M2, _M4, _H01 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F, \
    0x0101010101010101


def popcount64(x: torch.Tensor) -> torch.Tensor:
    """Bits set per int64 (SWAR). Masking after each shift makes the arithmetic shift safe."""
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    return ((x * _H01) >> 56) & 0xFF  # the product wraps; the top byte holds the count


def packed_words(codes_pm1: np.ndarray, device) -> torch.Tensor:
    """(n, W) int64 words of packed codes (the library's bit order, zero-padded)."""
    packed = retrieval.pack_codes(codes_pm1)
    width = -(-packed.shape[1] // 8) * 8
    padded = np.zeros((packed.shape[0], width), np.uint8)
    padded[:, : packed.shape[1]] = packed
    return torch.from_numpy(padded.view(np.int64)).to(device)


def gpu_map(dist_fn, q_count: int, rel_fn, chunk: int) -> float:
    """mAP@all with ties in database order: stable sort of each query's distances."""
    total = 0.0
    for s in range(0, q_count, chunk):
        e = min(s + chunk, q_count)
        d = dist_fn(s, e)  # (c, n) integer-valued
        order = torch.sort(d, dim=1, stable=True).indices
        hits = torch.gather(rel_fn(s, e), 1, order).double()
        pos = torch.arange(1, d.shape[1] + 1, device=d.device, dtype=torch.float64)
        ap = (hits * hits.cumsum(1) / pos).sum(1) / hits.sum(1).clamp(min=1)
        total += float(ap.sum())
    return total / q_count


def hamming_rows(device: torch.device, smoke: bool) -> tuple[list[list], str, list]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hamming import make_codes

    n, nq, bits = (50_000, 64, 64) if smoke else (1_000_000, 1000, 64)
    q, db, ql, dl = make_codes(n, nq, bits, 10, 0.25, seed=0)
    retrieval.mean_average_precision(q[:2], db[:100], ql[:2], dl[:100])  # loads the kernel
    t0 = time.perf_counter()
    map_cpu = retrieval.mean_average_precision(q, db, ql, dl)
    t_cpu = time.perf_counter() - t0

    yq = torch.from_numpy(ql.argmax(1)).to(device)
    ydb = torch.from_numpy(dl.argmax(1)).to(device)

    def rel(s, e):
        return ydb[None, :] == yq[s:e, None]

    qw, dbw = packed_words(q, device), packed_words(db, device)

    def dist_popcount(s, e):
        d = popcount64(qw[s:e, None, 0] ^ dbw[None, :, 0])
        for w in range(1, qw.shape[1]):
            d += popcount64(qw[s:e, None, w] ^ dbw[None, :, w])
        return d.to(torch.int16)

    half = torch.float16 if device.type == "cuda" else torch.float32
    qf = torch.from_numpy(q).to(device, half)
    dbf = torch.from_numpy(db).to(device, half)

    def dist_matmul(s, e):  # (k − q·b)/2, integers ≤ 64: exact in fp16 with fp32 accumulation
        return ((bits - qf[s:e] @ dbf.T) * 0.5).to(torch.int16)

    chunk = 16 if smoke else 100
    check = dist_popcount(0, min(chunk, nq))
    same = bool(torch.equal(check, dist_matmul(0, min(chunk, nq))))
    ref = torch.from_numpy(retrieval.hamming_distances(retrieval.pack_codes(q[:chunk]),
                                                       retrieval.pack_codes(db)).astype(np.int16))
    same = same and bool(torch.equal(check.cpu(), ref))
    rows = [["ours on the CPU: mean_average_precision (baseline)", t_cpu, 1e3 * t_cpu / nq,
             "1.0×", f"{map_cpu:.6f}"]]
    checks = [(f"Hamming: both GPU ways' distances = the library's ({min(chunk, nq)} queries)",
               same)]
    for label, fn in (("GPU: int64 XOR + SWAR popcount, stable sort", dist_popcount),
                      ("GPU: fp16 ±1 matmul, stable sort", dist_matmul)):
        gpu_map(fn, min(chunk, nq), rel, chunk)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        value = gpu_map(fn, nq, rel, chunk)
        sync(device)
        t = time.perf_counter() - t0
        rows.append([label, t, 1e3 * t / nq, ratio(t_cpu, t), f"{value:.6f}"])
        checks.append((f"Hamming, {label}: mAP@all = the CPU's (|Δ| {abs(value - map_cpu):.1e})",
                       abs(value - map_cpu) <= 1e-9))
    for label, fn in (("GPU distances only: XOR + popcount", dist_popcount),
                      ("GPU distances only: fp16 matmul", dist_matmul)):
        t = clock(lambda fn=fn: [fn(s, min(s + chunk, nq)) for s in range(0, nq, chunk)],
                  device, 3 if not smoke else 1, 1)
        rows.append([label, t, 1e3 * t / nq, ratio(t_cpu, t), ""])
    note = (f"{nq:,} queries × {n:,} codes × {bits} bits; distances of both GPU ways equal the "
            f"library's: {'yes' if same else 'NO'}")
    return rows, note, checks


# ---------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="toy sizes on the CPU, to test the script where there is no GPU")
    parser.add_argument("--json", help="also write the tables' rows to this JSON file")
    args = parser.parse_args()
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
    else:
        sys.exit("no GPU: run with --cpu-smoke to test the script on the CPU")
    load0 = _env.load_average()
    started = time.perf_counter()
    out: dict = {"device": str(device), "smoke": args.cpu_smoke}
    checks: list[tuple[str, bool]] = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    print(f"# GPU check on {name}{' — smoke run, numbers mean nothing' if args.cpu_smoke else ''}")

    def save() -> None:
        out["checks"] = [{"what": what, "ok": ok} for what, ok in checks]
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))

    def part(title: str, headers: list[str], fn) -> None:
        t0 = time.perf_counter()
        try:
            rows, note, got = fn(device, args.cpu_smoke)
            print(f"\n## {title}{': ' + note if note else ''}\n")
            print(table(headers, rows))
            checks.extend(got)
            out[title] = {"rows": rows, "note": note}
        except Exception as e:  # one broken part must not cost the others their numbers
            print(f"\n## {title}\n\nFAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
            checks.append((f"{title}: ran (FAILED: {type(e).__name__})", False))
            out[title] = {"error": f"{type(e).__name__}: {e}"}
        print(f"\n({title}: {time.perf_counter() - t0:.1f} s)", flush=True)
        save()

    part("Hash streams (one stream; uint8 in, preprocessed on the device)",
         ["backbone", "batch", "precision", "train images/s", "encode images/s",
          "DADH train images/s (two streams)"], stream_rows)
    part("Code step (H, Q, one DCC sweep from B = 0)",
         ["variant", "s", "speed-up vs CPU", "bits ≠ CPU"], code_rows)
    part("Hamming ranking and mAP@all",
         ["method", "total s", "ms / query", "speed-up vs CPU", "mAP@all"], hamming_rows)
    print(f"\n- total {time.perf_counter() - started:.0f} s")
    _env.print_environment(load0)
    status = exit_status(checks)
    out["exit_status"] = status
    save()
    return status


if __name__ == "__main__":
    sys.exit(main())
