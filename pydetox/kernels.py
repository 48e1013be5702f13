"""Public wrappers of the native edit kernels and of libggml's (de)quantization.

Each function takes any array-like input and returns a new float32 array, unless `inplace=True` is given with a
float32 C-contiguous matrix, which is then edited where it lies. A matrix W is (rows, cols) like torch's Linear
weight (out, in) and like a GGUF tensor with ne = [cols, rows]; a basis is (k, n) with one direction per row.
The numpy references in `pydetox.reference` define what each function computes.
"""

from __future__ import annotations

import os

import gguf
import numpy as np
import numpy.typing as npt

from pydetox import _core, ggml

FloatArray = npt.NDArray[np.float32]


def default_threads() -> int:
    """Threads used when none are asked for: every core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _threads(threads: int | None) -> int:
    return default_threads() if threads is None else max(1, int(threads))


def _target(W: npt.ArrayLike, inplace: bool) -> FloatArray:
    if inplace:
        if not (isinstance(W, np.ndarray) and W.dtype == np.float32 and W.flags.c_contiguous and W.flags.writeable):
            raise TypeError("inplace=True needs a writable float32 C-contiguous numpy matrix")
        return W
    return np.array(W, dtype=np.float32, order="C", copy=True)


def _vec(x: npt.ArrayLike) -> FloatArray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _opt(x: npt.ArrayLike | None) -> FloatArray | None:
    return None if x is None else _vec(x)


def project_out(
    W: npt.ArrayLike, basis: npt.ArrayLike, gain: npt.ArrayLike | None = None, *, inplace: bool = False,
    threads: int | None = None,
) -> FloatArray:
    """(I - U^T diag(1 - gain) U) W for an orthonormal basis U of shape (k, rows)."""
    out = _target(W, inplace)
    _core.project_out(out, _vec(basis), _opt(gain), _threads(threads))
    return out


def project_in(
    W: npt.ArrayLike, basis: npt.ArrayLike, gain: npt.ArrayLike | None = None, *, inplace: bool = False,
    threads: int | None = None,
) -> FloatArray:
    """W (I - V^T diag(1 - gain) V) for an orthonormal basis V of shape (k, cols)."""
    out = _target(W, inplace)
    _core.project_in(out, _vec(basis), _opt(gain), _threads(threads))
    return out


def low_rank(
    W: npt.ArrayLike, left: npt.ArrayLike, right: npt.ArrayLike, *, inplace: bool = False, threads: int | None = None
) -> FloatArray:
    """W + left^T right, with left (k, rows) and right (k, cols): a sum of k rank-one updates."""
    out = _target(W, inplace)
    _core.low_rank(out, _vec(left), _vec(right), _threads(threads))
    return out


def scale_rows(
    W: npt.ArrayLike, scales: npt.ArrayLike, *, inplace: bool = False, threads: int | None = None
) -> FloatArray:
    """diag(scales) W: one gain per output unit (row)."""
    out = _target(W, inplace)
    _core.scale_rows(out, _vec(scales), _threads(threads))
    return out


def scale_cols(
    W: npt.ArrayLike, scales: npt.ArrayLike, *, inplace: bool = False, threads: int | None = None
) -> FloatArray:
    """W diag(scales): one gain per input unit (column), e.g. per FFN neuron for a down-projection."""
    out = _target(W, inplace)
    _core.scale_cols(out, _vec(scales), _threads(threads))
    return out


def dequantize(
    data: npt.ArrayLike, qtype: gguf.GGMLQuantizationType, rows: int, cols: int, *, threads: int | None = None
) -> FloatArray:
    """Raw tensor bytes of `qtype` to a float32 (rows, cols) matrix, with libggml's `to_float`."""
    ggml.load()
    raw = np.ascontiguousarray(np.asarray(data).reshape(-1).view(np.uint8))
    result: FloatArray = _core.dequantize(raw, int(qtype), int(rows), int(cols), _threads(threads))
    return result


def quantize(
    W: npt.ArrayLike, qtype: gguf.GGMLQuantizationType, *, imatrix: npt.ArrayLike | None = None,
    threads: int | None = None,
) -> npt.NDArray[np.uint8]:
    """A float32 (rows, cols) matrix to raw `qtype` bytes, with libggml's `ggml_quantize_chunk`."""
    ggml.load()
    result: npt.NDArray[np.uint8] = _core.quantize(
        np.ascontiguousarray(W, dtype=np.float32), int(qtype), _opt(imatrix), _threads(threads)
    )
    return result
