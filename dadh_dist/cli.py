"""Shared command-line plumbing: one flag vocabulary, config file + dotted overrides, user errors
as one line (or JSON) and exit code 2.

Importing this module costs only the standard library and `dadh_dist.config`: every tool parses
its arguments (`--help` and `--version` too) before torch, Ray or numpy are imported.

The flags the tools share, with one meaning each:

    --checkpoint RUN|CKPT   a run folder (its newest valid checkpoint), a checkpoint, or a run URI
    --device cpu|cuda[:N]   where the streams run
    --encoder f|g|fg        sign(f), sign(g) or sign(f+g); evaluate takes several: --encoders f,fg
    --topk N, -k N          results per query (search) or the mAP@k cut-off (evaluate)
    --batch-size N          images per forward pass (train: the global mini-batch)
    --out PATH              a FILE for encode and search, a FOLDER for evaluate, export, quality
    --quiet                 no progress bar or timing lines (notes about the input remain)
    --json                  the result as one JSON object on stdout, errors too (non-zero exit);
                            everything else a tool prints goes to stderr
    --name NAME             run or sweep name (train: the same as log.name=NAME)
    --version               the package version

Old spellings (`encode --batch`, `search --k`) still work and print a one-line note on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from dadh_dist import config as config_mod
from dadh_dist import uris
from dadh_dist.config import ENCODERS, ConfigError

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1

# Exceptions of ours that are user mistakes (exit 2) or a run that failed (exit 1), matched by
# class name along the exception's MRO, so that none of their modules (torch behind most of
# them) is imported just to be able to catch it.
USER_ERRORS = ("ConfigError", "DataError", "CheckpointError", "CodesError", "StorageError")
RUN_ERRORS = ("RunFailed", "NonFiniteLoss", "ExportError", "SweepFailed")


# ----------------------------------------------------------------------------------- the parser


class _Version(argparse.Action):
    """--version: the version is looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print the package version and exit"):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from dadh_dist import package_version

        print(f"{parser.prog} {package_version()}")
        parser.exit()


class _Deprecated(argparse.Action):
    """An old spelling of an option: stores into the new option's dest, with a note."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated, use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


class ToolParser(argparse.ArgumentParser):
    """ArgumentParser with --version, and usage errors as JSON when --json is on the line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.json_errors = False
        self.overrides_help: str | None = None
        """Set by `takes_overrides`: the tool reads dotted overrides after its options."""
        self.add_argument("--version", action=_Version)

    def format_usage(self):
        with self._overrides_shown():
            return super().format_usage()

    def format_help(self):
        with self._overrides_shown():
            return super().format_help()

    @contextlib.contextmanager
    def _overrides_shown(self):
        """The overrides as a positional argument while the usage or help is written, and only
        then: parsing leaves them to `overrides_in`, in the order they were given."""
        if self.overrides_help is None:
            yield
            return
        shown = argparse.Action([], "overrides", nargs="*", metavar=OVERRIDES_METAVAR,
                                help=self.overrides_help)
        self._actions.append(shown)
        self._positionals._group_actions.append(shown)
        try:
            yield
        finally:
            self._actions.remove(shown)
            self._positionals._group_actions.remove(shown)

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        self.json_errors = "--json" in argv
        return super().parse_known_args(argv, namespace)

    def error(self, message):
        """A usage mistake (unknown option, a value of the wrong type, a missing argument): one
        line naming it, as every other user error, and exit code 2; --help has the usage."""
        text = f"{self.prog}: {message} (see --help)"
        if self.json_errors:
            _print_json({"error": text, "exit_code": EXIT_USER_ERROR})
        else:
            print(f"error: {text}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


OVERRIDES_METAVAR = "section.key=value"


def takes_overrides(parser: ToolParser, help: str) -> None:
    """Show in `parser`'s usage and help that the tool takes dotted config overrides."""
    parser.overrides_help = help


def overrides_in(parser: argparse.ArgumentParser, extra: list[str]) -> list[str]:
    """The dotted overrides among what `parser` did not recognise (`extra`): anything else that
    looks like an option (`--nope`, `--nope=3`, `-x`: no section.key) is the usage error a tool
    without overrides gives, not taken for an override without a value."""
    unknown = [group[0] for group in config_mod.override_groups(extra)
               if group[0].startswith("-") and "." not in group[0].split("=", 1)[0]]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return extra


def deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, dest: str,
                     **kwargs) -> None:
    """Accept `old` as a hidden spelling of `new` (same dest), with a note when used."""
    parser.add_argument(old, dest=dest, action=_Deprecated, new=new, help=argparse.SUPPRESS,
                        **kwargs)


def add_model_args(parser: argparse.ArgumentParser, required: bool = True,
                   help: str = "run folder (its newest valid checkpoint), a checkpoint_* "
                               "folder, or a run URI", reads_data: bool = False) -> None:
    """--checkpoint and --device, shared by every tool that loads a trained hash function;
    `reads_data`: --data-root too, for the tools that can read the run's own dataset."""
    parser.add_argument("--checkpoint", required=required, metavar="RUN|CKPT", help=help)
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help="torch device of the streams: cpu, cuda, cuda:N (default: cpu)")
    if reads_data:
        parser.add_argument("--data-root", metavar="FOLDER", dest="data_root",
                            help="the run's data, moved since training: read it from FOLDER "
                                 "instead of the data.root the run was trained on")


