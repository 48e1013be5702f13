"""The default recipe's stages on SmolLM2-135M-Instruct, each against the way it ran before (same process, same inputs):

- model load: the converted Hugging Face folder kept in the cache against transformers' GGUF loader;
- teacher: targets read off while the fused model generates (one pass, prompts shared through a KV-cache copy)
  against generating first and decoding every sequence again (the earlier two passes);
- student step: bfloat16 autocast with the output layer cut to 8,192 tokens against float32 over the whole
  49,152-token vocabulary (8 toxic + 8 clean sequences of discovery length, rank-32 update from layer 10, exact clean
  KL with the unedited model alongside);
- the default student's step (bfloat16 autocast, whole vocabulary, teacher and clean KL to top-32 targets, one
  backward per term, as `_Student.train` runs it) against the same step in float32;
- the unedited model's clean targets: the sequences a default student's 150 steps draw (and its held-out ones), top-k
  by torch, against every clean sequence with numpy's argpartition (as before), on the same 384 sequences;
- the default student's step and the calibrator's target hidden states with the decoder's weights kept in bfloat16
  for the stage (`FullPrecisionModel.computing_in`) against casting the stored float16 weights at every call.

Run: pytest bench/bench_recipe.py -s"""

from __future__ import annotations

import contextlib
import shutil
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pydetox.assets import fetch
from pydetox.discover.data import EMBEDDED, usable_pairs


@pytest.fixture(scope="module")
def f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pydetox import ggml
    from pydetox.apply import ApplyOptions, apply_plan

    out = tmp_path_factory.mktemp("recipe") / "smol.F16.gguf"
    apply_plan(None, fetch("smollm2-135m-instruct", quiet=True), out, ApplyOptions(ftype=ggml.parse_ftype("F16"), progress=False))
    return out


@pytest.fixture(scope="module")
def calibrator(f16: Path) -> Path:
    """A calibrator of a few steps: the teacher's cost does not depend on how well it was trained."""
    from pydetox.calibrate import CalibrateSettings, train

    out = f16.with_name("cal.gguf")
    train(f16, out, CalibrateSettings(steps=10, align_steps=10, clean_tokens=0, precision="bfloat16",
                                      restrict_vocab=True), progress=False, plot=False)
    return out


