from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from pydetox.errors import PlanError, PlanMismatchError
from pydetox.plan import PLAN_VERSION, Edit, EditKind, EditPlan, random_orthonormal, random_plan

SHAPES = [("blk.0.ffn_down.weight", (256, 512)), ("blk.0.attn_output.weight", (256, 256))]


@pytest.mark.parametrize("kind", list(EditKind))
def test_round_trip_every_kind(tmp_path: Path, kind: EditKind) -> None:
    plan = random_plan("llama", SHAPES, kind, rank=3, seed=1, model="tiny")
    path = plan.save(tmp_path / "p.gguf")
    back = EditPlan.load(path)
    assert (back.arch, back.method, back.params, back.model, back.version) == ("llama", "random", plan.params, "tiny", PLAN_VERSION)
    for a, b in zip(plan.edits, back.edits, strict=True):
        assert (a.tensor, a.kind, a.shape, a.source) == (b.tensor, b.kind, b.shape, b.source)
        for name, arr in a.arrays().items():
            np.testing.assert_array_equal(arr, b.arrays()[name])
    # small: bases and vectors, not matrices
    assert path.stat().st_size < 4 * 3 * (256 + 512) * 4 + 16_384


def test_gain_and_source_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    e = Edit("output.weight", EditKind.PROJECT_IN, (300, 64), random_orthonormal(rng, 4, 64),
             gain=np.full(4, 0.1, np.float32), source="token_embd.weight")
    back = EditPlan.load(EditPlan("llama", [e]).save(tmp_path / "p.gguf")).edits[0]
    assert back.source == "token_embd.weight"
    np.testing.assert_array_equal(back.gain, e.gain)


