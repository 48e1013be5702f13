"""`pydetox export-lora`: a plan as a llama.cpp LoRA adapter. The unedited model + the adapter, run by llama.cpp,
must give the merged model's log-probabilities (apply's output), for every edit kind that has an adapter form."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import sha256
from tiny import write_tiny_llama

from pydetox.apply import ApplyOptions, apply_plan
from pydetox.cli import main
from pydetox.errors import PlanError
from pydetox.gguf_io import ModelFile
from pydetox.lora import adapter_info, export_lora
from pydetox.plan import Edit, EditKind, EditPlan, random_orthonormal, random_plan
from pydetox.runtime import LlamaRuntime

SHAPE = {"d": 64, "ff": 128, "heads": 2, "kv_heads": 1}
TEXT = "the cat was in the dog and the dog was in the cat"


def logprobs(model: Path, lora: Path | None = None, scale: float = 1.0) -> np.ndarray:
    with LlamaRuntime(model, n_ctx=128, n_batch=128, lora=lora, lora_scale=scale) as rt:
        return rt.logprobs(rt.tokenize(TEXT))


def mixed_plan(model: Path) -> EditPlan:
    """One edit of every kind an adapter can hold, two of them on one tensor (composed in order)."""
    rng = np.random.default_rng(5)
    with ModelFile(model) as m:
        t = m.tensors
        down, q, up, out = (t[n].shape for n in ("blk.0.ffn_down.weight", "blk.1.attn_q.weight", "blk.0.ffn_up.weight",
                                                  "output.weight"))
    gains = np.ones(down[0], np.float32)
    gains[[3, 17, 40]] = [0.0, 0.5, 2.0]
    cols = np.ones(q[1], np.float32)
    cols[[1, 9]] = [0.25, 1.5]
    lr = random_plan("llama", [("blk.1.ffn_down.weight", down)], EditKind.LOW_RANK, rank=4, seed=2).edits[0]
    return EditPlan("llama", [
        Edit("blk.0.ffn_down.weight", EditKind.PROJECT_OUT, down, random_orthonormal(rng, 3, down[0]),
             gain=np.array([0.0, 0.3, 0.5], np.float32)),
        Edit("blk.0.ffn_down.weight", EditKind.SCALE_ROWS, down, gains),
        Edit("blk.1.attn_q.weight", EditKind.SCALE_COLS, q, cols),
        Edit("blk.0.ffn_up.weight", EditKind.PROJECT_IN, up, random_orthonormal(rng, 2, up[1])),
        Edit("output.weight", EditKind.ADD_ROWS, out, np.array([5, 11], np.float32),
             (rng.standard_normal((2, out[1])) * 0.05).astype(np.float32)),
        Edit(lr.tensor, lr.kind, lr.shape, lr.a * np.float32(20), lr.b),
    ], "mixed")


def test_adapter_gives_the_merged_model(tmp_path: Path) -> None:
    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)  # F32, untied output
    plan = mixed_plan(model)
    plan_file = plan.save(tmp_path / "mixed.plan.gguf")
    merged = tmp_path / "merged.gguf"
    apply_plan(plan, model, merged, ApplyOptions(progress=False))
    before = sha256(model)
    assert main(["export-lora", str(plan_file), "--model", str(model), "-o", str(tmp_path / "a.gguf")]) == 0
    assert sha256(model) == before
    base, want, got = logprobs(model), logprobs(merged), logprobs(model, tmp_path / "a.gguf")
    assert np.abs(want - base).max() > 0.05  # the edit changes the model
    assert np.abs(got - want).max() < 2e-3  # the adapter is that change
    half = logprobs(model, tmp_path / "a.gguf", scale=0.0)
    assert np.abs(half - base).max() < 1e-5  # scale 0: the unedited model
    info = adapter_info(tmp_path / "a.gguf")
    assert info["type"] == "adapter"
    assert info["arch"] == "llama"
    assert info["tensors"] == 5
    assert info["pydetox"]["pydetox.plan.sha256"]
    assert info["pydetox"]["pydetox.plan.method"] == "mixed"


def test_f16_adapter_on_a_quantized_model(tmp_path: Path) -> None:
    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    q8 = tmp_path / "m.q8.gguf"
    apply_plan(None, model, q8, ApplyOptions(progress=False, ftype=gguf.LlamaFileType.MOSTLY_Q8_0))
    with ModelFile(model) as m:
        shapes = [(n, t.shape) for n, t in m.tensors.items() if n.endswith("ffn_down.weight")]
    plan = random_plan("llama", shapes, EditKind.LOW_RANK, rank=4, seed=1)
    plan = EditPlan("llama", [Edit(e.tensor, e.kind, e.shape, e.a * np.float32(30), e.b) for e in plan.edits], "lr")
    report = export_lora(plan, q8, tmp_path / "a16.gguf", dtype="F16")
    assert report.tensors == 2
    assert set(report.ranks.values()) == {4}
    merged = tmp_path / "merged.gguf"
    apply_plan(plan, model, merged, ApplyOptions(progress=False))  # the edit in float, no quantization
    # the adapter on the Q8_0 model is as close to the float edit as the Q8_0 model is to the float model
    err_adapter = np.abs(logprobs(q8, tmp_path / "a16.gguf") - logprobs(merged)).max()
    err_q8 = np.abs(logprobs(q8) - logprobs(model)).max()
    assert err_adapter < 3 * err_q8 + 1e-3


def test_what_cannot_be_an_adapter_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tied = write_tiny_llama(tmp_path / "t.gguf", **SHAPE, tied=True)
    with ModelFile(tied) as m:
        emb = m.tensors["token_embd.weight"].shape
    creates = EditPlan("llama", [Edit("output.weight", EditKind.ADD_ROWS, emb, np.array([1], np.float32),
                                      np.ones((1, emb[1]), np.float32), source="token_embd.weight")])
    with pytest.raises(PlanError, match="an adapter can only change existing tensors"):
        export_lora(creates, tied, tmp_path / "a.gguf")
    dense = EditPlan("llama", [Edit("token_embd.weight", EditKind.SCALE_COLS, emb, np.full(emb[1], 0.5, np.float32))])
    with pytest.raises(PlanError, match="apply the plan instead"):
        export_lora(dense, tied, tmp_path / "a.gguf")
    assert not list(tmp_path.glob("a*.gguf"))
    assert not list(tmp_path.glob(".*.tmp"))
    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    plan = random_plan("llama", [("blk.0.ffn_down.weight", (64, 128))], EditKind.LOW_RANK, rank=2).save(tmp_path / "p.gguf")
    assert main(["export-lora", str(plan), "--model", str(model), "-o", str(model), "--force"]) == 2
    assert "is the input file" in capsys.readouterr().err


def test_eval_with_lora_reports_both(tmp_path: Path) -> None:
    import json

    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    plan = random_plan("llama", [("blk.0.ffn_down.weight", (64, 128))], EditKind.LOW_RANK, rank=2).save(tmp_path / "p.gguf")
    assert main(["export-lora", str(plan), "--model", str(model), "-o", str(tmp_path / "a.gguf")]) == 0
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat\na dog is\n")
    out = tmp_path / "r.json"
    assert main(["eval", str(model), "--lora", str(tmp_path / "a.gguf"), "--prompts", str(prompts), "--max-tokens", "4",
                 "--ppl-tokens", "0", "--evaluators", "profanity-check", "--json", str(out), "--quiet"]) == 0
    labels = [m["label"] for m in json.loads(out.read_text())["models"]]
    assert labels == ["m.gguf", "m.gguf + a.gguf"]


def test_compare_shows_what_changed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    other = write_tiny_llama(tmp_path / "o.gguf", **SHAPE, seed=4)
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat\na dog is\nthe dog was\nin the\n")
    md = tmp_path / "c.md"
    assert main(["compare", str(model), str(other), "--prompts", str(prompts), "--top", "3", "--max-tokens", "6",
                 "--evaluators", "profanity-check,bilstm", "--markdown", str(md), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1. ")
    assert "A = m.gguf, B = o.gguf" in out
    assert "profanity-check" in out
    table = md.read_text().splitlines()
    assert table[0].startswith("| prompt | m.gguf | o.gguf | profanity-check (m.gguf → o.gguf)")
    assert 1 <= len([r for r in table if r.startswith("| ") and "→" in r and "prompt" not in r]) <= 3
    assert main(["compare", str(model), str(model), "--prompts", str(prompts), "--evaluators", "bilstm", "--quiet"]) == 0
    assert "the same continuation for every prompt" in capsys.readouterr().out


def test_chat_with_lora(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    plan = random_plan("llama", [("blk.0.ffn_down.weight", (64, 128))], EditKind.LOW_RANK, rank=2).save(tmp_path / "p.gguf")
    assert main(["export-lora", str(plan), "--model", str(model), "-o", str(tmp_path / "a.gguf")]) == 0
    assert main(["chat", str(model), "--prompt", "the cat", "--max-tokens", "3", "--ctx", "64",
                 "--lora", str(tmp_path / "a.gguf")]) == 0
    assert main(["chat", str(model), "--prompt", "the cat", "--lora", str(tmp_path / "none.gguf")]) == 2
    assert "expected a LoRA adapter GGUF" in capsys.readouterr().err
