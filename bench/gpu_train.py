"""GPU check of the training loop: `loop.train` on cuda:0 through an NCCL process group, no Ray.

    python bench/gpu_train.py [--cpu-smoke] [--json FILE]      (or: bash bench/gpu_check.sh)

Every run is one fresh process per rank (this script with --child), set up as a Ray Train GPU
worker sets itself up (`dadh_dist.run.ray_train.ray_worker`): torch threads from
scaling.cpus_per_worker, `cuda.set_device`, cuDNN autotuning and TF32 from train.tf32, a process
group on 127.0.0.1 (tcp init), `TorchCollectives` on the device for NCCL, the loop's own DDP
wrapping, and checkpoints merged from every rank's part into the run folder as Ray Train merges
them. The config is configs/debug_cpu.toml (digits, 16 bits) as the Ray driver would hand it to
GPU workers (scaling.use_gpu = true). The runs, most important first:

  nccl    cuda:0, NCCL group of 1, fp32 (train.amp = off), T outer iterations
  bf16    the same with train.amp = bf16
  resume  a fresh process resumes `nccl` from its checkpoint of iteration T-1 and runs the last
          one: does it end on the straight run's B?
  cpu     the same config on the CPU in a 1-process gloo group: how far from `nccl` (different
          float arithmetic; reported, not required to match)
  stream  scaling.stream_parallel on W = 2 (f on rank 0, g on rank 1), both ranks on cuda:0. NCCL
          refuses two ranks on one GPU, so the group is gloo with the collectives on the CPU;
          with one worker per stream there is no DDP, so gloo never sees a CUDA tensor.

Each run prints a RESULT line (test mAP, seconds per outer iteration, B's checksum
`codes/checksum`, and whether jobs/evaluate.py's fp32 evaluation of the run's checkpoint on the
same device gives the run's reported test mAP: under bf16 too, since the loop evaluates in
fp32; on a GPU also the synchronizing CUDA calls inside one mini-batch step, median and most, as
torch's sync debug mode warns of them in the main thread: the backward pass's own threads are not
seen); a failed run prints its traceback and the next one
starts. A run still going at its deadline is killed. The JSON is rewritten after every run.
Exit status: the number of failed runs plus failed checks (`resume` ends on `nccl`'s B
checksum; every run's mAP is evaluate.py's; the stream-parallel ranks agree); a skipped run
counts as neither.

`--cpu-smoke` runs the same plan on the CPU with gloo everywhere and fewer iterations, to test the
script where there is no GPU (`nccl` and `bf16` then are CPU runs; bf16 autocast is GPU-only in
the loop, so they equal `cpu`).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # dadh_dist from a bare checkout

import _env  # noqa: E402  (sets OMP_WAIT_POLICY before torch loads)
from _common import exit_status, free_port, table  # noqa: E402

DEBUG = REPO / "configs" / "debug_cpu.toml"
OUTER_ITERS = 4  # the debug config's own: it learns (test mAP ~0.9) in that many
SMOKE = ["train.num_samples=256", "train.inner_epochs=1"]
RUN_LIMIT_S = 75  # the first run compiles the numba kernels and starts CUDA and NCCL
MIN_RUN_S = 15  # a run that cannot get this much of the budget is skipped


# --------------------------------------------------------------------------- one rank (child)


def child(spec: dict) -> int:
    """One rank of one run; writes result_<rank>.json into the run's folder. Returns the exit
    status."""
    started = time.perf_counter()
    folder, rank = Path(spec["folder"]), spec["rank"]
    result: dict = {"rank": rank}
    try:
        result.update(_train_rank(spec, folder, started))
    except BaseException as e:
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-4000:]
    result["ray_imported"] = sys.modules.get("ray") is not None
    (folder / f"result_{rank}.json").write_text(json.dumps(result, indent=1))
    return 1 if "error" in result else 0


def _train_rank(spec: dict, folder: Path, started: float) -> dict:
    import torch
    import torch.distributed as dist

    from dadh_dist import checkpoint as ckpt
    from dadh_dist import config, loop
    from dadh_dist.distributed import TorchCollectives
    from dadh_dist.run.folders import keep_checkpoint
    from dadh_dist.run.local import worker_threads

    stand_ins = _stand_in_missing_tqdm()
    cfg = config.load(DEBUG, spec["overrides"])
    device = torch.device(spec["device"])
    torch.set_num_threads(worker_threads(cfg))
    if device.type == "cuda":  # as ray_worker does
        torch.cuda.set_device(device)
        fast = cfg.train.tf32
        torch.backends.cudnn.benchmark = fast
        torch.backends.cuda.matmul.allow_tf32 = fast
        torch.backends.cudnn.allow_tf32 = fast
    dist.init_process_group(spec["backend"], init_method=f"tcp://127.0.0.1:{spec['port']}",
                            rank=spec["rank"], world_size=spec["world"],
                            timeout=timedelta(seconds=spec["collective_timeout_s"]))
    try:
        # NCCL moves only device tensors; gloo's collectives stay on the CPU
        c = TorchCollectives(device if spec["backend"] == "nccl" else None)
        reports: list[dict] = []

        def report(metrics: dict, staged: Path | None) -> None:
            reports.append(metrics)
            if staged is None:
                return
            # what Ray Train does with the parts every rank reports: one folder, kept by rank 0
            merge = folder / f".merge_{int(metrics['t']):06d}"
            merge.mkdir(exist_ok=True)
            for path in staged.iterdir():
                shutil.copy2(path, merge / path.name)
            c.barrier()
            if c.rank == 0:
                keep_checkpoint(folder, merge)
                shutil.rmtree(merge)
            c.barrier()

        resume = Path(spec["resume_from"]) if spec["resume_from"] else None
        env = loop.WorkerEnv(collectives=c, device=device, report=report, resume_from=resume,
                             run_dir=folder if c.rank == 0 else None, progress=False)
        syncs = _count_step_syncs(loop, torch) if device.type == "cuda" else []
        setup_s = time.perf_counter() - started
        t0 = time.perf_counter()
        final = loop.train(cfg, env)
        train_s = time.perf_counter() - t0
        c.barrier()
    finally:
        dist.destroy_process_group()
    walls = [m["time/wall_s"] for m in reports]
    out = {
        "setup_s": setup_s, "train_s": train_s,
        "iter_s": [b - a for a, b in zip([0.0] + walls, walls)],
        "checksum": int(reports[-1]["codes/checksum"]),
        "images_per_s": [m.get("perf/images_per_s") for m in reports],
        "final": {k: v for k, v in final.items() if isinstance(v, (int, float, str))},
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else "CPU"),
        "torch": torch.__version__, "stand_ins": stand_ins,
        # the host's waits for the device inside one mini-batch step (torch's sync debug mode):
        # median and most over the run's steps; the loop aims at one (the finite flags)
        "step_syncs": ([sorted(syncs)[len(syncs) // 2], max(syncs)] if syncs else None),
    }
    if device.type == "cuda":
        out["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if spec["rank"] == 0:
        import numpy as np

        state, _ = ckpt.load(ckpt.latest_valid(folder))
        np.save(folder / "B.npy", state["B"].numpy())
        # the tools' evaluation of the same checkpoint on the same device (fp32, as evaluate
        # runs): the run's reported mAP must be it, under train.amp = bf16 too
        from dadh_dist import inference, report

        hf, ds = inference.load_with_data(folder, device)
        ev = report.evaluate(hf, ds, ["fg"], "query")
        out["tools_map_all_fg"] = ev.metrics["map_all_fg"]
    return out


def _count_step_syncs(loop, torch) -> list[int]:
    """Wrap `loop._step` so that each call counts the synchronizing CUDA operations torch's
    sync debug mode warns about inside it; returns the list the counts go into."""
    import warnings

    counts: list[int] = []
    step = loop._step

    def counted(*args, **kwargs):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return step(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                counts.append(sum("synchroniz" in str(w.message) for w in seen))

    loop._step = counted
    return counts


def _stand_in_missing_tqdm() -> list[str]:
    """The loop imports tqdm for its progress bar even when the bar is off (progress=False); the
    GPU machine may not have it. A bar that does nothing stands in, and the report says so."""
    if importlib.util.find_spec("tqdm") is not None:
        return []
    import types

    class NoBar:
        def __init__(self, *args, **kwargs):
            pass

        def update(self, n: int = 1) -> None:
            pass

        def close(self) -> None:
            pass

    module = types.ModuleType("tqdm")
    module.tqdm = NoBar
    # torch._dynamo looks every module it knows of up with find_spec, which wants a spec
    module.__spec__ = importlib.machinery.ModuleSpec("tqdm", None)
    sys.modules["tqdm"] = module
    return ["tqdm"]


# ------------------------------------------------------------------------- the plan (parent)


def plan(device: str, backend: str, T: int, common: list[str]) -> list[dict]:
    """The runs in the order they are tried (the budget may cut the last ones)."""
    gpu = device == "cuda:0"
    on = ["scaling.use_gpu=true"] if gpu else []
    return [
        {"name": "nccl", "title": f"{backend} W=1 fp32", "device": device, "backend": backend,
         "world": 1, "overrides": common + on},
        {"name": "bf16", "title": f"{backend} W=1 bf16", "device": device, "backend": backend,
         "world": 1, "overrides": common + on + ['train.amp="bf16"']},
        {"name": "resume", "title": f"{backend} W=1 fp32, resumed at {T - 1}", "device": device,
         "backend": backend, "world": 1, "overrides": common + on, "resume_of": "nccl",
         "resume_at": T - 1},
        {"name": "cpu", "title": "gloo W=1 fp32 on the CPU", "device": "cpu", "backend": "gloo",
         "world": 1, "overrides": common},
        {"name": "stream", "title": "gloo W=2 stream-parallel", "device": device,
         "backend": "gloo", "world": 2,
         "overrides": common + on + ["scaling.num_workers=2", "scaling.stream_parallel=true"]},
    ]



def launch(run: dict, folder: Path, timeout_s: float, resume_from: Path | None) -> dict:
    """Start the run's ranks, wait until they end or the deadline passes, collect rank 0's
    result (and the others' errors)."""
    folder.mkdir(parents=True)
    base = {"folder": str(folder), "port": free_port(), "world": run["world"],
            "device": run["device"], "backend": run["backend"], "overrides": run["overrides"],
            "resume_from": str(resume_from) if resume_from else "",
            "collective_timeout_s": int(max(10, timeout_s - 5))}
    sys.stdout.flush()
    procs = [subprocess.Popen([sys.executable, __file__, "--child",
                               json.dumps({**base, "rank": rank})])
             for rank in range(run["world"])]
    deadline = time.monotonic() + timeout_s
    timed_out = False
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    if timed_out:
        for p in procs:
            p.kill()
            p.wait()
    results = []
    for rank, p in enumerate(procs):
        path = folder / f"result_{rank}.json"
        results.append(json.loads(path.read_text()) if path.is_file() else
                       {"error": f"rank {rank} wrote no result (exit {p.returncode})"})
    if timed_out:
        return {"status": "failed", "error": f"killed at its deadline of {timeout_s:.0f} s"}
    errors = [f"rank {r['rank'] if 'rank' in r else i}: {r['error']}"
              for i, r in enumerate(results) if "error" in r]
    if errors:
        return {"status": "failed", "error": "; ".join(errors),
                "traceback": next(r.get("traceback", "") for r in results if "error" in r)}
    out = {"status": "ok", **results[0]}
    if run["world"] > 1:  # every rank must end on the same B and mAP
        maps = [{k: v for k, v in r["final"].items() if k.startswith("map_")} for r in results]
        out["ranks_agree"] = all(r["checksum"] == out["checksum"] and m == maps[0]
                                 for r, m in zip(results, maps))
    out["ray_imported"] = any(r.get("ray_imported") for r in results)
    return out


# ------------------------------------------------------------------------------ the report


def _iter_cell(rec: dict) -> str:
    s = rec["iter_s"]
    if len(s) == 1:
        return f"{s[0]:.2f}"
    return f"{sum(s[1:]) / len(s[1:]):.2f} (first {s[0]:.1f})"


def _map_cell(rec: dict) -> str:
    f = rec["final"]
    return " / ".join(f"{f[f'map_all_{e}']:.4f}" for e in ("f", "g", "fg"))


def _tools_agree(rec: dict) -> bool:
    """The run's test mAP fg is jobs/evaluate.py's (to 1e-9: W workers sum AP in blocks)."""
    tools = rec.get("tools_map_all_fg")
    return tools is not None and abs(tools - rec["final"]["map_all_fg"]) <= 1e-9


def result_line(name: str, rec: dict) -> str:
    if rec["status"] != "ok":
        return f"RESULT {name}: {rec['status'].upper()}: {rec.get('error', rec.get('reason'))}"
    return (f"RESULT {name}: ok | test mAP f/g/fg {_map_cell(rec)} | s/iter {_iter_cell(rec)} | "
            f"B checksum {rec['checksum']} | evaluate.py's mAP fg "
            f"{'equal' if _tools_agree(rec) else 'DIFFERS'} | host syncs per step (median, max) "
            f"{rec.get('step_syncs') or 'n/a'} | setup {rec['setup_s']:.1f} s, train "
            f"{rec['train_s']:.1f} s, process {rec['seconds']:.1f} s")


def compare(records: dict, folders: dict) -> dict:
    """Each finished run against `nccl`: B's bits apart, test mAP (fg) apart, same checksum."""
    import numpy as np

    ref = records.get("nccl", {})
    if ref.get("status") != "ok":
        return {}
    B0 = np.load(folders["nccl"] / "B.npy")
    out = {}
    for name, rec in records.items():
        if name == "nccl" or rec.get("status") != "ok":
            continue
        B = np.load(folders[name] / "B.npy")
        apart = int((B != B0).sum())
        out[name] = {"bits_apart": apart, "fraction_apart": apart / B0.size,
                     "same_checksum": rec["checksum"] == ref["checksum"],
                     "map_fg_minus_nccl": rec["final"]["map_all_fg"] - ref["final"]["map_all_fg"]}
    return out


COMPARE_NOTE = {
    "bf16": "bf16 autocast against fp32 on the same device",
    "resume": "resumed from the straight run's checkpoint: should end on its B (checksum equal)",
    "cpu": "the CPU against the GPU (float arithmetic differs; not expected to be bit-identical)",
    "stream": "stream-parallel W=2 against W=1 (equal on the CPU in tests/test_distributed.py)",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="the same plan on the CPU with gloo, small, to test the script")
    parser.add_argument("--json", help="write every run's record and the comparisons here")
    parser.add_argument("--budget-s", type=float, default=140.0,
                        help="wall seconds for all runs; runs that would not fit are skipped")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    import torch
    import torch.distributed as dist

    started = time.perf_counter()
    load0 = _env.load_average()
    # every rank is on this machine: gloo's pairs on the loopback, not on whatever address the
    # host name resolves to (a machine cut off from the network may have none that works)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if args.cpu_smoke:
        device, backend, T = "cpu", "gloo", 2
    elif torch.cuda.is_available() and dist.is_nccl_available():
        device, backend, T = "cuda:0", "nccl", OUTER_ITERS
    else:
        sys.exit("no GPU with NCCL here: run with --cpu-smoke to test the script on the CPU")
    common = [f"train.outer_iters={T}"] + (SMOKE if args.cpu_smoke else [])
    missing = [m for m in ("tqdm", "matplotlib", "tensorboard", "sklearn")
               if importlib.util.find_spec(m) is None]
    notes = []
    if "matplotlib" in missing or "tensorboard" in missing:
        # the loop draws its PR curves with matplotlib into TensorBoard at the last iteration
        common.append("log.tensorboard=false")
        notes.append("log.tensorboard=false: matplotlib or tensorboard is not installed")
    if "tqdm" in missing:
        notes.append("tqdm is not installed: a do-nothing progress bar stands in for it")
    print(f"# Training loop on {device} ({backend}), no Ray"
          f"{' — smoke run on the CPU, numbers mean nothing' if args.cpu_smoke else ''}\n")
    print(f"- config: {DEBUG.relative_to(REPO)} + {' '.join(common)}")
    print(f"- missing modules: {', '.join(missing) or 'none'}; "
          f"GLOO_SOCKET_IFNAME={os.environ['GLOO_SOCKET_IFNAME']}")
    for note in notes:
        print(f"- {note}")
    out: dict = {"smoke": args.cpu_smoke, "device": device, "backend": backend, "outer_iters": T,
                 "overrides": common, "missing_modules": missing, "notes": notes, "runs": {}}
    records, folders = out["runs"], {}
    work = Path(tempfile.mkdtemp(prefix="dadh_gpu_train_"))

    def save() -> None:
        out["comparisons"] = compare(records, folders)
        out["total_s"] = time.perf_counter() - started
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1, default=str))

    try:
        for run in plan(device, backend, T, common):
            name = run["name"]
            print(f"\n## {name}: {run['title']}\n", flush=True)
            left = args.budget_s - (time.perf_counter() - started)
            reason = None
            resume_from = None
            if run.get("resume_of"):
                src = records.get(run["resume_of"], {})
                resume_from = folders.get(run["resume_of"], work) / \
                    f"checkpoint_{run['resume_at']:06d}"
                if src.get("status") != "ok" or not resume_from.is_dir():
                    reason = f"needs run {run['resume_of']} and its checkpoint {resume_from.name}"
            if run["backend"] == "gloo" and not dist.is_gloo_available():
                reason = "this torch has no gloo backend"
            if reason is None and left < MIN_RUN_S:
                reason = f"only {left:.0f} s of the {args.budget_s:.0f} s budget left"
            if reason is not None:
                rec = {"status": "skipped", "reason": reason}
            else:
                folders[name] = work / name
                t0 = time.perf_counter()
                try:
                    rec = launch(run, folders[name], min(RUN_LIMIT_S, left), resume_from)
                except Exception as e:  # the launcher itself: the next run still starts
                    traceback.print_exc()
                    rec = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
                rec["seconds"] = time.perf_counter() - t0
            rec.update(title=run["title"], device=run["device"], backend=run["backend"],
                       workers=run["world"], overrides=run["overrides"])
            records[name] = rec
            print(result_line(name, rec), flush=True)
            save()
        failed = sum(r["status"] == "failed" for r in records.values())
        summary(records, out["comparisons"])
        print(f"\n- {failed} run(s) failed, "
              f"{sum(r['status'] == 'skipped' for r in records.values())} skipped; "
              f"total {time.perf_counter() - started:.0f} s")
        _env.print_environment(load0)
        checks = run_checks(records, out["comparisons"])
        out["checks"] = [{"what": what, "ok": ok} for what, ok in checks]
        exit_status(checks)
        failed += sum(not ok for _, ok in checks)
        out["exit_status"] = failed
        save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return failed


