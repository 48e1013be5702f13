"""Native kernels against their numpy references (pydetox.reference) and libggml against gguf-py's quantizers."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from pydetox import kernels as K
from pydetox import reference as R
from pydetox.errors import PydetoxError

Q = gguf.GGMLQuantizationType

# float32 kernels vs float64 references: errors grow with the reduction length (cols or rows) as ~sqrt(n) * 6e-8
# relative to the largest product; 2e-5 of the largest entry leaves a wide margin at n <= 2000 and still catches any
# indexing or layout error (which gives O(1) differences).
RTOL = 2e-5
SHAPES = [(1, 1), (3, 17), (33, 5), (64, 257), (250, 130)]


def orthonormal(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((n, k)))[0].T.astype(np.float32)


def close(got: np.ndarray, want: np.ndarray) -> None:
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threads", [1, 3])
def test_projections_match_reference(shape: tuple[int, int], threads: int) -> None:
    rng = np.random.default_rng(sum(shape))
    rows, cols = shape
    W = rng.standard_normal(shape).astype(np.float32)
    for n, fn, ref in ((rows, K.project_out, R.project_out), (cols, K.project_in, R.project_in)):
        k = min(n, 4)
        B = orthonormal(rng, k, n)
        gain = rng.uniform(0, 1, k).astype(np.float32)
        close(fn(W, B, threads=threads), ref(W, B))
        close(fn(W, B, gain, threads=threads), ref(W, B, gain))


@pytest.mark.parametrize("shape", SHAPES)
def test_low_rank_and_scales_match_reference(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(7)
    rows, cols = shape
    W = rng.standard_normal(shape).astype(np.float32)
    L = rng.standard_normal((3, rows)).astype(np.float32)
    Rt = rng.standard_normal((3, cols)).astype(np.float32)
    close(K.low_rank(W, L, Rt, threads=2), R.low_rank(W, L, Rt))
    s, c = rng.uniform(0, 2, rows), rng.uniform(0, 2, cols)
    close(K.scale_rows(W, s, threads=2), R.scale_rows(W, s))
    close(K.scale_cols(W, c, threads=2), R.scale_cols(W, c))


def test_degenerate_inputs() -> None:
    rng = np.random.default_rng(1)
    W = rng.standard_normal((40, 70)).astype(np.float32)
    W[::3] = 0.0  # zero rows
    # a rank-deficient "basis" (repeated direction): the kernel computes the same formula as the reference
    B = orthonormal(rng, 2, 70)
    B = np.vstack([B, B[:1]])
    close(K.project_in(W, B), R.project_in(W, B))
    # projecting a zero matrix gives zeros; an empty edit (all-ones scales) is exact
    np.testing.assert_array_equal(K.project_out(np.zeros((5, 9), np.float32), orthonormal(rng, 2, 5)), 0)
    np.testing.assert_array_equal(K.scale_rows(W, np.ones(40)), W)


def test_non_contiguous_inputs_are_copied_not_misread() -> None:
    rng = np.random.default_rng(2)
    big = rng.standard_normal((60, 90))
    W = big[::2, 1::3]  # strided float64 view
    V = orthonormal(rng, 3, W.shape[1])
    close(K.project_in(W, V), R.project_in(W, V))
    close(K.project_in(np.asfortranarray(W), V[:, :]), R.project_in(W, V))
    Vs = np.ascontiguousarray(np.hstack([V, V]))[:, ::2]  # non-contiguous basis
    close(K.project_in(W, Vs), R.project_in(W, Vs))


def test_inplace_needs_float32_contiguous() -> None:
    with pytest.raises(TypeError, match="float32 C-contiguous"):
        K.project_out(np.zeros((4, 4)), np.eye(4, dtype=np.float32)[:1], inplace=True)
    W = np.ones((4, 4), np.float32)
    out = K.scale_rows(W, np.full(4, 2.0), inplace=True)
    assert out is W
    assert W[0, 0] == 2.0


def test_result_does_not_depend_on_thread_count() -> None:
    rng = np.random.default_rng(3)
    W = rng.standard_normal((301, 515)).astype(np.float32)
    U = orthonormal(rng, 5, 301)
    V = orthonormal(rng, 5, 515)
    for fn, B in ((K.project_out, U), (K.project_in, V)):
        ref = fn(W, B, threads=1)
        for t in (2, 3, 8):
            np.testing.assert_array_equal(fn(W, B, threads=t), ref)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"basis": np.zeros((2, 7), np.float32)}, r"expected a basis of shape \(k, 6\)"),
        ({"basis": np.zeros((0, 6), np.float32)}, "k >= 1"),
        ({"basis": np.zeros(6, np.float32)}, "expected a basis"),
        ({"basis": np.eye(6, dtype=np.float32)[:2], "gain": np.zeros(3)}, r"gain: expected shape \(2,\)"),
    ],
)
def test_bad_shapes_raise_clear_errors(kwargs: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(PydetoxError, match=match):
        K.project_out(np.zeros((6, 5), np.float32), **kwargs)


# gguf-py's numpy quantizers are bit-identical to ggml for these types (llama.cpp gguf-py/tests/test_quants.py).
@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0])
def test_libggml_quantize_is_bit_identical_to_gguf(qtype: Q) -> None:
    rng = np.random.default_rng(int(qtype))
    W = rng.standard_normal((37, 256)).astype(np.float32)
    W[5] = 0.0
    raw = K.quantize(W, qtype, threads=3)
    want = gguf.quants.quantize(W, qtype)
    np.testing.assert_array_equal(raw, np.asarray(want).view(np.uint8).reshape(-1))
    np.testing.assert_array_equal(K.dequantize(raw, qtype, 37, 256, threads=2), gguf.quants.dequantize(want, qtype))


# K-quant and IQ dequantization: gguf-py implements the same decoding in numpy; float32 arithmetic order may differ.
@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS])
def test_libggml_dequantize_matches_gguf(qtype: Q) -> None:
    rng = np.random.default_rng(int(qtype))
    W = rng.standard_normal((9, 512)).astype(np.float32)
    raw = K.quantize(W, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert raw.size == 9 * 512 // block * size
    got = K.dequantize(raw, qtype, 9, 512)
    want = gguf.quants.dequantize(raw.reshape(9, -1), qtype)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.abs(got - W).max() < 1.5  # it is a quantization of W, not noise


def test_quantize_refuses_what_libggml_would_abort_on() -> None:
    W = np.zeros((2, 100), np.float32)
    with pytest.raises(PydetoxError, match="multiple of its block size 256"):
        K.quantize(W, Q.Q4_K)
    with pytest.raises(PydetoxError, match="no quantizer"):
        K.quantize(np.zeros((2, 256), np.float32), Q.Q8_K)
    with pytest.raises(PydetoxError, match="importance matrix"):
        K.quantize(np.zeros((2, 256), np.float32), Q.IQ2_XXS)
    raw = K.quantize(np.ones((2, 256), np.float32), Q.IQ2_XXS, imatrix=np.ones(256, np.float32))
    assert raw.size == 2 * gguf.GGML_QUANT_SIZES[Q.IQ2_XXS][1]


def test_process_tensor_takes_bound_kinds_and_returns_bound_stats() -> None:
    """Every plan kind has a native kind of the same name; the stats are the native struct, read by attribute."""
    from pydetox import _core
    from pydetox.plan import EditKind

    assert {k.name for k in EditKind} == set(_core.OpKind.__members__)
    rng = np.random.default_rng(3)
    W = rng.standard_normal((8, 32)).astype(np.float32)
    basis = np.linalg.qr(rng.standard_normal((8, 2)))[0].T.astype(np.float32)
    raw = K.quantize(W, Q.F32)
    out, st = _core.process_tensor(raw, int(Q.F32), 8, 32, [(_core.OpKind.PROJECT_OUT, basis, None, None)],
                                   int(Q.F32), verify=True)
    edited = out.view(np.float32).reshape(8, 32)
    np.testing.assert_allclose(edited, R.project_out(W, basis), rtol=1e-5, atol=1e-5)
    assert isinstance(st, _core.TensorStats)
    assert len(st.ops) == 1
    assert st.norm_orig == pytest.approx(np.linalg.norm(W), rel=1e-5)
    assert st.norm_delta == pytest.approx(np.linalg.norm(edited - W), rel=1e-4)
    assert st.ops[0].removed == pytest.approx(np.linalg.norm(basis @ W), rel=1e-4)
    assert st.ops[0].survived < 1e-4 * st.ops[0].removed
    with pytest.raises(PydetoxError, match=r"kind must be a pydetox\._core\.OpKind, got int"):
        _core.process_tensor(raw, int(Q.F32), 8, 32, [(0, basis, None, None)], int(Q.F32))
