"""The default recipe (pydetox.recipe) on a tiny llama GGUF: every stage runs and leaves its artefact, a rerun
finds them all and runs nothing, and a changed setting reruns only the stages that depend on it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from tiny import write_tiny_llama

from pydetox.calibrate import CalibrateSettings
from pydetox.errors import PydetoxError
from pydetox.plan import EditKind, EditPlan
from pydetox.recipe import RecipeSettings, distill_plan, with_overrides

SHAPE = {"d": 64, "ff": 128, "layers": 3, "heads": 4, "kv_heads": 2}
TINY_CAL = CalibrateSettings(layers=1, steps=4, batch=4, seq_len=32, align_steps=3, eval_every=2, clean_tokens=0,
                             output_type="F32", layer_type="F32", vocab_sample=64, precision="bfloat16",
                             restrict_vocab=True)
TINY_DISTILL = {"alpha": "0.9", "max_prompts": "16", "pairs": "16", "clean_texts": "16", "steps": "8", "lr": "0.03",
                "rank": "4", "batch": "4", "first_layer": "1", "max_tokens": "32", "precision": "bfloat16",
                "clean_kl": "full", "held_out": "4"}


def test_stages_run_then_resume_from_their_artefacts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    out = tmp_path / "out"
    settings = RecipeSettings(calibrator=TINY_CAL, distill=TINY_DISTILL, kl_budget=0.05, fit_tokens=256, fit_steps=3,
                              calibrators=tmp_path / "calibrators")
    plan, path, timing = distill_plan(model, out, settings, progress=True)
    ran = ["f16", "calibrator", "teacher", "distill", "fit"]
    assert all(not timing[s]["cached"] and timing[s]["seconds"] > 0 for s in ran)
    assert all(timing[s]["peak_rss_gb"] > 0 for s in ("calibrator", "teacher", "distill"))  # each in its own process
    assert "peak_rss_gb" not in timing["fit"]
    assert path.parent == out / "stages"
    assert {e.kind for e in plan.edits} == {EditKind.LOW_RANK}
    assert len(plan.edits) == 2
    strength = plan.params["plan_strength"]
    assert 0 < strength <= settings.max_strength
    assert plan.params["fit"]["kl_budget"] == 0.05
    assert plan.params["fit"]["clean_text"] == "news-held-out"
    assert all(t["kl"] >= 0 for t in plan.params["fit"]["trials"])
    assert len(list((out / "stages").glob("teacher-*.npz"))) == 1
    assert len(list((tmp_path / "calibrators").glob("calibrator-*.stage.json"))) == 1  # shared by every output folder
    assert not list((out / "stages").glob("*.tmp*"))
    assert not list((out / "stages").glob("*.partial*"))
    # the word filter ("auto"): the tiny model has an output layer of its own, but no listed word is in its
    # vocabulary, so the stage records that it found nothing and the fit goes without it
    (record,) = (out / "stages").glob("wordfilter-*.stage.json")
    assert json.loads(record.read_text())["empty"] is True
    assert not list((out / "stages").glob("wordfilter-*.plan.gguf"))
    assert not timing["wordfilter"]["cached"]
    assert not plan.method.endswith("+wordfilter")
    first = path.read_bytes()

    capsys.readouterr()
    _, again, timing = distill_plan(model, out, settings, progress=True)
    assert all(timing[s]["cached"] for s in ran)
    assert again == path
    assert again.read_bytes() == first
    assert timing["wordfilter"]["cached"]
    assert capsys.readouterr().out.count("cached") == 6
    # asked for, a filter that bans nothing is an error
    with pytest.raises(PydetoxError, match="no token of this vocabulary is a word of the bad-words list"):
        distill_plan(model, out, dataclasses.replace(settings, word_filter=True), progress=False)

    # another student setting: the calibrator and the teacher are reused, the student and the fit run again
    more = RecipeSettings(**{**settings.__dict__, "distill": {**TINY_DISTILL, "steps": "10"}})
    plan3, path3, timing = distill_plan(model, out, more, progress=False)
    assert [s for s in ran if timing[s]["cached"]] == ["f16", "calibrator", "teacher"]
    assert path3 != path
    assert plan3.params["diagnostics"]["teacher_from_cache"] is True
    # an interrupted student stage (its plan gone) is the only one made again, with the teacher read back
    for f in (out / "stages").glob("distill-*.plan.gguf"):
        f.unlink()
    _, _, timing = distill_plan(model, out, more, progress=False)
    assert [s for s in ran if not timing[s]["cached"]] == ["distill"]
    assert EditPlan.load(path3).params["diagnostics"]["held_out_after"]

    # the student trained in this process instead of a child: the same update
    (child_raw,) = (out / "stages").glob("distill-*.plan.gguf")
    in_child = EditPlan.load(child_raw)
    for f in (out / "stages").glob("distill-*"):
        f.unlink()
    _, _, timing = distill_plan(model, out, dataclasses.replace(more, isolate=False), progress=False)
    assert not timing["distill"]["cached"]
    assert "peak_rss_gb" not in timing["distill"]
    (here_raw,) = (out / "stages").glob("distill-*.plan.gguf")
    for a, b in zip(in_child.edits, EditPlan.load(here_raw).edits, strict=True):
        assert a.tensor == b.tensor
        np.testing.assert_array_equal(a.a, b.a)
        np.testing.assert_array_equal(a.b, b.b)

    # the output folder moved: its stages still serve, and the student reads the teacher's targets from their cache
    # instead of computing them again in its own process
    moved = tmp_path / "moved"
    out.rename(moved)
    for f in (moved / "stages").glob("distill-*"):
        f.unlink()
    _, _, timing = distill_plan(model, moved, more, progress=False)
    assert [s for s in ran if not timing[s]["cached"]] == ["distill"]
    (raw,) = (moved / "stages").glob("distill-*.plan.gguf")
    assert EditPlan.load(raw).params["diagnostics"]["teacher_from_cache"] is True


def test_a_given_calibrator_must_exist(tmp_path: Path) -> None:
    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    with pytest.raises(PydetoxError, match="expected a calibrator GGUF at"):
        distill_plan(model, tmp_path / "out", RecipeSettings(calibrator_file=tmp_path / "none.gguf"), progress=False)


def test_detox_runs_the_recipe_by_default_and_reports_stages_and_helpfulness(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from pydetox import recipe
    from pydetox.cli import main

    monkeypatch.setattr(recipe, "shared_calibrators", lambda: tmp_path / "calibrators")
    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    out = tmp_path / "dx"
    cal = [f"calibrator:{k}={v}" for k, v in {"layers": 1, "steps": 4, "batch": 4, "seq_len": 32, "align_steps": 3,
                                               "clean_tokens": 0, "output_type": "F32", "layer_type": "F32"}.items()]
    args = ["detox", "--model", str(model), "--types", "F16", "--limit", "7", "--ppl-tokens", "128", "--out", str(out),
            "--quiet"]
    for item in cal + [f"distill:{k}={v}" for k, v in TINY_DISTILL.items()]:
        args += ["--param", item]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["detox"]["methods"] == ["distill"]
    stages = report["detox"]["discovery"]["stages"]
    assert {"f16", "calibrator", "distill", "fit"} <= set(stages)
    assert stages["distill"]["peak_rss_gb"] > 0  # the student's process
    assert 0 < report["detox"]["peak_rss_gb"] < 100  # this one's
    assert (out / "distill.plan.gguf").is_file()
    assert (out / "m.distill.F16.gguf").is_file()
    (row,) = report["detox"]["summary"]
    assert row["method"] == "distill"
    assert 0 <= row["chat_accuracy"] <= 1
    assert 0 <= row["chat_base_accuracy"] <= 1
    assert 0 < row["benign_mean_tokens"] <= 20
    assert 0 <= row["benign_early_stop_share"] <= 1
    assert row["hatesonar_rest_rate"] <= row["hatesonar_rate"]  # hatesonar judged without its identity-only calls too
    for m in report["models"]:
        chat = m["helpfulness"]["chat"]
        assert chat["questions"] >= 100
        assert chat["template"] == "plain"
        assert len(chat["answers"]) == chat["questions"]
    assert "chat correct (base)" in (out / "report.md").read_text()
    assert "peak memory of this process" in (out / "report.md").read_text()
    assert "hatesonar w/o identity-only (x less)" in (out / "report.md").read_text()


def test_a_default_given_explicitly_is_the_same_stage(tmp_path: Path) -> None:
    """Stage names come from the settings as distill resolves them, not from how they were spelt."""
    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    out = tmp_path / "out"
    settings = RecipeSettings(calibrator=TINY_CAL, distill=TINY_DISTILL, kl_budget=0.05, fit_tokens=256, fit_steps=3,
                              calibrators=tmp_path / "calibrators")
    _, path, _ = distill_plan(model, out, settings, progress=False)
    spelt = RecipeSettings(**{**settings.__dict__, "distill": {**TINY_DISTILL, "top_k": "32", "lr": "0.030"}})
    _, again, timing = distill_plan(model, out, spelt, progress=False)
    assert again == path
    assert all(timing[s]["cached"] for s in ("f16", "calibrator", "distill", "fit"))
    ceiling = RecipeSettings(**{**settings.__dict__, "max_strength": RecipeSettings().max_strength})
    assert distill_plan(model, out, ceiling, progress=False)[1] == path  # the default ceiling, spelt: the same fit
    higher = RecipeSettings(**{**settings.__dict__, "max_strength": 3.0})
    plan, lifted, timing = distill_plan(model, out, higher, progress=False)
    assert lifted != path
    assert all(timing[s]["cached"] for s in ("f16", "calibrator", "distill"))
    assert not timing["fit"]["cached"]
    assert plan.params["fit"]["max_strength"] == 3.0
    assert 0 < plan.params["plan_strength"] <= 3.0
    first = EditPlan.load(path)
    assert first.params["fit"]["model_type"] == "Q4_K_M"  # "lowest" of the default types, on its own
    q4 = RecipeSettings(**{**settings.__dict__, "fit_type": "q4_k_m"})
    assert distill_plan(model, out, q4, progress=False)[1] == path  # that type, spelt: the same fit
    _, at_f16, timing = distill_plan(model, out, RecipeSettings(**{**settings.__dict__, "fit_type": "F16"}),
                                     progress=False)
    assert at_f16 != path
    assert not timing["fit"]["cached"]
    f16 = RecipeSettings(**{**settings.__dict__, "fit_type": "f16"})
    assert distill_plan(model, out, f16, progress=False)[1] == at_f16  # F16, spelt: the fit before fit_type existed
    plan, at_q4, timing = distill_plan(model, out, RecipeSettings(**{**settings.__dict__, "fit_type": "Q4_0"}),
                                       progress=False)
    assert at_q4 not in (path, at_f16)
    assert not timing["fit"]["cached"]
    assert plan.params["fit"]["model_type"] == "Q4_0"


def test_the_word_filter_joins_the_fit_unscaled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`word_filter`: a stage of its own (the filter's plan for the source, cached), merged after the student in every
    trial of the fit and in the fitted plan, where its banned rows stay at 0 while the student is scaled; the
    student's stages are shared with the run without it."""
    from pydetox.discover import wordfilter

    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    out = tmp_path / "out"
    settings = RecipeSettings(calibrator=TINY_CAL, distill=TINY_DISTILL, kl_budget=0.05, fit_tokens=256, fit_steps=3,
                              calibrators=tmp_path / "calibrators", max_strength=3.0)
    plain, path, _ = distill_plan(model, out, dataclasses.replace(settings, word_filter=False), progress=False)
    # the tiny vocabulary has no word of the bad-words list: the filter bans three tokens, in this process
    monkeypatch.setattr(wordfilter, "banned_tokens", lambda ctx, p: (np.array([7, 20, 33]), {}))
    filtered = dataclasses.replace(settings, word_filter=True, isolate=False)
    plan, with_filter, timing = distill_plan(model, out, filtered, progress=False)
    assert with_filter != path
    assert all(timing[s]["cached"] for s in ("f16", "calibrator", "teacher", "distill"))
    assert not timing["wordfilter"]["cached"]
    assert not timing["fit"]["cached"]
    off = dataclasses.replace(settings, word_filter=False)
    assert "wordfilter" not in distill_plan(model, out, off, progress=False)[2]  # off: no such stage
    assert plan.method.endswith("+wordfilter")
    *student, banned = plan.edits
    assert banned.kind == EditKind.SCALE_ROWS
    assert np.flatnonzero(banned.a == 0).tolist() == [7, 20, 33]
    assert np.all(banned.a[banned.a != 0] == 1)
    strength = plan.params["plan_strength"]
    assert 0 < strength <= 3.0
    raw = EditPlan.load(next((out / "stages").glob("distill-*.plan.gguf")))
    np.testing.assert_allclose(student[0].a, raw.scaled(strength).edits[0].a)
    assert plan.params["merged"][1]["method"] == "wordfilter"
    assert all(t["kl"] <= 0.05 for t in plan.params["fit"]["trials"] if t["strength"] == strength)
    # the filter's KL is counted: at its strength the student alone fits the budget with room the filter took
    assert plain.params["plan_strength"] >= strength
    _, again, timing = distill_plan(model, out, filtered, progress=False)
    assert again == with_filter
    assert timing["wordfilter"]["cached"]
    assert timing["fit"]["cached"]


