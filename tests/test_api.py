"""The Python API of `pydetox/__init__.py`, as the README shows it, on a tiny model built here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tiny import write_tiny_llama

from pydetox.errors import PydetoxError

SHAPE = {"d": 64, "ff": 128, "heads": 2, "kv_heads": 1}


def test_import_is_light() -> None:
    code = "import sys, pydetox; print(sorted(m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_readme_example_on_a_tiny_model(tmp_path: Path) -> None:
    import pydetox

    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    assert pydetox.resolve_model(str(model)) == model
    plan = pydetox.discover_plan("aura", model, n_pairs=24, progress=False)
    assert isinstance(plan, pydetox.EditPlan)
    assert plan.edits
    saved = plan.scaled(0.8).save(tmp_path / "aura.plan.gguf")
    assert pydetox.EditPlan.load(saved).params["plan_strength"] == 0.8
    report = pydetox.apply_plan(plan, model, tmp_path / "out.gguf", pydetox.ApplyOptions(
        ftype=pydetox.parse_ftype("Q8_0"), progress=False))
    assert isinstance(report, pydetox.ApplyReport)
    assert (tmp_path / "out.gguf").exists()
    pydetox.export_lora(plan, model, tmp_path / "aura.lora.gguf")
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat\na dog is\n")
    result = pydetox.eval_report([tmp_path / "out.gguf"], reference=model, prompts=str(prompts), max_tokens=4,
                              ppl_tokens=64, window=32, evaluators=("profanity-check",), benign_prompts=0,
                              chat_check=False)
    (m,) = result["models"]
    assert m["kl"] > 0
    assert set(m["toxicity"]) == {"profanity-check"}
    assert result["settings"]["n_prompts"] == 2
    assert set(pydetox.__all__) >= {"fetch", "discover_plan", "EditPlan", "apply_plan", "eval_report", "export_lora",
                                    "distill_plan", "train_calibrator"}
    import pydetox.compare
    import pydetox.discover
    import pydetox.evaluate

    for name in pydetox.__all__:
        assert not isinstance(getattr(pydetox, name), type(pydetox)), name


def test_no_import_cycles_between_modules() -> None:
    """Every import between pydetox's modules, the lazy ones inside functions included, forms no cycle (the package
    facade `pydetox/__init__.py`, whose names load their modules on first use, excepted)."""
    import ast
    import graphlib
    from pathlib import Path

    import pydetox

    root = Path(pydetox.__file__).parent
    modules = {".".join(("pydetox", *f.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): f
               for f in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        if name == "pydetox":
            continue
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pydetox"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("pydetox.")}
        graph[name] = {d for d in deps if d in modules and d != "pydetox"}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle


BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'accelerate', 'optuna', 'ray'):
            raise ImportError(f'{name} blocked for this test')
sys.meta_path.insert(0, Block())
from pydetox.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_the_optional_extras_apply_and_eval_work_and_discovery_names_its_extra(tmp_path: Path) -> None:
    """`pip install pydetox` without [discover] / [sweep]: torch, transformers, Optuna and Ray made unimportable."""
    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    (tmp_path / "p.txt").write_text("the cat is\na dog was\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", BLOCK, *args], capture_output=True, text=True, cwd=tmp_path,
                              timeout=300)

    plan = run("plan", "random", "--model", str(model), "--tensors", "*ffn_down*", "--kind", "low_rank", "--rank", "2",
               "-o", "p.plan.gguf")
    assert plan.returncode == 0, plan.stderr
    applied = run("apply", "p.plan.gguf", str(model), "-o", "out.gguf", "--quiet")
    assert applied.returncode == 0, applied.stderr
    evaluated = run("eval", "out.gguf", "--prompts", "p.txt", "--evaluators", "profanity-check", "--ppl-tokens", "64",
                    "--max-tokens", "4", "--quiet")
    assert evaluated.returncode == 0, evaluated.stderr
    found = run("discover", "--method", "profs", "--model", str(model), "-o", "d.plan.gguf", "--quiet")
    assert found.returncode == 2
    assert 'discovery needs torch, which is not installed: pip install "pydetox[discover]"' in found.stderr
    (tmp_path / "s.toml").write_text('model = "m.gguf"\nmethod = "profs"\n[search]\nk = [1, 2]\n')
    swept = run("sweep", "s.toml", "--quiet")
    assert swept.returncode == 2
    assert 'pip install "pydetox[sweep]"' in swept.stderr


def test_training_data_never_holds_what_is_measured() -> None:
    """pydetox.splits: no discovery prompt is (or contains, or is in) an evaluation prompt; training wiki text starts
    after the held-out paragraphs that `eval --clean-text wiki` and `plan fit` measure on."""
    from pydetox.prompts import load_clean_text
    from pydetox.splits import WIKI_HELD_OUT, discovery_prompts, evaluation_prompts, training_wiki

    ev = [e.strip().lower() for e in evaluation_prompts()]
    found = discovery_prompts("rtp-perspective")
    assert 0 < len(found) < 993
    assert not any(q.strip().lower() in e or e in q.strip().lower() for q in found for e in ev)
    wiki = load_clean_text("wiki")
    assert training_wiki(5) == wiki[WIKI_HELD_OUT : WIKI_HELD_OUT + 5]
    assert not set(training_wiki()) & set(wiki[:WIKI_HELD_OUT])


def test_the_recipes_kl_budget_never_reads_the_news_the_report_measures() -> None:
    """`news` (perplexity, KL, benign starts) and `news-held-out` (the recipe's KL budget) split one corpus in two:
    disjoint, each half of it, and the recipe measures its budget on the held-out half unless told otherwise."""
    from pydetox.helpfulness import benign_starts
    from pydetox.prompts import load_clean_text
    from pydetox.recipe import RecipeSettings

    news, held = load_clean_text("news"), load_clean_text("news-held-out")
    assert len(news) == len(held) == 150
    assert not set(news) & set(held)
    assert all(any(doc.startswith(start) for doc in news) for start in benign_starts(100))
    assert RecipeSettings().fit_text == "news-held-out"
    with pytest.raises(PydetoxError, match="found news: the report measures perplexity and KL there"):
        RecipeSettings(fit_text="news")
    with pytest.raises(PydetoxError, match="expected news-held-out, wiki or a text file, found 'nws'"):
        RecipeSettings(fit_text="nws")
