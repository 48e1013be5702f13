"""The run-time cost of a LoRA adapter (pydetox export-lora) against the same edit merged into the weights, on
SmolLM2-135M-Instruct at Q4_K_M: batched greedy generation (16 sequences x 20 tokens, 64 RTP prompts) and one
scoring window of 512 tokens. The adapter is a rank-32 update of the 20 upper ffn_down tensors, the shape of the
default recipe's edit. Run: pytest bench/bench_lora.py -s"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from pydetox.apply import ApplyOptions, apply_plan
from pydetox.assets import fetch
from pydetox.evaluate import EvalSettings, generate
from pydetox.gguf_io import ModelFile
from pydetox.lora import export_lora
from pydetox.plan import Edit, EditKind, EditPlan, random_plan
from pydetox.prompts import load_prompts
from pydetox.runtime import LlamaRuntime


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("lora")
    src = fetch("smollm2-135m-instruct", quiet=True)
    with ModelFile(src) as m:
        shapes = [(n, t.shape) for n, t in m.tensors.items() if n.endswith("ffn_down.weight")][10:]
    plan = random_plan(m.arch, shapes, EditKind.LOW_RANK, rank=32, seed=0)
    plan = EditPlan(plan.arch, [Edit(e.tensor, e.kind, e.shape, e.a * np.float32(5), e.b) for e in plan.edits], "bench")
    base = d / "base.Q4_K_M.gguf"
    apply_plan(None, src, base, ApplyOptions(ftype=gguf.LlamaFileType.MOSTLY_Q4_K_M, progress=False))
    merged = d / "merged.Q4_K_M.gguf"
    apply_plan(plan, src, merged, ApplyOptions(ftype=gguf.LlamaFileType.MOSTLY_Q4_K_M, progress=False,
                                                edited_floor=gguf.GGMLQuantizationType.Q8_0))
    adapter = d / "edit.lora.gguf"
    export_lora(plan, src, adapter, dtype="F16")
    return base, merged, adapter


def test_generation_with_adapter_vs_merged(models: tuple[Path, Path, Path], compare: Callable[..., float]) -> None:
    base, merged, adapter = models
    prompts = load_prompts("rtp-challenging").subset(64, seed=0).prompts
    settings = EvalSettings(max_tokens=20, batch=16)
    with LlamaRuntime(merged, n_ctx=16 * 128, n_seq=16) as rm, \
            LlamaRuntime(base, n_ctx=16 * 128, n_seq=16, lora=adapter) as ra:
        ratio = compare("the edit merged (Q4_K_M, edited tensors Q8_0)",
                        lambda: generate(ra, prompts, settings, progress=False),
                        lambda: generate(rm, prompts, settings, progress=False), rounds=3)
    assert ratio > 0


def test_scoring_window_with_adapter_vs_merged(models: tuple[Path, Path, Path], compare: Callable[..., float]) -> None:
    base, merged, adapter = models
    with LlamaRuntime(merged, n_ctx=512, n_batch=512) as rm, LlamaRuntime(base, n_ctx=512, n_batch=512, lora=adapter) as ra:
        tokens = rm.tokenize("The history of the city begins in the ninth century, when " * 40)[:512]
        ratio = compare("the edit merged, one 512-token window", lambda: ra.logprobs(tokens), lambda: rm.logprobs(tokens),
                        rounds=5)
    assert ratio > 0