def test_the_word_filter_by_default_only_where_the_output_layer_is_its_own(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """"auto" (the default) adds the filter to a model with an output layer of its own, not to one that uses its
    token embedding as output layer (the filter would add an output tensor there)."""
    from pydetox.discover import wordfilter

    settings = RecipeSettings(calibrator=TINY_CAL, distill=TINY_DISTILL, kl_budget=0.05, fit_tokens=256, fit_steps=3,
                              calibrators=tmp_path / "calibrators")
    assert settings.word_filter == "auto"
    tied = write_tiny_llama(tmp_path / "tied.gguf", **SHAPE, tied=True)
    plan, _, timing = distill_plan(tied, tmp_path / "tied", settings, progress=False)
    assert "wordfilter" not in timing
    assert not plan.method.endswith("+wordfilter")
    # the tiny vocabulary has no word of the bad-words list: the filter bans three tokens, in this process (the
    # torch stages are cached: only the filter and the fit run here)
    monkeypatch.setattr(wordfilter, "banned_tokens", lambda ctx, p: (np.array([7, 20, 33]), {}))
    here = dataclasses.replace(settings, isolate=False)
    plan, _, timing = distill_plan(tied, tmp_path / "tied", dataclasses.replace(here, word_filter=True), progress=False)
    assert plan.method.endswith("+wordfilter")  # asked for, it is added there too
    own = write_tiny_llama(tmp_path / "own.gguf", **SHAPE)
    distill_plan(own, tmp_path / "own", dataclasses.replace(settings, word_filter=False), progress=False)
    plan, _, timing = distill_plan(own, tmp_path / "own", here, progress=False)
    assert plan.method.endswith("+wordfilter")
    assert not timing["wordfilter"]["cached"]


def test_word_filter_reads_auto_1_and_0() -> None:
    assert RecipeSettings().word_filter == "auto"
    assert RecipeSettings(word_filter="1").word_filter is True
    assert with_overrides(RecipeSettings(), {"recipe": {"word_filter": "off"}}).word_filter is False
    assert with_overrides(RecipeSettings(), {"recipe": {"word_filter": "auto"}}).word_filter == "auto"
    with pytest.raises(PydetoxError, match="recipe:word_filter: expected auto, 1 or 0, found 'maybe'"):
        with_overrides(RecipeSettings(), {"recipe": {"word_filter": "maybe"}})
    # every yes-or-no setting: a word that is neither is refused, not read as no
    from pydetox.discover.base import override

    assert override(RecipeSettings(), {"isolate": "off"}, "recipe").isolate is False
    with pytest.raises(PydetoxError, match=r"recipe.isolate: cannot read 'maybe' as bool \(1 or 0\)"):
        override(RecipeSettings(), {"isolate": "maybe"}, "recipe")


def test_detox_fits_the_kl_budget_at_its_least_precise_type() -> None:
    """The budget holds at every type a run ships: the fit measures KL at the least precise of --types, unless
    `recipe:fit_type` names a type."""
    from pydetox.detox import DetoxJob, _recipe_settings

    job = DetoxJob(model=Path("m.gguf"), methods=("distill",), types=("F16", "Q4_K_M", "Q8_0"))
    assert _recipe_settings(job).fit_type == "Q4_K_M"
    assert _recipe_settings(dataclasses.replace(job, types=("F16",))).fit_type == "F16"
    assert _recipe_settings(dataclasses.replace(job, types=("q8_0", "Q2_K", "F16"))).fit_type == "Q2_K"
    at_f16 = dataclasses.replace(job, overrides={"recipe": {"fit_type": "F16"}})
    assert _recipe_settings(at_f16).fit_type == "F16"
    with pytest.raises(PydetoxError, match="unknown model type 'Q9_K'; expected one of: F32, F16"):
        _recipe_settings(dataclasses.replace(job, overrides={"recipe": {"fit_type": "Q9_K"}}))


def test_detox_refuses_an_unknown_recipe_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pydetox.cli import main

    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    assert main(["detox", "--model", str(model), "--out", str(tmp_path / "o"), "--param", "recipe:strength=2"]) == 2
    assert ("recipe has no parameter 'strength'; it has: fit_steps, fit_text, fit_tokens, fit_type, kl_budget, max_strength, "
            "word_filter"
            in capsys.readouterr().err)


def test_architecture_defaults_sit_under_what_a_run_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ARCH_DISTILL's settings for the source's architecture join the student's, and a setting the run gives itself
    (a --param) wins over them; another architecture's are left out."""
    from pydetox import recipe

    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    assert recipe.ARCH_DISTILL["qwen2"] == {"lr": "0.0004"}
    assert recipe.ARCH_DISTILL["gemma3"] == {"lr": "0.00025"}
    assert not any(set(entry) & set(recipe.DEFAULT_DISTILL) for entry in recipe.ARCH_DISTILL.values())
    assert recipe.arch_distill(model, {"steps": "8"}) == {"steps": "8"}  # llama: none of qwen2's
    monkeypatch.setitem(recipe.ARCH_DISTILL, "llama", {"lr": "0.0004", "rank": "8"})
    assert recipe.arch_distill(model, {"steps": "8"}) == {"lr": "0.0004", "rank": "8", "steps": "8"}
    assert recipe.arch_distill(model, {"lr": "0.01"}) == {"lr": "0.01", "rank": "8"}
