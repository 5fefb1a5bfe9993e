"""Shared command-line plumbing: config file + dotted overrides, user errors as exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from dadh_dist import config as config_mod
from dadh_dist.config import ConfigError

EXIT_USER_ERROR = 2


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
    """Run an entry point; user mistakes print one line and exit 2, never a traceback."""
    from dadh_dist.checkpoint import CheckpointError
    from dadh_dist.data import DataError

    try:
        return body() or 0
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
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
