"""Where pydetox keeps what it fetches and makes once (assets, calibrators, converted models, the sha256 cache).
A leaf module: the engine (gguf_io) and the asset fetcher both need it, and neither imports the other for it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$PYDETOX_CACHE, else $XDG_CACHE_HOME/pydetox, else ~/.cache/pydetox."""
    env = os.environ.get("PYDETOX_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pydetox"
