"""Shared command-line plumbing: config file + dotted overrides, user errors as exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from dadh_dist import config as config_mod
from dadh_dist.config import ConfigError

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1


def split_overrides(extra: list[str]) -> list[str]:
    """`--a.b=1`, `a.b=1` and `--a.b 1` all become `a.b=1`."""
    out, i = [], 0
    while i < len(extra):
        item = extra[i]
        if item.startswith("--") and "=" not in item:
            if i + 1 >= len(extra):
                raise ConfigError(f"{item[2:]}: missing value (use {item[2:]}=VALUE)")
            out.append(f"{item[2:]}={extra[i + 1]}")
            i += 2
            continue
        if "=" not in item:
            raise ConfigError(f"{item}: overrides have the form section.key=value")
        out.append(item.removeprefix("--"))
        i += 1
    return out


def config_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Any config key can be overridden: --objective.gamma=200 train.outer_iters=5",
    )
    parser.add_argument("--config", help="TOML config file (defaults < file < overrides)")
    return parser


def parse_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple:
    """(args, Config) from the command line."""
    args, extra = parser.parse_known_args(argv)
    cfg = config_mod.load(args.config, split_overrides(extra))
    return args, cfg


def run_main(body: Callable[[], int | None]) -> int:
    """Run an entry point; user mistakes print one line and exit 2, never a traceback; a run
    that Ray Train gave up on (lost workers or nodes) prints one line and exits 1."""
    from dadh_dist.checkpoint import CheckpointError
    from dadh_dist.codesfile import CodesError
    from dadh_dist.data import DataError
    from dadh_dist.driver import RunFailed
    from dadh_dist.export import ExportError
    from dadh_dist.loop import NonFiniteLoss
    from dadh_dist.storage import StorageError

    try:
        return body() or 0
    except (ConfigError, DataError, CheckpointError, CodesError, FileNotFoundError,
            StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (RunFailed, NonFiniteLoss, ExportError) as e:  # NonFiniteLoss: a run in this process
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def train_main(argv: list[str] | None = None) -> int:
    parser = config_parser("Train DADH hash functions (Ray Train, or in-process with "
                           "scaling.use_ray=false).")

    def body() -> int:
        _, cfg = parse_config(parser, argv)
        from dadh_dist import driver

        final = driver.run(cfg)
        print(f"run folder: {final['run_dir']}")
        print("final metrics: " + ", ".join(
            f"{k}={v:.4f}" for k, v in sorted(final.items())
            if k.startswith(("map_", "p_at_")) and isinstance(v, float)))
        return 0

    return run_main(body)


# ---------------------------------------------------------------------------------------------
# Using a trained hash function: evaluate, encode, search, export.

def add_model_args(parser: argparse.ArgumentParser, required: bool = True,
                   help: str = "run folder (its newest valid checkpoint) or a checkpoint_* folder",
                   ) -> None:
    """--checkpoint and --device, shared by every tool that loads a trained hash function."""
    parser.add_argument("--checkpoint", required=required, help=help)
    parser.add_argument("--device", default="cpu", type=device_arg,
                        help="torch device of the streams: cpu, cuda, cuda:N (default: cpu)")


def device_arg(text: str):
    """A torch device that exists on this machine (argparse type: a bad one is a usage error)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda devices are supported")
    return device

def evaluate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(
        "Evaluate a trained run (asymmetric protocol: queries encoded by the network, database = "
        "learned B): metrics.json, PR and P@N plots, example retrievals, report.md, TensorBoard."))
    add_model_args(parser)
    parser.add_argument("--out", help="output folder (default: <run>/eval/<checkpoint>_<split>; "
                        "for a run URI the local mirror's, then sent to the URI)")
    parser.add_argument("--encoders", help="query encoders, comma-separated among f,g,fg "
                        "(default: the run's eval.encoders)")
    parser.add_argument("--split", default="query", choices=("query", "validation"),
                        help="query images to rank the database with (default: query)")
    parser.add_argument("--topk", type=int, help="cut-off of mAP@k (default: the run's "
                        "eval.topk, or 1000 when that is 0; 0 = mAP@all only)")
    parser.add_argument("--examples", type=int, default=6,
                        help="example queries drawn in examples.png (0 = no picture)")
    parser.add_argument("--no-tensorboard", action="store_true", help="skip the tb/ events")

    def body() -> int:
        args = parser.parse_args(argv)
        from pathlib import Path

        from dadh_dist import inference, report, storage

        for option, value in (("--topk", args.topk), ("--examples", args.examples)):
            if value is not None and value < 0:
                raise ConfigError(f"{option}: must be >= 0, got {value}")
        hf, dataset = inference.load_with_data(args.checkpoint, args.device)
        encoders = [e.strip() for e in args.encoders.split(",")] if args.encoders else None
        ev = report.evaluate(hf, dataset, encoders, args.split, args.topk)
        out = (Path(args.out) if args.out
               else hf.run_folder / "eval" / f"{hf.checkpoint.name}_{args.split}")
        paths = report.write(out, ev, hf, dataset, args.examples, not args.no_tensorboard)
        for e in ev.encoders:
            print(f"{report.NAMES[e]:>10}: " + ", ".join(
                f"{title} {ev.metrics[f'{key}_{e}']:.4f}" for title, key in ev.table()))
        print(f"report: {paths['report.md']}")
        if storage.is_uri(args.checkpoint) and not args.out:
            # a remote run's evaluation goes next to it, like a local run's
            target = storage.join(_run_of(args.checkpoint), "eval", out.name)
            storage.Publisher(out, target)()
            print(f"published: {storage.redact(target)}")
        return 0

    return run_main(body)


