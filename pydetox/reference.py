"""Numpy references for the native kernels in `pydetox.kernels`, in float64. They define what each kernel computes;
tests compare the two. They are also what a user would otherwise write, so the benchmarks time them as baselines."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]


def _damp(gain: npt.ArrayLike | None, k: int) -> F64:
    return np.ones(k) if gain is None else 1.0 - np.asarray(gain, dtype=np.float64)


def project_out(W: npt.ArrayLike, basis: npt.ArrayLike, gain: npt.ArrayLike | None = None) -> F64:
    W64 = np.asarray(W, dtype=np.float64)
    U = np.asarray(basis, dtype=np.float64)
    return W64 - U.T @ (_damp(gain, U.shape[0])[:, None] * (U @ W64))


def project_in(W: npt.ArrayLike, basis: npt.ArrayLike, gain: npt.ArrayLike | None = None) -> F64:
    W64 = np.asarray(W, dtype=np.float64)
    V = np.asarray(basis, dtype=np.float64)
    return W64 - ((W64 @ V.T) * _damp(gain, V.shape[0])[None, :]) @ V


def low_rank(W: npt.ArrayLike, left: npt.ArrayLike, right: npt.ArrayLike) -> F64:
    return np.asarray(W, dtype=np.float64) + np.asarray(left, np.float64).T @ np.asarray(right, np.float64)


def scale_rows(W: npt.ArrayLike, scales: npt.ArrayLike) -> F64:
    return np.asarray(W, dtype=np.float64) * np.asarray(scales, np.float64)[:, None]


def scale_cols(W: npt.ArrayLike, scales: npt.ArrayLike) -> F64:
    return np.asarray(W, dtype=np.float64) * np.asarray(scales, np.float64)[None, :]


def add_rows(W: npt.ArrayLike, rows: npt.ArrayLike, added: npt.ArrayLike) -> F64:
    out = np.array(W, dtype=np.float64)
    out[np.asarray(rows).astype(np.int64)] += np.asarray(added, np.float64)
    return out


def survival_out(W0: npt.ArrayLike, Wq: npt.ArrayLike, basis: npt.ArrayLike, gain: npt.ArrayLike | None = None) -> float:
    """Share of an output-side projection's removed component still present in Wq (see TensorStats)."""
    U = np.asarray(basis, dtype=np.float64)
    c0 = U @ np.asarray(W0, np.float64)
    cq = U @ np.asarray(Wq, np.float64)
    g = np.zeros(U.shape[0]) if gain is None else np.asarray(gain, np.float64)
    return float(np.linalg.norm(cq - g[:, None] * c0) / np.linalg.norm((1 - g)[:, None] * c0))


def survival_in(W0: npt.ArrayLike, Wq: npt.ArrayLike, basis: npt.ArrayLike, gain: npt.ArrayLike | None = None) -> float:
    """Share of an input-side projection's removed component still present in Wq."""
    V = np.asarray(basis, dtype=np.float64)
    d0 = np.asarray(W0, np.float64) @ V.T
    dq = np.asarray(Wq, np.float64) @ V.T
    g = np.zeros(V.shape[0]) if gain is None else np.asarray(gain, np.float64)
    return float(np.linalg.norm(dq - g[None, :] * d0) / np.linalg.norm((1 - g)[None, :] * d0))