def check_data_root(args: argparse.Namespace) -> None:
    """--data-root points at the run's own data, which only --split reads."""
    if args.data_root is not None and args.split is None:
        raise ConfigError("--data-root: only --split reads the run's own data; drop it, or "
                          "use --split")


def add_encoder_arg(parser: argparse.ArgumentParser, what: str = "query encoder") -> None:
    parser.add_argument("--encoder", choices=ENCODERS,
                        help=f"{what}: sign(f), sign(g) or sign(f+g) (default: fg with two "
                             "streams, else f)")


def add_batch_size_arg(parser: argparse.ArgumentParser, old: str | None = None) -> None:
    parser.add_argument("--batch-size", type=int, metavar="N", dest="batch_size",
                        help="images per forward pass (default: the run's eval.batch_size)")
    if old:
        deprecated_alias(parser, old, "--batch-size", "batch_size", type=int)


def add_output_args(parser: argparse.ArgumentParser, json_help: str,
                    quiet_help: str | None = "no progress bar or timing lines (notes about the "
                                             "input are still printed)") -> None:
    """--quiet (unless `quiet_help` is None) and --json."""
    if quiet_help is not None:
        parser.add_argument("--quiet", action="store_true", help=quiet_help)
    parser.add_argument("--json", action="store_true",
                        help=json_help + "; errors are JSON on stdout too, with a non-zero "
                             "exit code (2: a mistake in the input)")


def parse_device(text: str):
    """A torch device of a supported type, cpu or cuda, whether or not this machine has it
    (ArgumentTypeError otherwise)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda devices are supported")
    return device


def device_arg(text: str):
    """A torch device that exists on this machine (ArgumentTypeError otherwise)."""
    import torch

    device = parse_device(text)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s)")
    return device


def resolve_device(text: str, here: bool = True):
    """--device checked once the tool needs the network (torch is imported only then): one
    this machine has, or with `here` False one of a supported type (another machine's)."""
    try:
        return device_arg(text) if here else parse_device(text)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"--device: {e}") from None


CHECKPOINT_PREFIX = "checkpoint_"


def _run_files() -> tuple[str, ...]:
    """What a training run keeps in its folder besides its checkpoint_* folders (the saved config
    and `run.folders.OUTPUTS`): no tool's output may land on them. Imported when a tool checks its
    --out, not when the CLI starts."""
    from dadh_dist.run.folders import OUTPUTS

    return ("config.toml", *OUTPUTS)


def _is_checkpoint(folder: Path) -> bool:
    from dadh_dist import checkpoint as ckpt  # no torch: its loaders import it when they load

    return (folder / ckpt.MANIFEST).is_file() or (folder / ckpt.STATE).is_file()


def _is_run(folder: Path) -> bool:
    config, *outputs = _run_files()
    return (folder / config).is_file() and (
        any((folder / name).exists() for name in outputs)
        or any(folder.glob(CHECKPOINT_PREFIX + "*")))


def _run_owned(path: Path) -> str | None:
    """Why `path` (absolute) is a training run's own, or None: a run or checkpoint folder, or
    inside a checkpoint, tb/ or a saved config or metrics file (a run's eval/, export/ and other
    folders of the tools are not its own)."""
    for folder in (path, *path.parents):
        if _is_checkpoint(folder):
            return f"is the checkpoint {folder}" if folder == path else \
                f"lies inside the checkpoint {folder}"
        if _is_run(folder):
            if folder == path:
                return "is the folder of a training run"
            first = path.relative_to(folder).parts[0]
            if first in _run_files() or first.startswith(CHECKPOINT_PREFIX):
                return (f"is the run {folder}'s own {first}" if path == folder / first
                        else f"lies inside {folder / first}, the run's own")
            return None
    return None


def _replaces_input(path: Path, inputs: dict[str, str | Path | None]) -> str | None:
    """Why writing `path` would destroy an input of the tool, or None: it is one, or an existing
    file inside an input folder (a codes file there is output, not input)."""
    for option, given in inputs.items():
        if given is None or uris.is_uri(str(given)):
            continue
        source = Path(given).expanduser().resolve()
        if path == source:
            return f"is the {option} input"
        if source.is_dir() and source in path.parents and path.is_file():
            from dadh_dist import codesfile

            if not codesfile.is_codes_file(path):
                return f"is a file of the {option} input {source}"
    return None


