"""Edit kernels on a 4096 x 11008 float32 matrix (a 7B model's down-projection), k = 16, against numpy + OpenBLAS
doing the same edit in place with the fewest temporaries. Run: pytest bench/bench_kernels.py"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from pydetox import kernels as K
from pydetox.kernels import default_threads

ROWS, COLS, RANK = 4096, 11008, 16


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "W": rng.standard_normal((ROWS, COLS), dtype=np.float32),
        "U": np.ascontiguousarray(np.linalg.qr(rng.standard_normal((ROWS, RANK)))[0].T, dtype=np.float32),
        "V": np.ascontiguousarray(np.linalg.qr(rng.standard_normal((COLS, RANK)))[0].T, dtype=np.float32),
        "L": rng.standard_normal((RANK, ROWS), dtype=np.float32),
        "R": rng.standard_normal((RANK, COLS), dtype=np.float32),
    }


def _case(data: dict[str, np.ndarray], name: str) -> tuple[Callable[[np.ndarray], Any], Callable[[np.ndarray], Any]]:
    U, V, L, R = data["U"], data["V"], data["L"], data["R"]
    t = default_threads()
    cases = {
        "project_out": (lambda W: K.project_out(W, U, inplace=True, threads=t), lambda W: np.subtract(W, U.T @ (U @ W), out=W)),
        "project_in": (lambda W: K.project_in(W, V, inplace=True, threads=t), lambda W: np.subtract(W, (W @ V.T) @ V, out=W)),
        "low_rank": (lambda W: K.low_rank(W, L, R, inplace=True, threads=t), lambda W: np.add(W, L.T @ R, out=W)),
    }
    return cases[name]


@pytest.mark.parametrize("name", ["project_out", "project_in", "low_rank"])
def test_kernel_vs_numpy(name: str, data: dict[str, np.ndarray], compare: Callable[..., float]) -> None:
    ours, numpy_edit = _case(data, name)
    ratio = compare("numpy+OpenBLAS", ours, numpy_edit, rounds=5, setup=lambda: data["W"].copy())
    # correctness after timing: the two results agree on one fresh copy
    a, b = data["W"].copy(), data["W"].copy()
    ours(a)
    numpy_edit(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    assert ratio > 0
