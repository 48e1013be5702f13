"""`pydetox plan fit`: a plan scaled to the largest strength within a KL budget, measured in llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny import write_tiny_llama

from pydetox.cli import main
from pydetox.errors import PydetoxError
from pydetox.fit import fit_strength
from pydetox.gguf_io import ModelFile
from pydetox.plan import EditKind, EditPlan, random_plan

DOCS = ["the cat was in the dog. a dog is in the house, and the cat was not. " * 12]


@pytest.fixture(scope="module")
def model_and_plan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("fit")
    model = write_tiny_llama(d / "m.gguf", d=64, ff=128, heads=2, kv_heads=1)
    with ModelFile(model) as m:
        shapes = [(n, t.shape) for n, t in m.tensors.items() if n.endswith("ffn_down.weight")]
    plan = random_plan("llama", shapes, EditKind.PROJECT_OUT, rank=16, seed=3)
    return model, plan.save(d / "p.plan.gguf")


def test_fit_finds_the_strength_at_the_budget(model_and_plan: tuple[Path, Path]) -> None:
    model, path = model_and_plan
    plan = EditPlan.load(path)
    whole = fit_strength(plan, model, 10.0, DOCS, max_tokens=256, window=64, progress=False)
    assert whole.strength == 1.0  # within a loose budget at full strength: one trial
    assert len(whole.trials) == 1
    full_kl = whole.trials[0].kl
    assert full_kl > 1e-3
    budget = full_kl / 4
    fit = fit_strength(plan, model, budget, DOCS, max_tokens=256, window=64, progress=False)
    best = fit.best
    assert best is not None
    assert 0 < fit.strength < 1
    assert 0.8 * budget <= best.kl <= budget  # close under the budget, not just anywhere under it
    assert all(t.kl > budget for t in fit.trials if t.strength > fit.strength)  # no stronger trial fits
    assert 0.3 < fit.strength < 0.7  # KL ~ strength^2: a quarter of the KL near half the strength


def test_plan_fit_command_writes_the_scaled_plan_and_its_trials(model_and_plan: tuple[Path, Path], tmp_path: Path) -> None:
    model, path = model_and_plan
    clean = tmp_path / "clean.txt"
    clean.write_text(DOCS[0])
    out = tmp_path / "fitted.plan.gguf"
    whole = fit_strength(EditPlan.load(path), model, 10.0, DOCS, max_tokens=256, window=64, progress=False)
    budget = whole.trials[0].kl / 2
    assert main(["plan", "fit", str(path), "--model", str(model), "--kl", f"{budget}", "--clean-text", str(clean),
                 "--tokens", "256", "--window", "64", "--quiet", "-o", str(out)]) == 0
    fitted = EditPlan.load(out)
    info = fitted.params["fit"]
    assert info["kl_budget"] == pytest.approx(budget)
    chosen = fitted.params["plan_strength"]
    assert 0 < chosen < 1
    assert max(t["strength"] for t in info["trials"] if t["kl"] <= budget) == pytest.approx(chosen)
    assert fitted.method == f"{EditPlan.load(path).method}-s{chosen:g}"
    # measured again from the written plan, its KL is the trial's
    again = fit_strength(fitted, model, 10.0, DOCS, max_tokens=256, window=64, progress=False)
    assert again.trials[0].kl == pytest.approx(next(t["kl"] for t in info["trials"] if t["strength"] == chosen), rel=1e-3)
    assert main(["plan", "fit", str(path), "--model", str(model), "--kl", "1e-9", "--clean-text", str(clean),
                 "--tokens", "256", "--window", "64", "--steps", "1", "--quiet", "-o", str(tmp_path / "x.plan.gguf")]) == 2
    assert not (tmp_path / "x.plan.gguf").exists()  # one trial, at strength 1, over the budget: no plan written
    with pytest.raises(PydetoxError, match="budget must be > 0"):
        fit_strength(fitted, model, 0.0, DOCS, progress=False)


def test_fit_goes_above_strength_one_only_when_allowed(model_and_plan: tuple[Path, Path]) -> None:
    model, path = model_and_plan
    plan = EditPlan.load(path)
    at_one = fit_strength(plan, model, 10.0, DOCS, max_tokens=256, window=64, progress=False).trials[0].kl
    budget = 2 * at_one
    capped = fit_strength(plan, model, budget, DOCS, max_tokens=256, window=64, progress=False)
    assert capped.strength == 1.0  # the default ceiling: the plan as discovered
    assert len(capped.trials) == 1
    fit = fit_strength(plan, model, budget, DOCS, max_tokens=256, window=64, max_strength=3.0, progress=False)
    best = fit.best
    assert best is not None
    assert 1.0 < fit.strength < 3.0
    assert 0.8 * budget <= best.kl <= budget
    assert 1.2 < fit.strength < 1.6  # KL ~ strength^2: twice the KL near sqrt(2)
    loose = fit_strength(plan, model, 1e6, DOCS, max_tokens=256, window=64, max_strength=2.5, progress=False)
    assert loose.strength == 2.5  # the ceiling itself is tried and kept when it fits
    with pytest.raises(PydetoxError, match="max_strength must be in"):
        fit_strength(plan, model, budget, DOCS, max_strength=0.5, progress=False)


def test_fit_at_a_model_type_measures_against_the_unedited_model_at_that_type(model_and_plan: tuple[Path, Path],
                                                                              tmp_path: Path) -> None:
    """With `ftype` the KL is that of the edited model at the type against the unedited model at the type, as
    `pydetox apply --type` makes both: what a user running the quantized file gets, not the source's KL."""
    from pydetox import ggml
    from pydetox.apply import ApplyOptions, apply_plan
    from pydetox.capability import capability
    from pydetox.runtime import LlamaRuntime

    model, path = model_and_plan
    plan = EditPlan.load(path)
    q4 = ggml.parse_ftype("Q4_0")
    fit = fit_strength(plan, model, 10.0, DOCS, max_tokens=256, window=64, ftype=q4, progress=False)
    ref, edited = tmp_path / "ref.gguf", tmp_path / "edited.gguf"
    apply_plan(None, model, ref, ApplyOptions(ftype=q4, progress=False))
    apply_plan(plan, model, edited, ApplyOptions(ftype=q4, progress=False))
    with LlamaRuntime(ref, n_ctx=64, n_batch=64) as r, LlamaRuntime(edited, n_ctx=64, n_batch=64) as e:
        want = capability(e, DOCS, reference=r, max_tokens=256, window=64, progress=False).kl
    assert fit.trials[0].kl == pytest.approx(want, rel=1e-4)
    source = fit_strength(plan, model, 10.0, DOCS, max_tokens=256, window=64, progress=False).trials[0].kl
    assert abs(fit.trials[0].kl - source) > 1e-3 * source  # not the source's KL under another name