def check_out(path: str | Path, what: str, folder: bool = False, option: str = "--out",
              inputs: dict[str, str | Path | None] | None = None) -> Path:
    """`path` as a Path, or a ConfigError unless `what` (a file, or a folder with `folder`) can
    be written there: checked before the work, not after it, and with nothing there touched.
    Refused too: a URI, a path that is (or is inside) a training run's own files, and one that
    would replace an input (`inputs`: option -> path). The folder (a file's parent) is made if
    missing; should the tool then fail (`run_main`), what was made here goes again if it is still
    empty."""
    if uris.is_uri(str(path)):
        raise ConfigError(f"{option} {uris.redact(str(path))}: is a URI; {option} names a local "
                          f"{what}")
    path = Path(path).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: is a file; {option} names the {what} to write into")
    if not folder and path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; {option} names the {what} to write")
    full = path.resolve()
    why = _run_owned(full) or _replaces_input(full, inputs or {})
    if why:
        raise ConfigError(f"{option} {path}: {why}; write the {what} elsewhere")
    where = path if folder else path.parent
    missing = _missing_folders(where)
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot create {where} ({e.strerror or e})") from None
    made = _MADE.get()
    if made is not None:
        made.extend(missing)
    if not os.access(where, os.W_OK):
        raise ConfigError(f"{option} {path}: {where} is not writable")
    return path


_MADE: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar("made", default=None)
"""The folders `check_out` made for the tool that `run_main` runs (None outside one)."""


