"""Importance matrices as llama.cpp's `llama-imatrix` writes them, for the IQ types that need one.

Two formats: the GGUF one (tensors `<name>.in_sum2` and `<name>.counts`, llama.cpp `tools/imatrix`), and the legacy
binary `.dat` (int32 count, then per entry: int32 name length, name, int32 ncall, int32 nval, nval float32; values
are divided by ncall as `llama-quantize` does when it loads them).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

from pydetox.errors import PydetoxError

Imatrix = dict[str, npt.NDArray[np.float32]]


class ImatrixError(PydetoxError):
    """An importance matrix file cannot be read."""


def load_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    path = Path(path)
    if not path.is_file():
        raise ImatrixError(f"expected an importance matrix file at {path}, found nothing")
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        return _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
    except ImatrixError:
        raise
    except Exception as exc:
        raise ImatrixError(f"{path} is not a llama.cpp importance matrix ({type(exc).__name__}: {exc})") from exc


def _load_gguf(path: Path) -> Imatrix:
    reader = gguf.GGUFReader(path, "r")
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    out: Imatrix = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name.removesuffix(".in_sum2")
        counts = tensors.get(base + ".counts")
        if counts is None:
            raise ImatrixError(f"{path}: {name} has no matching {base}.counts")
        sums2 = sums.reshape(-1, sums.shape[-1])
        c = counts.reshape(-1, 1)
        out[base] = np.ascontiguousarray((sums2 / np.maximum(c, 1)).reshape(-1), dtype=np.float32)
    if not out:
        raise ImatrixError(f"{path} is a GGUF without *.in_sum2 tensors: not an importance matrix")
    return out


def _load_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple[int, ...]:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ImatrixError(f"{path} is truncated at byte {pos}")
        vals = struct.unpack_from(fmt, data, pos)
        pos += size
        return vals

    (n_entries,) = take("<i")
    if n_entries <= 0 or n_entries > 1_000_000:
        raise ImatrixError(f"{path}: implausible entry count {n_entries}")
    out: Imatrix = {}
    for _ in range(n_entries):
        (name_len,) = take("<i")
        if not 0 < name_len < 4096 or pos + name_len > len(data):
            raise ImatrixError(f"{path}: bad entry name length {name_len}")
        name = data[pos : pos + name_len].decode()
        pos += name_len
        ncall, nval = take("<ii")
        if nval <= 0 or pos + 4 * nval > len(data):
            raise ImatrixError(f"{path}: entry {name!r} claims {nval} values past the end of the file")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        out[name] = (values / ncall).astype(np.float32) if ncall > 0 else values
    return out
