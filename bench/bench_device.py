"""The default recipe's torch stages on the GPU against the same stages on the CPU, in the same run (`--device cuda`
against `--device cpu`). Skipped where torch sees no GPU; CI's machines have none.

The model is a random llama with SmolLM2-135M-Instruct's shapes (30 layers, d 576, FFN 1536, 9 query and 3 key/value
heads, 49,152 tokens; F16): a stage's cost follows the shapes, not the values, and the real weights (270 MB) do not
travel to the machines a GPU is lent on here. It is converted for transformers once before either run (a one-time cost
of any model, and on this random vocabulary a slow one: transformers builds its BPE merges, ~105 s). The settings are
the recipe's defaults with the work cut to fit a short lease: the calibrator 100 steps of 400 (align 25, 50,000 clean
tokens), the student 40 steps of 150 on 100 prompts, pairs, clean texts and benign starts, no chat starts (a random
model has no chat template) and no `eog_free` (on the padded random vocabulary it finds no special token that
llama.cpp ends a generation at). Each device runs the calibrator, the teacher and the student from nothing in its own
folder, in this process, the CPU on every core the machine has; the teacher's generation runs in llama.cpp on the CPU
in both runs.

Printed and kept in the benchmark's extra_info: each stage's seconds on both devices and the ratio; the calibrator's
validation loss on each; the relative difference of the two students' updates (bfloat16 autocast on both, each from
its own calibrator and teacher: numerical agreement in float32 is tests/test_device.py's to assert).

Run: pytest bench/bench_device.py -s --benchmark-json=device.json"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("torch sees no GPU here", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny import write_tiny_llama  # noqa: E402

from pydetox.discover.model import FullPrecisionModel  # noqa: E402
from pydetox.plan import EditPlan  # noqa: E402
from pydetox.recipe import DEFAULT_CALIBRATOR, DEFAULT_DISTILL, RecipeSettings  # noqa: E402

SMOLLM2 = {"d": 576, "ff": 1536, "layers": 30, "heads": 9, "kv_heads": 3, "vocab_size": 49152}
CALIBRATOR = replace(DEFAULT_CALIBRATOR, steps=100, align_steps=25, clean_tokens=50_000)
STUDENT = {**DEFAULT_DISTILL, "steps": "40", "max_prompts": "100", "pairs": "100", "clean_texts": "100",
           "benign_starts": "100", "chat_starts": "0", "eog_free": "0"}


def _run(f16: Path, folder: Path, device: str) -> dict[str, Any]:
    """The recipe's calibrator, teacher and student stages (their own functions, in this process) on `device`."""
    from pydetox import recipe

    folder.mkdir(parents=True)
    settings = RecipeSettings(calibrator=CALIBRATOR, distill=STUDENT, device=device, isolate=False)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    cal = recipe._train_calibrator(f16, folder / "cal.gguf", CALIBRATOR, True, device)
    seconds["calibrator"] = time.perf_counter() - t0
    overrides, _, _ = recipe._student_overrides(recipe.Stages(folder, progress=False), f16, folder / "cal.gguf",
                                                "bench", settings)
    t0 = time.perf_counter()
    recipe._teacher_targets(f16, overrides, True, device)
    seconds["teacher"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    recipe._student_plan(f16, overrides, folder / "student.plan.gguf", True, device)
    seconds["student"] = time.perf_counter() - t0
    return {"seconds": seconds, "val_loss": cal["val_loss"], "plan": folder / "student.plan.gguf"}


def _updates(plan: Path) -> dict[str, np.ndarray]:
    return {e.tensor: e.a.T @ e.b for e in EditPlan.load(plan).edits}


def test_recipe_stages_cuda_against_cpu(tmp_path: Path, benchmark: Any) -> None:
    f16 = write_tiny_llama(tmp_path / "smol-shaped.F16.gguf", qtype=gguf.GGMLQuantizationType.F16, **SMOLLM2)
    t0 = time.perf_counter()
    FullPrecisionModel(f16, progress=False)  # converted once for transformers; every stage after reads that
    convert_s = time.perf_counter() - t0
    cpu = _run(f16, tmp_path / "cpu", "cpu")
    cuda = benchmark.pedantic(lambda: _run(f16, tmp_path / "cuda", "cuda"), rounds=1, iterations=1, warmup_rounds=0)
    a, b = _updates(cpu["plan"]), _updates(cuda["plan"])
    rel = {t: float(np.linalg.norm(a[t] - b[t]) / np.linalg.norm(a[t])) for t in a}
    rows = {s: {"cpu_s": cpu["seconds"][s], "cuda_s": cuda["seconds"][s],
                "ratio": cpu["seconds"][s] / max(cuda["seconds"][s], 1e-9)} for s in cpu["seconds"]}
    info = {"gpu": torch.cuda.get_device_name(0), "cpu_threads": torch.get_num_threads(), "stages": rows,
            "convert_s": convert_s,
            "calibrator_val_loss": {"cpu": cpu["val_loss"], "cuda": cuda["val_loss"]},
            "student_update_rel_diff": {"median": float(np.median(list(rel.values()))), "max": max(rel.values())}}
    benchmark.extra_info.update(info)
    print(f"\n{info['gpu']} against {info['cpu_threads']} CPU threads")
    print(f"{'stage':<12}{'cpu s':>9}{'cuda s':>9}{'ratio':>8}")
    for s, r in rows.items():
        print(f"{s:<12}{r['cpu_s']:>9.1f}{r['cuda_s']:>9.1f}{r['ratio']:>8.2f}")
    print(json.dumps({k: v for k, v in info.items() if k != "stages"}, indent=1))
    assert set(a) == set(b)
    # the same calibrator within bfloat16's noise: validation loss (nats/token) within 2%
    assert abs(cpu["val_loss"] - cuda["val_loss"]) <= 0.02 * cpu["val_loss"]