def test_least_precise_ranks_model_types_by_their_main_tensor_type() -> None:
    from pydetox.ggml import least_precise

    assert least_precise(["F16", "Q8_0", "Q4_K_M"]) == "Q4_K_M"
    assert least_precise(["q8_0", "f16"]) == "Q8_0"
    assert least_precise(["Q4_K_M", "Q4_K_S", "Q4_K_M"]) == "Q4_K_S"  # the same main type: the smaller mix
    assert least_precise(["IQ3_M", "IQ3_XS", "Q4_0"]) == "IQ3_XS"  # IQ3 mixes are named after IQ3_S
    assert least_precise(["Q4_K_M", "IQ4_XS"]) == "IQ4_XS"  # 4.25 bits per weight against Q4_K's 4.5
    assert least_precise(["BF16", "F32"]) == "BF16"
    with pytest.raises(PydetoxError, match="unknown model type 'Q4_K_Z'"):
        least_precise(["F16", "Q4_K_Z"])
    with pytest.raises(PydetoxError, match="expected at least one model type, found none"):
        least_precise([])


def test_a_fixed_plan_rides_along_at_strength_one(model_and_plan: tuple[Path, Path], tmp_path: Path) -> None:
    """`fixed` (the recipe's word filter: rows scaled to 0, which no strength but 1 keeps at 0) is merged after the
    scaled plan in every trial, so its KL counts against the budget and the fit scales the other plan alone."""
    from pydetox.apply import ApplyOptions, apply_plan
    from pydetox.capability import capability
    from pydetox.fit import with_fixed
    from pydetox.plan import Edit
    from pydetox.runtime import LlamaRuntime

    model, path = model_and_plan
    plan = EditPlan.load(path)
    with ModelFile(model) as m:
        rows, cols = m.tensors["output.weight"].shape
    gain = np.ones(rows, np.float32)
    gain[[5, 9, 40]] = 0.0
    fixed = EditPlan("llama", [Edit("output.weight", EditKind.SCALE_ROWS, (rows, cols), gain)], "wordfilter")
    alone = fit_strength(plan, model, 10.0, DOCS, max_tokens=256, window=64, progress=False).trials[0].kl
    both = fit_strength(plan, model, 10.0, DOCS, max_tokens=256, window=64, fixed=fixed, progress=False).trials[0].kl
    edited = tmp_path / "both.gguf"
    apply_plan(with_fixed(plan, fixed), model, edited, ApplyOptions(progress=False))
    with LlamaRuntime(model, n_ctx=64, n_batch=64) as r, LlamaRuntime(edited, n_ctx=64, n_batch=64) as e:
        want = capability(e, DOCS, reference=r, max_tokens=256, window=64, progress=False).kl
    assert both == pytest.approx(want, rel=1e-4)  # the trial is the merged plan
    assert both > alone * 1.01
    # a budget the plan alone meets at strength 1: with the filter in every trial the fit settles lower
    fit = fit_strength(plan, model, alone, DOCS, max_tokens=256, window=64, fixed=fixed, progress=False)
    assert 0 < fit.strength < 1
    assert with_fixed(plan, None) is plan
    merged = with_fixed(plan.scaled(0.5), fixed)
    assert merged.edits[-1].a[5] == 0.0  # the filter unscaled
