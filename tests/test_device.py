"""The torch device of discovery and calibrator training (`--device auto|cpu|cuda`). Device-agnostic: on a machine
whose torch sees a GPU, "auto" runs on it and the tests compare it with the CPU; elsewhere "auto" is the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_recipe import SHAPE, TINY_CAL, TINY_DISTILL
from tiny import write_tiny_llama

from pydetox.discover.model import resolve_device
from pydetox.errors import PydetoxError
from pydetox.plan import EditPlan
from pydetox.recipe import RecipeSettings, distill_plan

torch = pytest.importorskip("torch")
HAS_CUDA = torch.cuda.is_available()


def test_auto_is_cuda_exactly_when_torch_sees_a_gpu() -> None:
    assert resolve_device("auto") == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(PydetoxError, match="device is one of auto, cpu, cuda; got 'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(HAS_CUDA, reason="torch sees a GPU here")
def test_cuda_without_a_gpu_is_refused_not_run_on_the_cpu(tmp_path: Path) -> None:
    from pydetox.cli import main

    with pytest.raises(PydetoxError, match="sees no usable GPU"):
        resolve_device("cuda")
    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    assert main(["discover", "--method", "profs", "--model", str(model), "-o", str(tmp_path / "p.plan.gguf"),
                 "--device", "cuda", "--quiet"]) == 2
    assert not (tmp_path / "p.plan.gguf").exists()


def test_the_recipe_on_auto_matches_the_cpu_and_shares_its_stages(tmp_path: Path) -> None:
    """Calibrator and student on "auto" give the CPU's plan (the same here; within tolerance on a GPU), and the
    device is no part of a stage's key: a run on another device reuses every stage."""
    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    float32 = {**TINY_DISTILL, "precision": "float32"}
    cal = TINY_CAL.__class__(**{**TINY_CAL.__dict__, "precision": "float32"})

    def settings(device: str, where: str) -> RecipeSettings:
        return RecipeSettings(calibrator=cal, distill=float32, kl_budget=0.05, fit_tokens=256, fit_steps=3,
                              calibrators=tmp_path / where / "calibrators", device=device)

    _, on_cpu, _ = distill_plan(model, tmp_path / "cpu", settings("cpu", "cpu"), progress=False)
    _, on_auto, _ = distill_plan(model, tmp_path / "auto", settings("auto", "auto"), progress=False)
    a, b = EditPlan.load(on_cpu), EditPlan.load(on_auto)
    assert [e.tensor for e in a.edits] == [e.tensor for e in b.edits]
    for x, y in zip(a.edits, b.edits, strict=True):
        dx = x.a.T @ x.b  # the low-rank update itself
        dy = y.a.T @ y.b
        assert np.linalg.norm(dx - dy) <= (0.0 if not HAS_CUDA else 0.05) * np.linalg.norm(dx) + 1e-7
    _, again, timing = distill_plan(model, tmp_path / "cpu", settings("auto", "cpu"), progress=False)
    assert again == on_cpu
    assert all(timing[s]["cached"] for s in ("f16", "calibrator", "distill", "fit"))
