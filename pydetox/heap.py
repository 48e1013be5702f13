"""Giving freed heap memory back to the system.

glibc keeps memory that torch frees mapped for reuse; torch's CPU tensors of a training step come in many sizes (each
batch pads to its own length), so freed blocks pile up between the sizes the next steps ask for. Measured on the
SmolLM2 student (60 steps, cached teacher, one run each): resident memory peaked at 2.96 GB in 183 s with the heap
left alone, 2.32 GB in 172 s with it trimmed after every step (what the student does)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
from functools import cache
from typing import Any


@cache
def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def trim() -> None:
    """Return the free memory at the top of, and inside, glibc's heaps to the system (malloc_trim); a no-op where
    the C library has none."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)


def release() -> None:
    """Collect what Python no longer reaches, then `trim`: between stages, after a torch stage's objects are dropped
    (Qwen2.5-0.5B after distill: 3.78 GB resident, 2.73 GB collected, 0.51 GB trimmed)."""
    gc.collect()
    trim()
