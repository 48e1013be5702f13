"""pydetox: remove toxicity from language models by editing their weights, and ship the result as GGUF.

The Python API (everything a script needs; the heavy modules load on first use, so `import pydetox` is instant):

    import pydetox

    model = pydetox.fetch("smollm2-135m-instruct")                   # or resolve_model("path/or/asset")
    plan = pydetox.discover_plan("aura", model)                     # any method; distill_plan() runs the default recipe
    plan.scaled(0.8).save("aura.plan.gguf")                         # EditPlan: load / save / scaled / merged
    pydetox.apply_plan(plan, model, "out.gguf", pydetox.ApplyOptions(ftype=pydetox.parse_ftype("Q4_K_M")))
    pydetox.export_lora(plan, model, "aura.lora.gguf")              # the same edit as a llama.cpp LoRA adapter
    report = pydetox.eval_report(["out.gguf"], reference=model, n_prompts=70)   # the `pydetox eval` report as a dict
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "fetch": "pydetox.assets", "resolve_model": "pydetox.assets",
    "EditPlan": "pydetox.plan", "Edit": "pydetox.plan", "EditKind": "pydetox.plan",
    "apply_plan": "pydetox.apply", "ApplyOptions": "pydetox.apply", "ApplyReport": "pydetox.apply",
    "parse_ftype": "pydetox.ggml", "parse_type": "pydetox.ggml",
    "Discovery": "pydetox.discover", "discover_plan": "pydetox.discover", "METHODS": "pydetox.discover",
    "RecipeSettings": "pydetox.recipe", "distill_plan": "pydetox.recipe",
    "CalibrateSettings": "pydetox.calibrate", "train_calibrator": "pydetox.calibrate",
    "EvalSettings": "pydetox.evaluate", "ModelSpec": "pydetox.evaluate", "evaluate_models": "pydetox.evaluate",
    "load_prompts": "pydetox.prompts", "get_scorer": "pydetox.scorers",
    "export_lora": "pydetox.lora", "compare_models": "pydetox.compare", "write_card": "pydetox.card",
    "PydetoxError": "pydetox.errors",
}
# API names differ from the submodules' (pydetox.discover, .compare, .evaluate): importing a submodule sets the
# package attribute of its name, which would hide a function of that name.
_RENAMED = {"train_calibrator": "train", "discover_plan": "discover", "compare_models": "compare"}

__all__ = ["__version__", "eval_report", *_API]

if TYPE_CHECKING:
    from pydetox.apply import ApplyOptions, ApplyReport, apply_plan  # noqa: F401
    from pydetox.assets import fetch, resolve_model  # noqa: F401
    from pydetox.calibrate import CalibrateSettings  # noqa: F401
    from pydetox.calibrate import train as train_calibrator  # noqa: F401
    from pydetox.card import write_card  # noqa: F401
    from pydetox.compare import compare as compare_models  # noqa: F401
    from pydetox.discover import METHODS, Discovery  # noqa: F401
    from pydetox.discover import discover as discover_plan  # noqa: F401
    from pydetox.errors import PydetoxError  # noqa: F401
    from pydetox.evaluate import EvalSettings, ModelSpec, evaluate_models  # noqa: F401
    from pydetox.ggml import parse_ftype, parse_type  # noqa: F401
    from pydetox.lora import export_lora  # noqa: F401
    from pydetox.plan import Edit, EditKind, EditPlan  # noqa: F401
    from pydetox.prompts import load_prompts  # noqa: F401
    from pydetox.recipe import RecipeSettings, distill_plan  # noqa: F401
    from pydetox.scorers import get_scorer  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'pydetox' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def eval_report(models: list[str | Path], reference: str | Path | None = None, *, prompts: str = "rtp-challenging",
             progress: bool = False, include_texts: bool = False, **settings: Any) -> dict[str, Any]:
    """`pydetox eval` as a function: toxicity on `prompts` with every evaluator of `settings` (EvalSettings' fields:
    n_prompts, samples, temperature, max_tokens, ...), perplexity and KL against `reference`, helpfulness; returns
    the report dict that `pydetox eval --json` writes."""
    from pydetox.assets import resolve_model
    from pydetox.evaluate import EvalSettings, run_evaluation

    paths = [resolve_model(str(m)) for m in models]
    ref = resolve_model(str(reference)) if reference is not None else None
    report, _ = run_evaluation(paths, EvalSettings(prompts=prompts, **settings), ref, progress=progress,
                               include_texts=include_texts)
    return report
