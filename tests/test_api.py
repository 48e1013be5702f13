"""The Python API of `pydetox/__init__.py`, as the README shows it, on a tiny model built here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tiny import write_tiny_llama

SHAPE = {"d": 64, "ff": 128, "heads": 2, "kv_heads": 1}


def test_import_is_light() -> None:
    code = "import sys, pydetox; print(sorted(m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_readme_example_on_a_tiny_model(tmp_path: Path) -> None:
    import pydetox

    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    assert pydetox.resolve_model(str(model)) == model
    plan = pydetox.discover_plan("aura", model, n_pairs=24, progress=False)
    assert isinstance(plan, pydetox.EditPlan) and plan.edits
    saved = plan.scaled(0.8).save(tmp_path / "aura.plan.gguf")
    assert pydetox.EditPlan.load(saved).params["plan_strength"] == 0.8
    report = pydetox.apply_plan(plan, model, tmp_path / "out.gguf", pydetox.ApplyOptions(
        ftype=pydetox.parse_ftype("Q8_0"), progress=False))
    assert isinstance(report, pydetox.ApplyReport) and (tmp_path / "out.gguf").exists()
    pydetox.export_lora(plan, model, tmp_path / "aura.lora.gguf")
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat\na dog is\n")
    result = pydetox.eval_report([tmp_path / "out.gguf"], reference=model, prompts=str(prompts), max_tokens=4,
                              ppl_tokens=64, window=32, evaluators=("profanity-check",), benign_prompts=0,
                              chat_check=False)
    (m,) = result["models"]
    assert m["kl"] > 0 and set(m["toxicity"]) == {"profanity-check"} and result["settings"]["n_prompts"] == 2
    assert set(pydetox.__all__) >= {"fetch", "discover_plan", "EditPlan", "apply_plan", "eval_report", "export_lora",
                                    "distill_plan", "train_calibrator"}
    import pydetox.compare
    import pydetox.discover
    import pydetox.evaluate  # noqa: F401  (submodules loaded: the API names must still be the functions)

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
