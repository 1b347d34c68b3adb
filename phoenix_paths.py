"""Where Phoenix keeps what it downloads and trains when no path is given: the cache root.

    phoenix_paths.cache_dir()                  # $PHOENIX_CACHE_DIR, else ~/.cache/phoenix
    phoenix_paths.checkpoint_path("synthetic")   # <cache>/checkpoints/synthetic: a default run directory

Both read the environment when called, never at import, so a test or a notebook can point
$PHOENIX_CACHE_DIR elsewhere at any time.
"""

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "DEFAULT_CACHE_DIR", "cache_dir", "checkpoint_path"]

CACHE_ENV = "PHOENIX_CACHE_DIR"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "phoenix"


def cache_dir(path=None) -> Path:
    """The cache root: `path`, else $PHOENIX_CACHE_DIR, else ~/.cache/phoenix."""
    return Path(path or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def checkpoint_path(name: str) -> str:
    """The default run directory (or demo checkpoint) called `name`: <cache>/checkpoints/<name>."""
    return str(cache_dir() / "checkpoints" / name)
