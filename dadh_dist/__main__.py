"""`python -m dadh_dist COMMAND ...` (or `dadh COMMAND`): every tool of the project.

    python -m dadh_dist train --config configs/debug_cpu.toml     # = jobs/train.py, dadh-train
    python -m dadh_dist check-data --config configs/debug_cpu.toml [section.key=value ...]
    python -m dadh_dist config --list                 # every config key, default and meaning
    python -m dadh_dist config --config configs/debug_cpu.toml train.outer_iters=5
"""

from __future__ import annotations

import argparse
import sys

from dadh_dist.cli import EXIT_USER_ERROR, ToolParser, config_parser, parse_config, run_main


def check_data_main(argv: list[str] | None = None) -> int:
    parser = config_parser(
        "Pre-flight check of the configured dataset: reads every list line, Parquet row, IDX "
        "or CIFAR file and decodes every image, then prints one line per problem (naming the "
        "file and line or row) and a summary (split sizes, per-class counts, image channels "
        "and size, multi-label or not). Exit code 0 when clean, 2 when a problem was found.",
        prog="python -m dadh_dist check-data")

    def body() -> int:
        _, cfg = parse_config(parser, argv)
        from dadh_dist.data import check_dataset

        report = check_dataset(cfg.data)
        print("\n".join(report.lines()))
        return 0 if report.ok else EXIT_USER_ERROR

    return run_main(body)


def config_main(argv: list[str] | None = None) -> int:
    parser = config_parser(
        "Print the resolved config (defaults < --config file < overrides) as TOML, or with "
        "--list the table of every key, its type, default and meaning (Markdown).",
        prog="python -m dadh_dist config")
    parser.add_argument("--list", action="store_true",
                        help="print the table of every config key (the README carries it)")
    parser.add_argument("--update-readme", metavar="FILE", nargs="?", const="README.md",
                        help="rewrite the table between the markers of FILE (default: "
                             "README.md) and say whether it changed")

    def body() -> int:
        args, cfg = parse_config(parser, argv)
        from dadh_dist import config_doc

        if args.update_readme:
            try:
                changed = config_doc.update(args.update_readme)
            except (OSError, ValueError) as e:
                from dadh_dist.config import ConfigError

                raise ConfigError(f"--update-readme: {e}") from None
            print(f"{args.update_readme}: config table {'updated' if changed else 'up to date'}")
        elif args.list:
            print(config_doc.markdown(), end="")
        else:
            print(cfg.to_toml(), end="")
        return 0

    return run_main(body)


def _job(name: str):
    """A job's main (dadh_dist.cli.<name>_main; serve's lives in dadh_dist.serve), imported
    only when that command runs."""
    def main_of_job(argv: list[str]) -> int:
        if name == "serve":
            from dadh_dist.serve import main as job_main
        else:
            from dadh_dist import cli

            job_main = getattr(cli, f"{name}_main")
        # argparse names a parser after sys.argv[0]: here that is __main__.py, which no user typed
        before, sys.argv[0] = sys.argv[0], f"python -m dadh_dist {name}"
        try:
            return job_main(argv)
        finally:
            sys.argv[0] = before
    return main_of_job


COMMANDS = {
    "train": (_job("train"), "train a run (as jobs/train.py and dadh-train)"),
    "tune": (_job("tune"), "sweep config keys with Ray Tune (jobs/tune.py, dadh-tune)"),
    "evaluate": (_job("evaluate"), "evaluate a trained run (jobs/evaluate.py, dadh-evaluate)"),
    "encode": (_job("encode"), "encode images to a codes file (jobs/encode.py, dadh-encode)"),
    "search": (_job("search"), "top-k Hamming search of codes (jobs/search.py, dadh-search)"),
    "export": (_job("export"), "export a run's hash function (jobs/export.py, dadh-export)"),
    "quality": (_job("quality"), "the retrieval-quality table (jobs/quality.py, dadh-quality)"),
    "serve": (_job("serve"), "serve a trained run on Ray Serve (jobs/serve.py, dadh-serve)"),
    "check-data": (check_data_main, "check the configured dataset: every problem, then the "
                   "images shared across splits"),
    "config": (config_main, "print the resolved config, or every key with --list"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]][0](argv[1:])
    parser = ToolParser(prog="python -m dadh_dist", description="DADH command-line tools "
                        "(each also as jobs/<command>.py for `ray job submit`, and as "
                        "dadh-<command>).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=argparse.ArgumentParser)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    parser.parse_args(argv)  # prints the help, the version or the usage error and exits
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