def _run_of(uri: str) -> str:
    """The run URI of a run or checkpoint URI."""
    from dadh_dist import storage

    parent, name = storage.split(uri)
    return parent if name.startswith(storage.CHECKPOINT_PREFIX) else uri


def encode_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(
        "Encode images with a trained hash function into a Parquet codes file (id, packed code; "
        "bits, encoder, model hash and config as metadata)."))
    add_model_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="image folder, list file (path per line), folder of "
                        "Parquet shards, or one image")
    source.add_argument("--split", choices=("query", "validation", "database"),
                        help="a split of the run's own dataset")
    parser.add_argument("--parquet-split", choices=("query", "validation", "database"),
                        help="with a Parquet --images folder: keep only this split's rows")
    parser.add_argument("--learned", action="store_true",
                        help="with --split database: write the learned codes B, not the network's")
    parser.add_argument("--encoder", choices=("f", "g", "fg"),
                        help="query encoder (default: fg with two streams, else f)")
    parser.add_argument("--out", required=True, help="codes file to write (.parquet)")
    parser.add_argument("--batch", type=int, help="images per forward pass (default: the run's "
                        "eval.batch_size)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")

    def body() -> int:
        args = parser.parse_args(argv)
        import time

        from dadh_dist import codesfile, inference

        if args.batch is not None and args.batch < 1:
            raise ConfigError(f"--batch: must be >= 1, got {args.batch}")
        codesfile.check_writable(args.out)  # before the encoding, not after it
        hf = inference.load(args.checkpoint, args.device)
        t0 = time.perf_counter()
        split = args.parquet_split if args.images else args.split
        codes = inference.encode_to_codes(hf, args.images, split, args.encoder, args.learned,
                                          args.batch, not args.quiet)
        seconds = time.perf_counter() - t0
        path = codesfile.write(args.out, codes)
        print(f"wrote {len(codes)} codes ({codes.bits} bits, encoder {codes.encoder}, model "
              f"{codes.model_sha256[:12]}) to {path}; {seconds:.2f} s with reading the images")
        return 0

    return run_main(body)


def search_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(
        "Top-k Hamming search: query codes, or images encoded with --checkpoint, against a "
        "database codes file."))
    add_model_args(parser, required=False,
                   help="run or checkpoint folder that encodes query images")
    parser.add_argument("--database", required=True, help="database codes file (.parquet)")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--query", help="codes file, or images (folder, list file, Parquet "
                       "shards, one image) encoded with --checkpoint")
    query.add_argument("--split", choices=("query", "validation", "database"),
                       help="a split of the run's own dataset as queries (needs --checkpoint)")
    parser.add_argument("--encoder", choices=("f", "g", "fg"),
                        help="query encoder for images (default: fg with two streams, else f)")
    parser.add_argument("-k", "--k", type=int, default=10, help="results per query (10)")
    parser.add_argument("--backend", choices=("packed", "faiss"), default="packed",
                        help="packed XOR + popcount (default) or faiss IndexBinaryFlat")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress or timing lines")

    def body() -> int:
        args = parser.parse_args(argv)
        import os

        from dadh_dist import codesfile

        database = codesfile.read(args.database)
        if len(database) == 0:
            raise codesfile.CodesError(f"{database.name}: the database holds no codes")
        if args.query is not None and codesfile.is_codes_file(args.query):
            queries = codesfile.read(args.query)
        else:  # images: the network is needed only here
            from dadh_dist import inference

            queries = inference.query_codes_from(args.query, args.checkpoint, args.encoder,
                                                 args.split, args.device, not args.quiet)
        result = codesfile.search(queries, database, args.k, args.backend)
        if not args.quiet:
            print(f"searched {len(queries)} queries against {len(database)} codes in "
                  f"{result.seconds * 1e3:.1f} ms ({args.backend})", file=sys.stderr)

        text = result.to_json(database) if args.json else result.table()
        try:
            print(text, flush=True)
        except BrokenPipeError:  # the reader (e.g. `head`) stopped early: not a search error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

    return run_main(body)


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(
        "Export a trained hash function: a torch.export program (uint8 images -> int8 ±1 codes, "
        "dynamic batch) plus the streams' state_dicts."))
    add_model_args(parser)
    parser.add_argument("--encoder", choices=("f", "g", "fg"),
                        help="what the program computes (default: fg with two streams, else f)")
    parser.add_argument("--out", help="output folder (default: <run>/export/<checkpoint>_<enc>)")

    def body() -> int:
        args = parser.parse_args(argv)
        from pathlib import Path

        from dadh_dist import export, inference

        hf = inference.load(args.checkpoint, args.device)
        encoder = hf.check_encoder(args.encoder or hf.default_encoder)
        out = (Path(args.out) if args.out
               else hf.run_folder / "export" / f"{hf.checkpoint.name}_{encoder}")
        paths = export.export(hf, encoder, out)
        print(f"program: {paths['program']} (uint8 (N, {hf.channels}, {hf.image_size}, "
              f"{hf.image_size}) -> int8 ±1 (N, {hf.bits}); round trip checked)")
        print(f"weights: {paths['weights']}")
        print(f"metadata: {paths['metadata']}")
        return 0

    return run_main(body)


