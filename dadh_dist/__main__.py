"""`python -m dadh_dist COMMAND ...`: command-line tools that need no trained run.

    python -m dadh_dist check-data --config configs/debug_cpu.toml [section.key=value ...]
"""

from __future__ import annotations

import argparse
import sys

from dadh_dist.cli import EXIT_USER_ERROR, config_parser, parse_config, run_main


def check_data_main(argv: list[str] | None = None) -> int:
    parser = config_parser(
        "Pre-flight check of the configured dataset: reads every list line, Parquet row, IDX "
        "or CIFAR file and decodes every image, then prints one line per problem (naming the "
        "file and line or row) and a summary (split sizes, per-class counts, image channels "
        "and size, multi-label or not). Exit code 0 when clean, 2 when a problem was found.")
    parser.prog = "python -m dadh_dist check-data"

    def body() -> int:
        _, cfg = parse_config(parser, argv)
        from dadh_dist.data import check_dataset

        report = check_dataset(cfg.data)
        print("\n".join(report.lines()))
        return 0 if report.ok else EXIT_USER_ERROR

    return run_main(body)


COMMANDS = {
    "check-data": (check_data_main, "check the configured dataset and report every problem"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]][0](argv[1:])
    parser = argparse.ArgumentParser(prog="python -m dadh_dist",
                                     description="DADH command-line tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    parser.parse_args(argv)  # prints the help or the usage error and exits
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