def run_checks(records: dict, comparisons: dict) -> list[tuple[str, bool]]:
    """What the finished runs must show (bf16 and the CPU may differ from `nccl`: not here)."""
    checks = []
    if "resume" in comparisons:
        checks.append(("resume ends on nccl's B (checksum)",
                       comparisons["resume"]["same_checksum"]))
    for name, rec in records.items():
        if rec["status"] == "ok":
            checks.append((f"{name}: test mAP fg = evaluate.py's", _tools_agree(rec)))
        if "ranks_agree" in rec:
            checks.append((f"{name}: every rank ends on the same B and mAP", rec["ranks_agree"]))
    return checks


def summary(records: dict, comparisons: dict) -> None:
    rows = []
    for name, rec in records.items():
        ok = rec["status"] == "ok"
        cmp = comparisons.get(name)
        rows.append([name, rec["title"], rec["device"], rec["status"],
                     _map_cell(rec) if ok else "", _iter_cell(rec) if ok else "",
                     rec["checksum"] if ok else "",
                     f"{cmp['bits_apart']} ({cmp['fraction_apart']:.2%})" if cmp else "",
                     f"{rec['seconds']:.1f}" if "seconds" in rec else ""])
    print("\n## Summary\n")
    print(table(["run", "what", "device", "status", "test mAP f / g / fg",
                 "s / outer iteration", "B checksum", "B bits ≠ nccl", "process s"], rows))
    print()
    for name, cmp in comparisons.items():
        print(f"- {name} vs nccl ({COMPARE_NOTE[name]}): "
              f"{'same' if cmp['same_checksum'] else 'different'} checksum, "
              f"{cmp['bits_apart']} bits of B apart, test mAP fg {cmp['map_fg_minus_nccl']:+.4f}")
    for name, rec in records.items():
        if rec["status"] == "ok" and not _tools_agree(rec):
            print(f"- {name}: the run reported test mAP fg {rec['final']['map_all_fg']:.6f}, "
                  f"jobs/evaluate.py's evaluation of its checkpoint gives "
                  f"{rec.get('tools_map_all_fg')}")
        if rec.get("ranks_agree") is False:
            print(f"- {name}: the ranks ended on different B or mAP")
        if rec.get("ray_imported"):
            print(f"- {name}: ray was imported in a worker process")
        if rec.get("stand_ins"):
            print(f"- {name}: stand-ins used for {', '.join(rec['stand_ins'])}")
        if rec["status"] == "ok" and rec["device"].startswith("cuda"):
            print(f"- {name}: {rec['device_name']}, torch {rec['torch']}, peak "
                  f"{rec.get('max_memory_allocated_mib', 0):.0f} MiB allocated")


if __name__ == "__main__":
    sys.exit(main())
