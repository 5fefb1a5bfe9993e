"""dadh_dist: Dual Asymmetric Deep Hashing (arXiv 1801.08360) trained on Ray Train.

Importing the package imports nothing else: `dadh_dist.__version__` is looked up on first use.
"""

from __future__ import annotations


def package_version() -> str:
    """The installed distribution's version, or the checkout's pyproject.toml when the package
    runs from a source tree that was never installed."""
    from importlib import metadata

    try:
        return metadata.version("dadh_dist")
    except metadata.PackageNotFoundError:
        pass
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def __getattr__(name: str):
    if name == "__version__":
        return package_version()
    raise AttributeError(f"module 'dadh_dist' has no attribute {name!r}")