def _missing_folders(folder: Path) -> list[Path]:
    """The folders that making `folder` (parents included) creates, absolute."""
    missing = []
    for p in (folder.absolute(), *folder.absolute().parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    return missing


def _remove_made(folders: list[Path]) -> None:
    """Remove the folders a failed tool made, deepest first, each only if empty: what anyone put
    in one (a partial output of ours included, should a writer ever leave one) keeps it."""
    for p in sorted(set(folders), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            p.rmdir()


@contextlib.contextmanager
def writing(path: str | Path, option: str = "--out"):
    """An OSError while the block writes the output becomes a one-line ConfigError naming it."""
    try:
        yield
    except OSError as e:
        name = "" if e.filename in (None, str(path)) else f" {e.filename}"
        raise ConfigError(f"{option} {path}: cannot write{name} ({e.strerror or e})") from None


def check_at_least(option: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{option}: must be >= {low}, got {value}")


def config_parser(description: str, prog: str | None = None) -> ToolParser:
    parser = ToolParser(
        prog=prog, description=description,
        epilog="Any config key can be overridden after the options, as section.key=value (or "
               "--section.key=value): data.root=/data/lists train.outer_iters=5 "
               "--objective.gamma=200 (every key: python -m dadh_dist config --list)",
    )
    parser.add_argument("--config", help="TOML config file (defaults < file < overrides)")
    takes_overrides(parser, "config overrides, e.g. data.root=/data/lists; they win over "
                            "--config")
    return parser


def parse_config(parser: argparse.ArgumentParser, argv: list[str] | None,
                 flag_overrides: Callable[[argparse.Namespace], list[str]] | None = None,
                 ) -> tuple:
    """(args, Config) from the command line; `flag_overrides` turns flags such as --name into
    dotted overrides, applied after the ones written out. `args.overrides`: all of them, in the
    order applied."""
    args, extra = parser.parse_known_args(argv)
    args.overrides = [*overrides_in(parser, extra),
                      *(flag_overrides(args) if flag_overrides else [])]
    cfg = config_mod.load(args.config, args.overrides)
    return args, cfg


# ------------------------------------------------------------------------------ running a tool


def _print_json(payload: dict) -> None:
    print(json.dumps(payload), flush=True)


def wants_json(argv: list[str] | None) -> bool:
    return "--json" in (sys.argv[1:] if argv is None else argv)


@contextlib.contextmanager
def stdout_to_stderr():
    """Send what is written to stdout inside the block to stderr: our prints, and writes to
    file descriptor 1 by libraries and child processes (Ray Tune's progress tables, forwarded
    worker logs), so that a --json tool's stdout holds its JSON object alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _exit_code(e: BaseException) -> int | None:
    if isinstance(e, FileNotFoundError):
        return EXIT_USER_ERROR
    for cls in type(e).__mro__:
        if cls.__module__.startswith("dadh_dist"):
            if cls.__name__ in USER_ERRORS:
                return EXIT_USER_ERROR
            if cls.__name__ in RUN_ERRORS:
                return EXIT_RUN_FAILED
    return None


def fail(message: str, code: int, as_json: bool, problems: list[str] | None = None) -> int:
    """Report an error: `error: ...` on stderr, or one JSON object on stdout."""
    if as_json:
        payload = {"error": message, "exit_code": code}
        if problems:
            payload["problems"] = problems
        _print_json(payload)
    else:
        for line in problems or []:
            print(f"error: {line}", file=sys.stderr)
        print(f"error: {message}", file=sys.stderr, flush=True)
    return code


STOPPED = "stopped by SIGTERM"
RERUN = "rerun the same command"
TRAIN_RESUME = "the run keeps its checkpoints: rerun the same command to resume it"
SWEEP_RESUME = "the sweep keeps its finished trials: rerun the same command to resume it"
EXIT_SIGTERM = 128 + signal.SIGTERM  # what a shell reports for a process SIGTERM ended


def run_main(body: Callable[[], int | None], as_json: bool = False, resume: str = RERUN) -> int:
    """Run an entry point; user mistakes print one line and exit 2, never a traceback; a run
    that Ray Train gave up on (lost workers or nodes) prints one line and exits 1. With
    `as_json` the error is a JSON object on stdout instead.

    SIGTERM (`ray job stop`, a scheduler, a service manager) stops the body as Ctrl-C does, and
    is said in one line, `resume` its second half, with exit status 143. A tool that fails
    removes the folders `check_out` made for it that are still empty."""
    made: list[Path] = []
    token = _MADE.set(made)
    code = EXIT_RUN_FAILED  # a traceback's
    try:
        with _sigterm_as_interrupt() as sigterm:
            code = _run_body(body, as_json, sigterm, resume)
    finally:
        _MADE.reset(token)
        if code != 0:
            _remove_made(made)
    return code


def _run_body(body: Callable[[], int | None], as_json: bool, sigterm: _Sigterm,
              resume: str) -> int:
    try:
        code = body() or 0
    except BaseException as e:
        sigterm.armed = False  # the body is over: a SIGTERM from here on only counts
        if sigterm.received or _ray_sigterm_exit(e):  # whatever the body made of the interrupt
            return fail(f"{STOPPED}; {resume}", EXIT_SIGTERM, as_json)
        if isinstance(e, KeyboardInterrupt):
            # a run's or sweep's Ctrl-C says how to go on, as its SIGTERM does
            return fail("interrupted" if resume == RERUN else f"interrupted; {resume}", 130,
                        as_json)
        code = _exit_code(e) if isinstance(e, Exception) else None
        if code is None:
            raise
        summary = getattr(e, "summary", None)  # several problems: each, then the summary
        if summary is not None and len(e.problems) > 1:
            return fail(summary, code, as_json, [str(p) for p in e.problems])
        return fail(str(e), code, as_json)
    sigterm.armed = False
    if sigterm.received:  # the body caught the interrupt and returned (a sweep: "interrupted");
        # what it printed stays the only JSON on stdout
        return fail(f"{STOPPED}; {resume}", EXIT_SIGTERM, as_json=False)
    return code


class _Sigterm:
    """A SIGTERM handler that raises KeyboardInterrupt, so that the body stops exactly as on
    Ctrl-C (every cleanup written for Ctrl-C runs), and remembers it was SIGTERM. A second
    SIGTERM, while the first one's cleanup runs, ends the process at once, as it would have
    without this handler."""

    def __init__(self):
        self.received = False
        self.armed = True
        """While the body runs; after it, a SIGTERM is only noted (raising then would escape
        the error line being written as a traceback)."""

    def __call__(self, signum, frame):
        if self.received:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = True
        if self.armed:
            raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """`_Sigterm` installed while the block runs, in the main thread only (the only one Python
    delivers signals to). The handler that was there before comes back after, unless the block
    installed its own meanwhile: `ray.init` does, and a Ray still up needs it."""
    sigterm = _Sigterm()
    if threading.current_thread() is not threading.main_thread():
        yield sigterm
        return
    before = signal.signal(signal.SIGTERM, sigterm)
    try:
        yield sigterm
    finally:
        if signal.getsignal(signal.SIGTERM) is sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)


def _ray_sigterm_exit(e: BaseException | None) -> bool:
    """Whether `e` is (or was raised from) the SystemExit of the SIGTERM handler `ray.init`
    installs in a driver, which replaces ours: `sys.exit(signum)`. Under Ray Train's fit it
    arrives as the cause of a KeyboardInterrupt (`run.ray_train.fit`)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, SystemExit) and e.code == signal.SIGTERM:
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


class Notes:
    """Lines the user should read about the input: `note: ...` on stderr as they come, and
    kept for a JSON result."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        print(f"note: {line}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------- train


def train_main(argv: list[str] | None = None) -> int:
    parser = config_parser("Train DADH hash functions (Ray Train, or in-process with "
                           "scaling.use_ray=false).")
    parser.add_argument("--name", help="run name, the same as log.name=NAME; the same name "
                        "resumes the run (default: derived from the config)")
    parser.add_argument("--batch-size", type=int, metavar="N", dest="batch_size",
                        help="global mini-batch, split over the workers (train.batch_size=N)")
    parser.add_argument("--quiet", action="store_true",
                        help="no per-batch progress bar (the line per outer iteration remains)")

    def flags(args) -> list[str]:
        out = []
        if args.name is not None:
            out.append(f"log.name={json.dumps(args.name)}")
        if args.batch_size is not None:
            out.append(f"train.batch_size={args.batch_size}")
        return out

    def body() -> int:
        args, cfg = parse_config(parser, argv, flags)
        from dadh_dist import run

        try:
            final = run.run(cfg, progress=not args.quiet)
        except Exception as e:
            from dadh_dist.data.problems import name_check_command

            name_check_command(e, args.config, args.overrides)
            raise
        print(f"run folder: {final['run_dir']}")
        print("final metrics: " + ", ".join(
            f"{k}={v:.4f}" for k, v in sorted(final.items())
            if k.startswith(("map_", "p_at_")) and isinstance(v, float)))
        return 0

    return run_main(body, resume=TRAIN_RESUME)


# ---------------------------------------------------------------------------------------------
# Using a trained hash function: evaluate, encode, search, export.


def evaluate_main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=(
        "Evaluate a trained run (asymmetric protocol: queries encoded by the network, database = "
        "learned B): metrics.json, PR and P@N plots, example retrievals, report.md, TensorBoard. "
        "Warns when the codes have collapsed (few distinct codes, or mAP at chance level)."))
    add_model_args(parser, reads_data=True)
    parser.add_argument("--out", metavar="FOLDER", help="output FOLDER (default: "
                        "<run>/eval/<checkpoint>_<split>; for a run URI the local mirror's, "
                        "then sent to the URI)")
    parser.add_argument("--encoders", "--encoder", dest="encoders", metavar="E[,E...]",
                        help="query encoders, comma-separated among f,g,fg (default: the run's "
                             "eval.encoders)")
    parser.add_argument("--split", default="query", choices=("query", "validation"),
                        help="query images to rank the database with (default: query)")
    parser.add_argument("--topk", "-k", type=int, metavar="N",
                        help="cut-off of mAP@k (default: the run's eval.topk, or 1000 when that "
                             "is 0; 0 = mAP@all only; above the database size it equals mAP@all, "
                             "and a note says so)")
    add_batch_size_arg(parser)
    parser.add_argument("--examples", type=int, default=6,
                        help="example queries drawn in examples.png (0 = no picture)")
    parser.add_argument("--no-tensorboard", action="store_true", help="skip the tb/ events")
    add_output_args(parser, "print the metrics, warnings and written paths as JSON",
                    quiet_help="print only the report's path and warnings, not the table")

    def body() -> int:
        args = parser.parse_args(argv)
        check_at_least("--topk", args.topk, 0)
        check_at_least("--examples", args.examples, 0)
        check_at_least("--batch-size", args.batch_size, 1)
        encoders = None
        if args.encoders:
            # one row per encoder, however often it is named
            encoders = list(dict.fromkeys(e.strip() for e in args.encoders.split(",")
                                          if e.strip()))
            bad = [e for e in encoders if e not in ENCODERS]
            if bad or not encoders:
                raise ConfigError(f"--encoders: {args.encoders!r}: name some of f, g, fg, "
                                  "comma-separated")
        device = resolve_device(args.device)
        from dadh_dist import inference, report

        notes = Notes()
        hf, dataset = inference.load_with_data(args.checkpoint, device, args.data_root)
        n = len(dataset.database)
        if args.topk is not None and args.topk > n:
            notes(f"--topk {args.topk} is more than the {n} database codes: "
                  f"mAP@{args.topk} is mAP@all")
        p_at = hf.cfg.eval.precision_at
        if p_at > n:  # as the run said of it (loop.beyond_database)
            notes(f"eval.precision_at = {p_at} is more than the {n} database codes: P@{p_at} is "
                  f"the precision over all {n}")
        out = check_out(args.out or hf.run_folder / "eval" / f"{hf.checkpoint.name}_{args.split}",
                        "output folder", folder=True)  # before the evaluation, not after it
        ev = report.evaluate(hf, dataset, encoders, args.split, args.topk,
                             batch_size=args.batch_size)
        with writing(out):
            paths = report.write(out, ev, hf, dataset, args.examples, not args.no_tensorboard)
        for e, line in ev.warnings.items():
            print(f"warning: {report.NAMES[e]}: {line}", file=sys.stderr)
        # a remote run's evaluation goes next to it, like a local run's (an --out: stays here)
        published = None if args.out else hf.publish(out)
        if args.json:
            _print_json({"out": str(out), "report": str(paths["report.md"]),
                         "metrics": ev.metrics, "warnings": ev.warnings, "notes": notes.lines,
                         **({"published": uris.redact(published)} if published else {})})
            return 0
        if not args.quiet:
            for e in ev.encoders:
                print(f"{report.NAMES[e]:>10}: " + ", ".join(
                    f"{title} {ev.metrics[f'{key}_{e}']:.4f}" for title, key in ev.table()))
        print(f"report: {paths['report.md']}")
        if published:
            print(f"published: {uris.redact(published)}")
        return 0

    return run_main(body, wants_json(argv))


def encode_main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=(
        "Encode images with a trained hash function into a Parquet codes file (id, packed code; "
        "bits, encoder, model hash and config as metadata). Every unreadable image is listed "
        "before the tool fails; skipped non-image files and converted or resized images are "
        "noted on stderr."))
    add_model_args(parser, reads_data=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="image folder, list file (path per line), folder of "
                        "Parquet shards, or one image")
    source.add_argument("--split", choices=("query", "validation", "database"),
                        help="a split of the run's own dataset")
    parser.add_argument("--parquet-split", choices=("query", "validation", "database"),
                        help="with a Parquet --images folder: keep only this split's rows")
    parser.add_argument("--learned", action="store_true",
                        help="with --split database: write the learned codes B, not the "
                             "network's (no image is read)")
    add_encoder_arg(parser)
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="codes FILE to write (.parquet)")
    add_batch_size_arg(parser, old="--batch")
    add_output_args(parser, "print what was written as JSON")

    def body() -> int:
        args = parser.parse_args(argv)
        check_at_least("--batch-size", args.batch_size, 1)
        device = resolve_device(args.device)
        import time

        from dadh_dist import codesfile, inference

        # before the encoding, not after it
        check_out(args.out, "codes file", inputs={"--images": args.images})
        check_data_root(args)
        notes = Notes()
        hf = inference.load(args.checkpoint, device, args.data_root)
        t0 = time.perf_counter()
        split = args.parquet_split if args.images else args.split
        codes = inference.encode_to_codes(hf, args.images, split, args.encoder, args.learned,
                                          args.batch_size, not (args.quiet or args.json),
                                          note=notes)
        seconds = time.perf_counter() - t0
        with writing(args.out):
            path = codesfile.write(args.out, codes)
        read = 0 if args.learned else len(codes)
        if args.json:
            _print_json({"out": str(path), "codes": len(codes), "bits": codes.bits,
                         "encoder": codes.encoder, "model_sha256": codes.model_sha256,
                         "images_read": read, "seconds": seconds, "notes": notes.lines})
            return 0
        how = ("the run's learned codes B, no image read" if args.learned
               else f"{read} images read and encoded")
        timing = "" if args.quiet else f" in {seconds:.2f} s"
        print(f"wrote {len(codes)} codes ({codes.bits} bits, encoder {codes.encoder}, model "
              f"{codes.model_sha256[:12]}) to {path}: {how}{timing}")
        return 0

    return run_main(body, wants_json(argv))


def search_main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=(
        "Top-k Hamming search: query codes, or images encoded with --checkpoint, against a "
        "database codes file."))
    add_model_args(parser, required=False,
                   help="run or checkpoint folder that encodes query images; with a codes file "
                        "as --query nothing is encoded: the codes are checked to be this "
                        "model's", reads_data=True)
    parser.add_argument("--database", required=True, metavar="FILE",
                        help="database codes file (.parquet)")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--query", help="codes file, or images (folder, list file, Parquet "
                       "shards, one image) encoded with --checkpoint")
    query.add_argument("--split", choices=("query", "validation", "database"),
                       help="a split of the run's own dataset as queries (needs --checkpoint)")
    add_encoder_arg(parser, "query encoder for images")
    parser.add_argument("--topk", "-k", type=int, default=10, dest="topk", metavar="N",
                        help="results per query (default: 10); above the database size every "
                             "code is returned and a note says so")
    deprecated_alias(parser, "--k", "--topk/-k", "topk", type=int)
    add_batch_size_arg(parser)
    parser.add_argument("--backend", choices=("packed", "faiss"), default="packed",
                        help="packed XOR + popcount (default) or faiss IndexBinaryFlat")
    parser.add_argument("--out", metavar="FILE",
                        help="write the results (table, or JSON with --json) to this FILE "
                             "instead of stdout")
    add_output_args(parser, "print the results as JSON instead of a table")

    def body() -> int:
        args = parser.parse_args(argv)
        check_at_least("--topk", args.topk, 1)
        check_at_least("--batch-size", args.batch_size, 1)
        import os

        from dadh_dist import codesfile, probe

        if args.out:  # before the encoding and the search, not after them
            check_out(args.out, "results file",
                      inputs={"--database": args.database, "--query": args.query})
        check_data_root(args)
        notes = Notes()
        probe.check_codes_file(args.database)
        database = codesfile.read(args.database)
        if len(database) == 0:
            raise codesfile.CodesError(f"{database.name}: the database holds no codes")
        kind = probe.IMAGES  # --split: the run's own images
        if args.query is not None:
            if not Path(args.query).exists():
                raise FileNotFoundError(f"{args.query}: no such codes file or images")
            kind = probe.query_kind(args.query)
        if kind == probe.CODES:
            queries = codesfile.read(args.query)
            if args.checkpoint is not None:
                check_codes_of(queries, args.checkpoint)
        else:  # images: the network is needed only here
            from dadh_dist import inference

            device = resolve_device(args.device)
            queries = inference.query_codes_from(
                args.query, args.checkpoint, args.encoder, args.split, device,
                not (args.quiet or args.json), args.batch_size, note=notes,
                data_root=args.data_root, database=database)
        if args.topk > len(database):
            notes(f"-k {args.topk} is more than the {len(database)} codes in {database.name}: "
                  f"each query gets all {len(database)}")
        result = codesfile.search(queries, database, args.topk, args.backend)
        if not args.quiet:
            print(f"searched {len(queries)} queries against {len(database)} codes in "
                  f"{result.seconds * 1e3:.1f} ms ({args.backend})", file=sys.stderr)
        if args.json:
            payload = json.loads(result.to_json(database))
            payload.update(k_requested=args.topk, notes=notes.lines)
            text = json.dumps(payload)
        else:
            text = result.table()
        if args.out:
            from dadh_dist import checkpoint as ckpt

            with writing(args.out):  # whole or not at all: never half a table where one was
                ckpt.write_atomic(Path(args.out).expanduser(), (text + "\n").encode())
            if not args.quiet:
                print(f"results: {args.out}", file=sys.stderr)
            return 0
        try:
            print(text, flush=True)
        except BrokenPipeError:  # the reader (e.g. `head`) stopped early: not a search error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

    return run_main(body, wants_json(argv))


def check_codes_of(codes, checkpoint: str) -> None:
    """Refuse a --checkpoint that did not make `codes` (a codes file given as --query): the
    user meant those codes to be its model's, and search would otherwise say nothing of it."""
    from dadh_dist import codesfile, inference

    hf = inference.load(checkpoint, "cpu")  # its weights' hash only: no image is encoded
    if hf.model_sha256 != codes.model_sha256:
        raise codesfile.CodesError(
            f"--checkpoint {checkpoint}: model {hf.model_sha256[:12]} ({hf.bits} bits), but "
            f"{codes.name} holds codes of model {codes.model_sha256[:12]} ({codes.bits} bits); "
            "name the checkpoint_* folder that made them (a run folder means its newest), or "
            "drop --checkpoint")


def export_main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=(
        "Export a trained hash function: a torch.export program (uint8 images -> int8 ±1 codes, "
        "dynamic batch) plus the streams' state_dicts."))
    add_model_args(parser)
    add_encoder_arg(parser, "what the program computes")
    parser.add_argument("--out", metavar="FOLDER",
                        help="output FOLDER (default: <run>/export/<checkpoint>_<encoder>)")
    add_output_args(parser, "print the written paths as JSON",
                    quiet_help="print only the program's path")

    def body() -> int:
        args = parser.parse_args(argv)
        device = resolve_device(args.device)
        from dadh_dist import export, inference

        hf = inference.load(args.checkpoint, device)
        encoder = hf.check_encoder(args.encoder or hf.default_encoder)
        out = check_out(args.out or hf.run_folder / "export" / f"{hf.checkpoint.name}_{encoder}",
                        "export folder", folder=True)
        with writing(out):
            paths = export.export(hf, encoder, out)
        if args.json:
            _print_json({"encoder": encoder, "bits": hf.bits,
                         **{k: str(v) for k, v in paths.items()}})
            return 0
        print(f"program: {paths['program']} (uint8 (N, {hf.channels}, {hf.image_size}, "
              f"{hf.image_size}) -> int8 ±1 (N, {hf.bits}); round trip checked)")
        if not args.quiet:
            print(f"weights: {paths['weights']}")
            print(f"metadata: {paths['metadata']}")
        if "published" in paths:
            print(f"published: {paths['published']}")
        return 0

    return run_main(body, wants_json(argv))


# --------------------------------------------------------------------------------- tune, quality


def tune_main(argv: list[str] | None = None) -> int:
    parser = ToolParser(
        description="Sweep DADH hyper-parameters with Ray Tune: every trial is a full training "
                    "run, ranked on validation mAP; rerunning an interrupted sweep resumes it.",
        epilog="Extra section.key=value arguments override the base training config "
               "(after the sweep file's [overrides]), e.g. train.outer_iters=5.",
    )
    takes_overrides(parser, "overrides of the base training config, e.g. train.outer_iters=5")
    parser.add_argument("--config", required=True, help="sweep TOML file (configs/sweep_*.toml)")
    parser.add_argument("--name", help="sweep name (default: the file's name key or stem)")
    parser.add_argument("--num-samples", type=int, help="trials to sample (overrides the file)")
    # no --quiet: what a sweep prints while it runs is Ray Tune's own progress table
    add_output_args(parser, "print every trial (parameters, metrics), the best trial and "
                    "best_config.toml's path as JSON; Tune's progress goes to stderr",
                    quiet_help=None)

    def body() -> int:
        args, extra = parser.parse_known_args(argv)
        from dadh_dist import sweep as sweeps

        sweep = sweeps.load_sweep(args.config,
                                  config_mod.parse_overrides(overrides_in(parser, extra)),
                                  args.num_samples, args.name)
        if not args.json:
            return 130 if sweeps.run_sweep(sweep)["interrupted"] else 0
        ray_was_up = _ray_is_up()
        with stdout_to_stderr():
            try:
                result = sweeps.run_sweep(sweep)
            except sweeps.SweepFailed as e:
                if e.result is None:
                    raise
                # the rows of the trials that did run (failed or stopped) and the folder, so a
                # script can look at them: the error alone would lose them
                result = {**e.result, "error": str(e), "exit_code": EXIT_RUN_FAILED}
            finally:
                # a Ray started here stops before the JSON is printed, so that no worker log
                # line it still forwards can follow the JSON on stdout
                if not ray_was_up and _ray_is_up():
                    sys.modules["ray"].shutdown()
        if result["interrupted"]:
            result.update(error=f"sweep {result['sweep']} interrupted after "
                                f"{result['finished']}/{result['expected']} trials; rerun the "
                                "same command to resume it", exit_code=130)
        _print_json(result)
        return result.get("exit_code", 0)

    return run_main(body, wants_json(argv), resume=SWEEP_RESUME)


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")  # never imported: not started either
    return ray is not None and ray.is_initialized()


def _comma_list(item: type):
    def parse(text: str) -> list:
        try:
            values = [item(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {item.__name__} values, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if twice is not None:  # the same cell twice would train twice into one folder
            raise argparse.ArgumentTypeError(f"{twice} given twice")
        return values

    return parse


QUALITY_CONFIG = "configs/fashion_mnist_{bits}.toml"


def quality_main(argv: list[str] | None = None) -> int:
    parser = ToolParser(
        description="Train every (method, bits, seed) cell of the retrieval-quality table as an "
                    "in-process run and print the Markdown table (finished runs are reused). "
                    "The default grid (Fashion-MNIST, dadh and adsh at 32 bits) takes hours on "
                    "a CPU; a quick run: --config configs/debug_cpu.toml --bits 16.",
        epilog="Extra section.key=value arguments apply to every run (the shared budget), "
               "e.g. train.outer_iters=10.",
    )
    takes_overrides(parser, "overrides for every run, e.g. train.outer_iters=10")
    parser.add_argument("--config", default=QUALITY_CONFIG,
                        help="run config; {bits} is replaced by the code length (default: "
                             f"{QUALITY_CONFIG})")
    parser.add_argument("--methods", type=_comma_list(str), default=["dadh", "adsh"],
                        help="comma-separated, any of: dadh, adsh, dadh-no-code, dadh-no-pair")
    parser.add_argument("--bits", type=_comma_list(int), default=[32],
                        help="comma-separated code lengths, e.g. 12,24,32,48")
    parser.add_argument("--seeds", type=_comma_list(int), default=[0],
                        help="comma-separated training seeds, e.g. 0,1,2")
    parser.add_argument("--out", default="runs/quality", metavar="FOLDER",
                        help="FOLDER of the runs and the table (default: runs/quality)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at the same time")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per run, as scaling.cpus_per_worker (0 = CPUs / "
                             "parallel); a finished cell is reused whatever its count")
    parser.add_argument("--method-override", action="append", default=[], metavar="M:KEY=VALUE",
                        help="override for one method only, e.g. adsh:train.outer_iters=20")
    parser.add_argument("--table-only", action="store_true",
                        help="train nothing: tabulate the cells that already finished (no "
                             "file is written)")
    add_output_args(parser, "print every cell's row (command, metrics or error), the Markdown "
                    "table and its path as JSON; the line per cell goes to stderr",
                    quiet_help="no line per cell as it finishes: only the table")

    def body() -> int:
        import os

        from dadh_dist import quality

        args, extra = parser.parse_known_args(argv)
        extra = overrides_in(parser, extra)
        unknown = sorted(set(args.methods) - set(quality.METHODS))
        if unknown:
            raise ConfigError(f"--methods: unknown {', '.join(unknown)}; "
                              f"known: {', '.join(quality.METHODS)}")
        per_method: dict[str, list[str]] = {}
        for item in args.method_override:
            method, sep, override = item.partition(":")
            if not sep or method not in quality.METHODS or "=" not in override:
                raise ConfigError(f"--method-override {item!r}: expected METHOD:KEY=VALUE with "
                                  f"METHOD one of {', '.join(quality.METHODS)}")
            per_method.setdefault(method, []).extend(
                config_mod.override_args(config_mod.parse_overrides([override])))
        if args.threads < 0:
            raise ConfigError(f"--threads {args.threads}: expected 0 (CPUs / parallel) or more")
        check_at_least("--parallel", args.parallel, 1)
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
        plan = quality.Plan(args.config, Path(args.out).expanduser(),
                            config_mod.override_args(config_mod.parse_overrides(extra)), per_method,
                            threads=threads)
        cells = [quality.Cell(m, b, s) for b in args.bits for m in args.methods
                 for s in args.seeds]
        # every config file and override, and what already finished there, checked before
        # anything runs or --out is made
        quality.check_reuse(plan, cells)
        check_out(plan.out, "folder of the runs and the table", folder=True)

        def progress(line: str) -> None:  # a cell's line as it finishes
            if not args.quiet:
                print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

        rows = quality.run_plan(plan, cells, args.parallel, progress, train=not args.table_only)
        rows = quality.with_finished(plan, rows)
        path = None
        if not args.table_only:
            with writing(plan.out):
                path = quality.write(plan, rows)
            if path is None:
                print(f"no cell finished: {plan.out / 'table.md'} and rows.json left as they "
                      "were", file=sys.stderr)
        failed = sum(r.get("error", quality.NOT_RUN) != quality.NOT_RUN for r in rows)
        if args.json:
            payload = {"out": str(plan.out), "table": str(path) if path else None,
                       "markdown": quality.table(rows), "rows": rows}
            if failed:
                payload.update(error=f"{failed} of {len(rows)} cells failed (see their rows' "
                                     "error)", exit_code=EXIT_RUN_FAILED)
            _print_json(payload)
        elif path is None:
            print(quality.table(rows), end="")
        else:
            print(path.read_text(), end="")
            print(f"table: {path}")
        return EXIT_RUN_FAILED if failed else 0

    return run_main(body, wants_json(argv))