def _edit(**kw: object) -> Edit:
    base: dict[str, object] = {"tensor": "t", "kind": EditKind.PROJECT_OUT, "shape": (8, 4),
                               "a": np.eye(8, dtype=np.float32)[:2]}
    base.update(kw)
    return Edit(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_edit(a=np.full((2, 8), np.nan, np.float32)), "NaN or inf"),
        (_edit(a=np.ones((2, 8), np.float32)), "orthonormal"),
        (_edit(a=np.eye(4, dtype=np.float32)[:2]), r"should have shape \(2, 8\)"),
        (_edit(gain=np.zeros(3, np.float32)), r"'gain' should have shape \(2,\)"),
        (_edit(kind=EditKind.LOW_RANK, a=np.ones((2, 8), np.float32)), "right factor"),
        (_edit(kind=EditKind.SCALE_ROWS, a=np.ones(8, np.float32), b=np.ones(4, np.float32)), "takes no 'b'"),
        (_edit(shape=(0, 4)), "positive"),
        (_edit(kind=EditKind.ADD_ROWS, a=np.array([1, 1], np.float32), b=np.ones((2, 4), np.float32)), "1 repeated"),
        (_edit(kind=EditKind.ADD_ROWS, a=np.array([0, 8], np.float32), b=np.ones((2, 4), np.float32)), r"in \[0, 8\)"),
        (_edit(kind=EditKind.ADD_ROWS, a=np.array([0, 2.5], np.float32), b=np.ones((2, 4), np.float32)), "whole"),
        (_edit(kind=EditKind.ADD_ROWS, a=np.array([0, 2], np.float32), b=np.ones((3, 4), np.float32)), r"'b' should have shape \(2, 4\)"),
        (_edit(kind=EditKind.ADD_ROWS, a=np.array([0, 2], np.float32)), "right factor"),
    ],
)
def test_invalid_edits_are_refused(tmp_path: Path, edit: Edit, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        EditPlan("llama", [edit]).save(tmp_path / "p.gguf")
    assert not list(tmp_path.iterdir())


def test_check_fits() -> None:
    plan = random_plan("llama", SHAPES, EditKind.PROJECT_OUT, rank=2)
    shapes = dict(SHAPES)
    plan.check_fits("llama", shapes)
    with pytest.raises(PlanMismatchError, match="architecture 'llama', the model is 'gemma3'"):
        plan.check_fits("gemma3", shapes)
    with pytest.raises(PlanMismatchError, match="does not have"):
        plan.check_fits("llama", {"blk.0.ffn_down.weight": (256, 512)})
    with pytest.raises(PlanMismatchError, match="as a 256x512 matrix, the model's is 576x1536"):
        plan.check_fits("llama", {**shapes, "blk.0.ffn_down.weight": (576, 1536)})


def test_newer_version_and_foreign_files_are_refused(tmp_path: Path) -> None:
    plan = random_plan("llama", SHAPES, EditKind.SCALE_COLS, rank=1)
    plan.version = PLAN_VERSION + 1
    path = plan.save(tmp_path / "future.gguf")
    with pytest.raises(PlanError, match=f"version {PLAN_VERSION + 1}"):
        EditPlan.load(path)
    model = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(model, "llama")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(PlanError, match="not a pydetox edit plan"):
        EditPlan.load(model)
    (tmp_path / "junk").write_bytes(b"not a gguf at all")
    with pytest.raises(PlanError, match="not a readable edit plan"):
        EditPlan.load(tmp_path / "junk")
    with pytest.raises(PlanError, match="found nothing"):
        EditPlan.load(tmp_path / "missing")


def _edited(W: np.ndarray, e: Edit) -> np.ndarray:
    from pydetox import reference as ref

    k = e.kind
    if k is EditKind.PROJECT_OUT:
        return ref.project_out(W, e.a, e.gain)
    if k is EditKind.PROJECT_IN:
        return ref.project_in(W, e.a, e.gain)
    if k is EditKind.LOW_RANK:
        return ref.low_rank(W, e.a, e.b)
    if k is EditKind.SCALE_ROWS:
        return ref.scale_rows(W, e.a)
    if k is EditKind.SCALE_COLS:
        return ref.scale_cols(W, e.a)
    return ref.add_rows(W, e.a, e.b)


@pytest.mark.parametrize("kind", list(EditKind))
def test_scaled_plan_interpolates_between_the_model_and_the_edit(tmp_path: Path, kind: EditKind) -> None:
    """strength 0: the tensor as it is; 1: the plan's edit; s: exactly (1 - s) W + s W_edited, for every kind."""
    plan = random_plan("llama", SHAPES, kind, rank=3, seed=2, model="tiny")
    rng = np.random.default_rng(3)
    for e in plan.edits:
        W = rng.standard_normal(e.shape)
        full = _edited(W, e)
        np.testing.assert_allclose(_edited(W, e.scaled(0.0)), W, atol=1e-12)
        np.testing.assert_allclose(_edited(W, e.scaled(1.0)), full, atol=1e-6)
        for s in (0.3, 1.5):
            np.testing.assert_allclose(_edited(W, e.scaled(s)), (1 - s) * W + s * full, atol=1e-5)
    half = plan.scaled(0.5, source="p.gguf").scaled(0.5)
    assert half.params["plan_strength"] == 0.25
    assert half.params["scaled_from"] == "p.gguf"
    assert (half.method, half.params["scaled_method"]) == ("random-s0.25", "random")
    back = EditPlan.load(half.save(tmp_path / "q.gguf"))
    assert back.params["plan_strength"] == 0.25
    for bad in (-1.0, 10.5, float("inf"), float("nan")):
        with pytest.raises(PlanError, match=r"strength must be a number in \[0, 10\]"):
            plan.scaled(bad)


def test_a_scaling_extrapolated_stops_at_zero() -> None:
    """Above strength 1 a gain under 1 falls, but never past 0: a silenced row (a banned token) stays silent, it
    does not come back with its sign flipped. Between 0 and 1 nothing is clamped."""
    e = Edit("output.weight", EditKind.SCALE_ROWS, (4, 3), np.array([0.0, 0.5, 1.0, 2.0], np.float32))
    np.testing.assert_allclose(e.scaled(1.5).a, [0.0, 0.25, 1.0, 2.5])
    np.testing.assert_allclose(e.scaled(3.0).a, [0.0, 0.0, 1.0, 4.0])
    np.testing.assert_allclose(e.scaled(0.5).a, [0.5, 0.75, 1.0, 1.5])


def test_plan_scale_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pydetox.cli import main

    plan = random_plan("llama", SHAPES, EditKind.LOW_RANK, rank=3, seed=2, model="tiny")
    src = plan.save(tmp_path / "p.gguf")
    assert main(["plan", "scale", str(src), "--strength", "0.5", "-o", str(tmp_path / "h.gguf")]) == 0
    half = EditPlan.load(tmp_path / "h.gguf")
    np.testing.assert_allclose(half.edits[0].a, 0.5 * plan.edits[0].a, rtol=1e-6)
    np.testing.assert_array_equal(half.edits[0].b, plan.edits[0].b)
    before = src.read_bytes()
    assert main(["plan", "scale", str(src), "--strength", "0.5", "-o", str(src)]) != 0
    assert "is the input file" in capsys.readouterr().err
    assert src.read_bytes() == before