def tune_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Sweep DADH hyper-parameters with Ray Tune: every trial is a full training "
                    "run, ranked on validation mAP; rerunning an interrupted sweep resumes it.",
        epilog="Extra section.key=value arguments override the base training config "
               "(after the sweep file's [overrides]), e.g. train.outer_iters=5.",
    )
    parser.add_argument("--config", required=True, help="sweep TOML file (configs/sweep_*.toml)")
    parser.add_argument("--name", help="sweep name (default: the file's name key or stem)")
    parser.add_argument("--num-samples", type=int, help="trials to sample (overrides the file)")

    def body() -> int:
        args, extra = parser.parse_known_args(argv)
        from dadh_dist import tune

        sweep = tune.load_sweep(args.config, split_overrides(extra), args.num_samples, args.name)
        try:
            result = tune.run_sweep(sweep)
        except tune.SweepFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 130 if result["interrupted"] else 0

    return run_main(body)


def _comma_list(item: type):
    def parse(text: str) -> list:
        try:
            return [item(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {item.__name__} values, got {text!r}") from None

    return parse


def quality_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train every (method, bits, seed) cell of the retrieval-quality table as an "
                    "in-process run and print the Markdown table (finished runs are reused).",
        epilog="Extra section.key=value arguments apply to every run (the shared budget), "
               "e.g. train.outer_iters=10.",
    )
    parser.add_argument("--config", default="configs/fashion_mnist_{bits}.toml",
                        help="run config; {bits} is replaced by the code length")
    parser.add_argument("--methods", type=_comma_list(str), default=["dadh", "adsh"],
                        help="comma-separated, any of: dadh, adsh, dadh-no-code, dadh-no-pair")
    parser.add_argument("--bits", type=_comma_list(int), default=[32],
                        help="comma-separated code lengths, e.g. 12,24,32,48")
    parser.add_argument("--seeds", type=_comma_list(int), default=[0],
                        help="comma-separated training seeds, e.g. 0,1,2")
    parser.add_argument("--out", default="runs/quality", help="folder of the runs and the table")
    parser.add_argument("--parallel", type=int, default=1, help="runs at the same time")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per run (0 = CPUs / parallel)")
    parser.add_argument("--method-override", action="append", default=[], metavar="M:KEY=VALUE",
                        help="override for one method only, e.g. adsh:train.outer_iters=20")
    parser.add_argument("--table-only", action="store_true",
                        help="train nothing: tabulate the cells that already finished")

    def body() -> int:
        import os
        from pathlib import Path

        from dadh_dist import quality

        args, extra = parser.parse_known_args(argv)
        unknown = sorted(set(args.methods) - set(quality.METHODS))
        if unknown:
            raise ConfigError(f"--methods: unknown {', '.join(unknown)}; "
                              f"known: {', '.join(quality.METHODS)}")
        per_method: dict[str, list[str]] = {}
        for item in args.method_override:
            method, sep, override = item.partition(":")
            if not sep or method not in quality.METHODS:
                raise ConfigError(f"--method-override {item!r}: expected METHOD:KEY=VALUE with "
                                  f"METHOD one of {', '.join(quality.METHODS)}")
            per_method.setdefault(method, []).extend(split_overrides([override]))
        plan = quality.Plan(args.config, Path(args.out), split_overrides(extra), per_method)
        cells = [quality.Cell(m, b, s) for b in args.bits for m in args.methods
                 for s in args.seeds]
        for cell in cells:  # every config file and override checked before anything runs
            config_mod.load(plan.config_path(cell), plan.cell_overrides(cell))
        threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.parallel))
        rows = quality.run_plan(plan, cells, args.parallel, threads, train=not args.table_only)
        if args.table_only:
            print(quality.table(rows), end="")
            return 0
        path = quality.write(plan, rows)
        print(path.read_text(), end="")
        print(f"table: {path}")
        return 1 if any("error" in r for r in rows) else 0

    return run_main(body)
