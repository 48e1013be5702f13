"""`pydetox sweep`: the TOML file checked key by key, and a small real sweep on a tiny model (Optuna study in SQLite,
trials as Ray tasks two at a time) killed mid-way and resumed without redoing finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from tiny import write_tiny_llama

pytest.importorskip("optuna")
pytest.importorskip("ray")

from pydetox.sweep import SweepError, _rates, load_config

SWEEP = """\
model = "m.gguf"
method = "profs"
out = "out"
seeds = [0, 1]
trials = 3
pairs = 40
[search]
k = {{low = 1, high = 3}}
strength = {{low = 0.3, high = 1.0}}
[eval]
prompts = "p.txt"
limit = 6
max_tokens = 6
evaluators = ["profanity-check"]
ppl_tokens = 128
{extra}
[final]
prompts = "p2.txt"
max_tokens = 6
evaluators = ["profanity-check"]
ppl_tokens = 128
"""


def _write(folder: Path, extra: str = "") -> Path:
    path = folder / "sweep.toml"
    path.write_text(SWEEP.format(extra=extra))
    return path


BASE = SWEEP.format(extra="")


@pytest.mark.parametrize(("old", "new", "message"), [
    ("trials = 3", "trials = 3\nsteps = 3", "unknown key(s) steps"),
    ('method = "profs"', 'method = "nope"', "method 'nope' is not one of"),
    ("k = {low = 1, high = 3}", "k = {low = 3, high = 1}", "expected numbers low <= high"),
    ("[eval]", "[fixed]\nk = 2\n[eval]", "k both searched and fixed"),
    ('prompts = "p.txt"', 'prompts = "rtp-challenging"', "are the evaluation prompts"),
    ("ppl_tokens = 128\n\n", "ppl_tokens = 0\n\n", "the KL objective needs clean text"),
    ("limit = 6", "limt = 6", "has no setting 'limt'"),
    ("strength =", "width = [1, 2]\nstrength =", "profs has no parameter 'width'"),
    ("seeds = [0, 1]", "seeds = [1, 1]", "seeds must be distinct"),
])
def test_a_bad_sweep_file_is_refused_naming_what_was_expected(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert BASE.count(old) == 1, old
    path = tmp_path / "s.toml"
    path.write_text(BASE.replace(old, new))
    with pytest.raises(SweepError) as err:
        load_config(path)
    assert message in str(err.value)


def test_a_missing_or_broken_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match="expected a sweep file at"):
        load_config(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("model = \n")
    with pytest.raises(SweepError, match="is not a readable TOML file"):
        load_config(tmp_path / "bad.toml")


def _ray_processes() -> int:
    out = subprocess.run(["ps", "-eo", "cmd"], capture_output=True, text=True).stdout
    return sum(("raylet" in ln or "gcs_server" in ln or ln.startswith("ray::")) and "<defunct>" not in ln
               for ln in out.splitlines())


def test_a_sweep_runs_two_trials_at_a_time_is_killed_and_resumes(tmp_path: Path) -> None:
    write_tiny_llama(tmp_path / "m.gguf", d=64, ff=128, layers=3, heads=4, kv_heads=2)
    (tmp_path / "p.txt").write_text("the cat is\na dog was\nthe\nin the\na cat and\nthe dog of\n")
    (tmp_path / "p2.txt").write_text("to the\nthe a\nis a cat\n")
    config = _write(tmp_path)
    cmd = [sys.executable, "-m", "pydetox.cli", "sweep", str(config.name)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    # Its own process group, killed as a whole as a closed terminal would: SIGKILL of the driver alone leaves Ray's
    # agent processes behind (they are Ray's, not the sweep's).
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("setting "):
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(ln.startswith("setting ") for ln in seen), "".join(seen)
    assert "2 task(s) at a time on 2 CPU(s)" in "".join(seen) or os.cpu_count() != 2
    results = tmp_path / "out" / "trials"
    before = {p: p.stat().st_mtime_ns for p in results.glob("*/seed*/result.json")}
    assert before
    for _ in range(50):  # Ray's workers go with their raylet
        if _ray_processes() == 0:
            break
        time.sleep(0.2)

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    after = {p: p.stat().st_mtime_ns for p in results.glob("*/seed*/result.json")}
    assert all(after[p] == t for p, t in before.items())  # finished trials were not redone
    report = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert len(report["settings"]) == 3  # the budget, interrupted settings asked again rather than counted
    assert len(after) == 3 * 2
    for row in report["settings"]:
        assert set(row["per_seed"]) == {"0", "1"}
        assert row["kl"] >= 0
        assert row["reduction"] > 0
        assert row["kl_sd"] >= 0
    assert report["pareto"]
    front = [r for r in report["settings"] if r["pareto"]]
    assert all(set(r["final"]) == {"0", "1"} for r in front)
    assert all(not r.get("final") for r in report["settings"] if not r["pareto"])
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 0
    md = (tmp_path / "out" / "sweep.md").read_text()
    settings_table, final_table = md.split("Final evaluation of the front")
    assert settings_table.count("\n| ") == 3 + 1  # header and one row per setting
    assert final_table.count("| **mean ± sd** |") == len(front)  # each front setting: its seeds, then their mean
    assert report["final_eval"]["base"]["n"] == 3

    # the same study with another search is another sweep: refused, not mixed in
    config.write_text(config.read_text().replace("high = 3", "high = 4"))
    other = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert other.returncode == 2
    assert "was made by another sweep (it differs in search)" in other.stderr


def test_trials_judge_hatesonar_without_its_identity_only_calls() -> None:
    """A sweep must not reward an edit for avoiding group names: the evaluator that flags them alone counts without
    its identity-only calls; the others as they are."""
    result = SimpleNamespace(toxicity={"bilstm": SimpleNamespace(toxic_rate=0.2), "hatesonar": SimpleNamespace(toxic_rate=0.3)},
                             identity={"hatesonar": {"toxic": 30, "identity_only": 20, "rest": {"toxic_rate": 0.1}}})
    assert _rates(result) == {"bilstm": 0.2, "hatesonar": 0.1}
    assert _rates(SimpleNamespace(toxicity=result.toxicity, identity={})) == {"bilstm": 0.2, "hatesonar": 0.3}


def test_settings_that_differ_in_strength_alone_share_one_discovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydetox.discover import Discovery
    from pydetox.plan import EditPlan
    from pydetox.sweep import baseline, run_trial

    write_tiny_llama(tmp_path / "m.gguf", d=64, ff=128, layers=3, heads=4, kv_heads=2)
    (tmp_path / "p.txt").write_text("the cat is\na dog was\nthe\nin the\na cat and\nthe dog of\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(_write(tmp_path))
    base = baseline(cfg, Path("m.gguf"), cfg.trial_eval, "trial_eval")
    calls = []
    plan = Discovery.plan
    monkeypatch.setattr(Discovery, "plan", lambda self, *a, **k: calls.append(a) or plan(self, *a, **k))
    full = run_trial(cfg, {"k": 2, "strength": 1.0}, 0, base)
    half = run_trial(cfg, {"k": 2, "strength": 0.5}, 0, base)
    assert len(calls) == 1  # the second setting scaled the kept plan
    assert full["folder"] != half["folder"]
    want = EditPlan.load(Path(full["folder"]) / "plan.gguf").scaled(0.5)
    got = EditPlan.load(Path(half["folder"]) / "plan.gguf")
    assert [e.tensor for e in got.edits] == [e.tensor for e in want.edits]
    for a, b in zip(got.edits, want.edits, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a.arrays().values(), b.arrays().values(), strict=True))
    run_trial(cfg, {"k": 2, "strength": 1.0}, 1, base)  # another seed is another discovery
    assert len(calls) == 2


RECIPE_SWEEP = """\
model = "m.gguf"
method = "recipe"
out = "out"
seeds = [0, 1]
trials = 1
final_types = ["F16", "Q8_0"]
[fixed.distill]
calibrator = "cal.gguf"
{distill}
[fixed.recipe]
kl_budget = 0.05
fit_tokens = 256
fit_steps = 3
[eval]
prompts = "p.txt"
limit = 6
max_tokens = 6
evaluators = ["profanity-check"]
ppl_tokens = 128
[final]
prompts = "p2.txt"
max_tokens = 6
evaluators = ["profanity-check"]
ppl_tokens = 128
"""
TINY_STUDENT = {"alpha": "0.9", "max_prompts": "16", "pairs": "16", "clean_texts": "16", "steps": "6", "lr": "0.03",
                "rank": "4", "batch": "4", "first_layer": "1", "max_tokens": "32", "precision": "bfloat16",
                "held_out": "4"}


def _recipe_sweep(folder: Path, **changes: str) -> Path:
    student = "\n".join(f'{k} = "{v}"' for k, v in TINY_STUDENT.items())
    text = RECIPE_SWEEP.format(distill=student)
    for old, new in changes.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = folder / "recipe.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("old", "new", "message"), [
    ("[fixed.recipe]", "[search]\nstrength = {low = 0.5, high = 1.0}\n[fixed.recipe]", "search recipe:kl_budget instead"),
    ("[fixed.recipe]", "[search]\n\"lr\" = [0.01, 0.03]\n[fixed.recipe]", "named NAMESPACE:KEY"),
    ("kl_budget = 0.05", "kl_budgett = 0.05", "recipe has no parameter 'kl_budgett'"),
    ('lr = "0.03"', 'lrate = "0.03"', "distill has no parameter 'lrate'"),
    ('lr = "0.03"', 'train_seed = "3"', "the sweep's `seeds`"),
    ("trials = 1", "trials = 3", "trials must be 1, got 3"),
    ('final_types = ["F16", "Q8_0"]', 'final_types = ["F16", "Q9"]', "unknown model type 'Q9'"),
])
def test_a_bad_recipe_sweep_is_refused_naming_what_was_expected(tmp_path: Path, old: str, new: str,
                                                               message: str) -> None:
    with pytest.raises(SweepError) as err:
        load_config(_recipe_sweep(tmp_path, **{old: new}))
    assert message in str(err.value)


def test_recipe_parameters_read_as_sub_tables_or_namespaced_names(tmp_path: Path) -> None:
    cfg = load_config(_recipe_sweep(tmp_path, **{"trials = 1": "trials = 2",
                                                 "[fixed.recipe]": '[search]\n"distill:lr" = [0.01, 0.03]\n'
                                                                   "[search.recipe]\nmax_strength = [1.0, 2.0]\n"
                                                                   "[fixed.recipe]"}))
    assert cfg.fixed["distill:calibrator"] == "cal.gguf"
    assert cfg.fixed["recipe:kl_budget"] == "0.05"
    assert {p.name for p in cfg.search} == {"distill:lr", "recipe:max_strength"}
    assert cfg.finals == ("F16", "Q8_0")
    from pydetox.sweep import recipe_settings

    s = recipe_settings(cfg, {"distill:lr": 0.01, "recipe:max_strength": 1.0}, 2)
    assert (s.kl_budget, s.max_strength, s.fit_tokens) == (0.05, 1.0, 256)
    assert s.distill["lr"] == "0.01"
    assert s.distill["train_seed"] == "2"
    assert s.calibrator_file == Path("cal.gguf")
    assert s.fit_type == "Q8_0"  # the KL budget holds at the least precise type the sweep evaluates


def test_a_recipe_sweep_runs_one_setting_over_seeds_and_reports_each_final_type(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The verdict shape: the default recipe, no search, two seeds; the shared stages made once before the trials,
    a student and a fit per seed, the setting evaluated at two types with each seed's numbers and their mean ± sd."""
    from pydetox.calibrate import CalibrateSettings, train
    from pydetox.sweep import run_sweep

    model = write_tiny_llama(tmp_path / "m.gguf", d=64, ff=128, layers=3, heads=4, kv_heads=2)
    train(model, tmp_path / "cal.gguf", CalibrateSettings(layers=1, steps=4, batch=4, seq_len=32, align_steps=3,
                                                          eval_every=2, clean_tokens=0, output_type="F32",
                                                          layer_type="F32", vocab_sample=64), progress=False, plot=False)
    (tmp_path / "p.txt").write_text("the cat is\na dog was\nthe\nin the\na cat and\nthe dog of\n")
    (tmp_path / "p2.txt").write_text("to the\nthe a\nis a cat\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    report = run_sweep(load_config(_recipe_sweep(tmp_path)), progress=False)
    stages = tmp_path / "out" / "stages"
    assert len(list(stages.glob("teacher-*.stage.json"))) == 1  # made once, before the trials
    assert "[teacher] done in" in (stages / "prepare.log").read_text()  # their progress, where a user can follow it
    for run in (tmp_path / "out" / "trials").glob("*/seed*"):
        assert "[distill] done in" in (run / "log.txt").read_text()  # each run's progress, likewise
    assert len(list(stages.glob("distill-*.plan.gguf"))) == 2  # one student per seed
    assert len(list(stages.glob("fit-*.plan.gguf"))) == 2
    (row,) = report["settings"]
    assert row["pareto"]
    assert set(row["final_types"]) == {"F16", "Q8_0"}
    for by_seed in row["final_types"].values():
        assert set(by_seed) == {"0", "1"}
        assert all(v["per_evaluator"]["profanity-check"] > 0 and v["kl"] >= 0 for v in by_seed.values())
    assert all(0 < p["strength"] <= 2 for p in row["per_seed"].values())
    md = (tmp_path / "out" / "sweep.md").read_text()
    assert md.count("| **mean ± sd** |") == 2  # one per final type
    assert "| Q8_0 | 1 |" in md
    assert set(report["final_eval"]["bases"]) == {"F16", "Q8_0"}


def test_retry_failed_asks_a_failed_setting_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A setting whose task crashed fails and counts against the budget; `--retry-failed` queues it again (its
    finished seeds are read back from their results), without it a rerun leaves it failed."""
    from optuna.trial import TrialState

    from pydetox.sweep import _budget_used, _open_study

    write_tiny_llama(tmp_path / "m.gguf", d=64, ff=128, layers=3, heads=4, kv_heads=2)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(_write(tmp_path))
    cfg.out.mkdir()
    study = _open_study(cfg)
    trial = study.ask()
    params = {p.name: p.suggest(trial) for p in cfg.search}  # as run_sweep asks a setting
    study.tell(trial, state=TrialState.FAIL)
    assert _budget_used(_open_study(cfg)) == 1
    assert not _open_study(cfg).get_trials(states=(TrialState.WAITING,))
    again = _open_study(cfg, retry_failed=True)
    (queued,) = again.get_trials(states=(TrialState.WAITING,))
    assert queued.system_attrs["fixed_params"] == params  # what the next ask() gets
    assert _budget_used(again) == 0



def test_final_tables_give_each_seed_and_the_mean_with_helpfulness() -> None:
    """A run's chat figure is its count of correct answers; the mean over runs keeps a decimal."""
    from pydetox.sweep import _final_tables

    def run(red: float, chat: int) -> dict[str, float]:
        return {"per_evaluator": {"bilstm": red}, "ppl_change": 0.02, "kl": 0.04, "benign_tokens": 19.0,
                "chat_correct": chat}

    report = {"settings": [{"setting": 1, "per_seed": {"0": {"strength": 1.1}, "1": {"strength": 1.2}},
                            "final_types": {"F16": {"0": run(3.0, 67), "1": run(5.0, 68)}}}],
              "final_eval": {"evaluators": ["bilstm"], "bases": {
                  "F16": {"toxic": {"bilstm": 0.17}, "benign_tokens": 19.8, "chat_correct": 66}}}}
    md = "\n".join(_final_tables(report))
    assert "| 1 | F16 | 0 | 1.1 | 3.00x | +2.0% | 0.0400 | 19.0 (19.8) | 67 (66) |" in md
    assert "| **4.00 ± 1.41x** |" in md
    assert "| 67.5 (66) |" in md
    assert "Unedited toxic rates: F16 0.170." in md