def test_model_load(f16: Path, compare: Callable[..., float]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pydetox.discover.model import FullPrecisionModel, _converted_folder

    FullPrecisionModel(f16, progress=False)  # converts once
    assert _converted_folder(f16).is_dir()

    def gguf_loader() -> None:
        AutoModelForCausalLM.from_pretrained(str(f16.parent), gguf_file=f16.name)
        AutoTokenizer.from_pretrained(str(f16.parent), gguf_file=f16.name)

    assert compare("transformers' GGUF loader", lambda: FullPrecisionModel(f16, progress=False), gguf_loader, rounds=2) > 0
    shutil.rmtree(_converted_folder(f16))


def _two_pass_teacher(source: Path, p: Any, prompts: list[str], texts: list[str]) -> int:
    """The teacher as it ran before: greedy continuations by the fused and the unedited model, then every sequence
    decoded again, one at a time, for both distributions."""
    from pydetox.discover.distill.teacher import _top
    from pydetox.fusion import FusedRuntime
    from pydetox.runtime import LlamaRuntime, Sampling

    n_seq, n_ctx = 16, 16 * (p.max_tokens + p.max_new_tokens) + 64
    with FusedRuntime(source, p.calibrator, p.alpha, n_ctx=n_ctx, n_seq=n_seq, n_batch=512) as rt, \
            LlamaRuntime(source, n_ctx=n_ctx, n_seq=n_seq, n_batch=512) as base:
        toks = [rt.tokenize(q)[: p.max_tokens] for q in prompts]
        seqs = []
        for s in range(0, len(toks), n_seq):
            wave = toks[s : s + n_seq]
            for model in (rt, base):
                gen = model.generate(wave, p.max_new_tokens, Sampling(0.0), [0] * len(wave))
                seqs += [a + b for a, b in zip(wave, gen, strict=True)]
        seqs += [rt.tokenize(t)[: p.max_tokens] for t in texts]
        positions = 0
        for seq in {tuple(s): s for s in seqs if len(s) >= 3}.values():
            lf, lb = rt.logprobs_and_target(seq)
            _top(lf, p.top_k, lb >= lb.max(axis=1, keepdims=True) + np.log(p.plausible))
            positions += len(seq) - 1
    return positions


def test_teacher_one_pass(f16: Path, calibrator: Path, compare: Callable[..., float]) -> None:
    from pydetox.discover.distill.params import DistillParams
    from pydetox.discover.distill.teacher import _teacher
    from pydetox.prompts import load_prompts

    p = DistillParams(calibrator=str(calibrator))
    prompts = load_prompts("rtp-perspective").prompts[:48]
    rows, _ = usable_pairs(EMBEDDED, set())
    texts = [r["toxic"] for r in rows[:32]]
    ratio = compare("two passes (generate, then decode again)", lambda: _teacher(f16, p, prompts, texts, False, []),
                    lambda: _two_pass_teacher(f16, p, prompts, texts), rounds=1)
    assert ratio > 0


def _student_inputs(f16: Path) -> tuple[Any, Any, list[list[int]], list[list[int]]]:
    """The frozen model as the student sees it, and 8 toxic + 8 clean discovery-length sequences (a toxic sentence
    and its continuation are ~40-80 tokens)."""
    from pydetox.discover.model import FullPrecisionModel

    fp = FullPrecisionModel(f16, progress=False)
    fp.model.requires_grad_(False)
    ctx: Any = types.SimpleNamespace(fp=fp, progress=False)
    rows, _ = usable_pairs(EMBEDDED, set())
    tok = fp.tokenizer
    toxic = [tok(" ".join(r["toxic"] for r in rows[4 * i : 4 * i + 4])).input_ids[:64] for i in range(8)]
    clean = [tok(" ".join(r["neutral"] for r in rows[40 + 4 * i : 44 + 4 * i])).input_ids[:64] for i in range(8)]
    return ctx, fp, toxic, clean


def test_student_step(f16: Path, compare: Callable[..., float]) -> None:
    import torch

    from pydetox.discover.distill.student import _base_targets, _batch_kl, _full_kl, _LoRA, _Vocab

    ctx, fp, toxic, clean = _student_inputs(f16)
    targets = _base_targets(ctx, toxic, 32, progress=False)  # stand-in teacher targets: the model's own top-32
    named = np.unique(np.concatenate(targets.ids))
    vocab = _Vocab(ctx, np.union1d(named, np.setdiff1d(np.arange(8192), named)[: 8192 - len(named)]))
    lora = _LoRA(ctx, list(range(10, fp.n_layers)), 32, 0)
    pick = list(range(8))

    def step(v: _Vocab | None, bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = _batch_kl(ctx, targets, pick, v).mean() + 8 * _full_kl(ctx, lora, clean, v).mean()
        loss.backward()
        for q in lora.params():
            q.grad = None

    ratio = compare("float32, whole vocabulary", lambda: step(vocab, True), lambda: step(None, False), rounds=3)
    lora.close()
    assert ratio > 0


def test_clean_targets(f16: Path, compare: Callable[..., float]) -> None:
    from pydetox.discover.distill.params import DistillParams
    from pydetox.discover.distill.student import _base_targets, _forward, _schedule
    from pydetox.discover.distill.teacher import _Targets, _top
    from pydetox.discover.model import FullPrecisionModel

    fp = FullPrecisionModel(f16, progress=False)
    ctx: Any = types.SimpleNamespace(fp=fp, progress=False)
    rows, _ = usable_pairs(EMBEDDED, set())
    tok = fp.tokenizer
    seqs = [tok(" ".join(r["neutral"] for r in rows[3 * i : 3 * i + 3])).input_ids[:64] for i in range(384)]
    # the default's proportions: 1,796 clean sequences, a tenth held out (48 used), 150 steps of 8 -> 384 here,
    # 150 * 8 * 384 / 1796 draws over the 346 training ones
    p = DistillParams(steps=round(150 * 384 / 1796), batch=8)
    val, train = list(range(10)), np.arange(38, 384)
    schedule = _schedule(p, np.random.default_rng([1, 0]), [], [len(q) for q in seqs], np.arange(100), train)
    need = sorted({i for _, bc in schedule for i in bc} | set(val))
    print(f"\n{len(need)} of {len(seqs)} clean sequences drawn or held out")

    def before() -> None:
        import torch

        out = []
        with torch.no_grad():
            for s in range(0, len(seqs), 16):
                chunk = seqs[s : s + 16]
                lq = _forward(ctx, chunk).numpy()
                at = 0
                for c in chunk:
                    out.append(_top(lq[at : at + len(c) - 1], 32))
                    at += len(c) - 1
        assert len(out) == len(seqs)

    def after() -> _Targets:
        return _base_targets(ctx, [seqs[i] for i in need], 32, progress=False)

    assert compare("every sequence, numpy top-k", after, before, rounds=1) > 0


def _default_step(f16: Path) -> tuple[Any, Callable[[bool], None], Any]:
    """The model, the default student's step as `_Student.train` runs it (teacher and clean KL to top-32 stand-in
    targets, the model's own, one backward per term; `step(bf16)` under bfloat16 autocast or float32), and its
    update (close it after)."""
    import torch

    from pydetox.discover.distill.student import _base_targets, _batch_kl, _LoRA

    ctx, fp, toxic, clean = _student_inputs(f16)
    t_targets = _base_targets(ctx, toxic, 32, progress=False)
    c_targets = _base_targets(ctx, clean, 32, progress=False)
    lora = _LoRA(ctx, list(range(fp.n_layers // 3, fp.n_layers)), 32, 0)
    pick = list(range(8))

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            lt = _batch_kl(ctx, t_targets, pick).mean()
        lt.backward()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            lc = _batch_kl(ctx, c_targets, pick).mean()
        (4 * lc).backward()
        for q in lora.params():
            q.grad = None

    return fp, step, lora


def test_student_step_bf16(f16: Path, compare: Callable[..., float]) -> None:
    _, step, lora = _default_step(f16)
    ratio = compare("float32", lambda: step(True), lambda: step(False), rounds=4)
    lora.close()
    assert ratio > 0


def _stored_in_compute_type(fp: Any, run: Callable[[], Any]) -> tuple[Callable[[], Any], contextlib.ExitStack]:
    """`run` with the decoder's weights kept in bfloat16 (`computing_in`), entered at its first call (after `compare`
    has timed the baseline with the stored float16 weights) and left when the returned stack closes."""
    stack = contextlib.ExitStack()
    entered = False

    def ours() -> Any:
        nonlocal entered
        if not entered:
            stack.enter_context(fp.computing_in("bfloat16"))
            entered = True
        return run()

    return ours, stack


def test_student_step_weights_in_compute_type(f16: Path, compare: Callable[..., float]) -> None:
    """The default bfloat16 step with the frozen decoder's weights kept in bfloat16 for the stage (distill's
    `computing_in`) against the same step casting its float16 weights at every call."""
    fp, step, lora = _default_step(f16)
    ours, stack = _stored_in_compute_type(fp, lambda: step(True))
    with stack:
        ratio = compare("float16 weights cast at each call", ours, lambda: step(True), rounds=4)
    lora.close()
    assert ratio > 0


def test_calibrator_target_states(f16: Path, compare: Callable[..., float]) -> None:
    """The calibrator's first stage, the target's final hidden states of training rows (64 rows of the default's 64
    tokens, bfloat16 autocast), with the decoder's weights kept in bfloat16 against cast at every call."""
    import torch

    from pydetox.calibrate import _target_hidden
    from pydetox.discover.model import FullPrecisionModel

    fp = FullPrecisionModel(f16, progress=False)
    rows = torch.randint(0, 49152, (64, 64), generator=torch.Generator().manual_seed(0))

    def states() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _target_hidden(fp.model, rows, 16, progress=False)

    ours, stack = _stored_in_compute_type(fp, states)
    with stack:
        ratio = compare("float16 weights cast at each call", ours, states, rounds=3)
    assert ratio > 0
