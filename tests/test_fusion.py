"""Calibration-model fusion: a tiny calibrator trained in the test on a tiny llama GGUF, written as a GGUF that
llama.cpp runs, fused with its target by the same code `pydetox eval` and `pydetox chat` use."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tiny import write_tiny_llama

from pydetox import ggml, kernels
from pydetox.calibrate import CalibrateSettings, train
from pydetox.fusion import Alignment, FusedRuntime, FusionError, FusionLogitsProcessor, alignment_path
from pydetox.gguf_io import ModelFile
from pydetox.runtime import LlamaRuntime, Sampling

SHAPE = {"d": 64, "ff": 128, "layers": 3, "heads": 4, "kv_heads": 2}
TINY = CalibrateSettings(layers=1, steps=4, batch=4, seq_len=32, align_steps=3, eval_every=2, clean_tokens=0,
                         output_type="F32", layer_type="F32", vocab_sample=64)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("fusion")
    target = write_tiny_llama(folder / "target.gguf", **SHAPE, tied=request.param)
    res = train(target, folder / "cal.gguf", TINY, progress=False)
    return target, res.calibrator


def test_training_writes_a_calibrator_llama_cpp_runs_as_torch_does(trained: tuple[Path, Path]) -> None:
    target, cal = trained
    log = json.loads(cal.with_name("cal.train.json").read_text())
    assert cal.with_name("cal.loss.png").stat().st_size > 0
    assert len(log["train"]) == TINY.steps
    assert len(log["align"]) == TINY.align_steps
    # the target's hidden states only of the rows the steps draw (with replacement: 16 draws of 16 rows), found by
    # replaying the generator: a step drawing any other row would have stopped the training
    assert 0 < log["rows"]["target_states"] < log["rows"]["train"] == TINY.steps * TINY.batch
    # llama.cpp's forward pass of the written GGUF against torch's of the trained model (F32 weights: float noise)
    assert log["llama_cpp_check"]["rel_rms_diff"] < 1e-3, log["llama_cpp_check"]
    with ModelFile(cal) as m, ModelFile(target) as t:
        assert m.get_field("llama.block_count") == 1
        assert sorted(n for n in m.tensors if n.startswith("blk.")) == sorted(n for n in t.tensors if n.startswith("blk.0."))
        assert m.tensors["token_embd.weight"].qtype == t.tensors["token_embd.weight"].qtype
        assert m.read(m.tensors["token_embd.weight"]).tobytes() == t.read(t.tensors["token_embd.weight"]).tobytes()
        for frozen in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):  # kept as the target's, byte for byte
            assert m.read(m.tensors[frozen]).tobytes() == t.read(t.tensors[frozen]).tobytes()
        trained_down = m.read(m.tensors["blk.0.ffn_down.weight"]).tobytes()
        assert trained_down != t.read(t.tensors["blk.0.ffn_down.weight"]).tobytes()


def test_validating_less_often_trains_the_same_calibrator(tmp_path: Path) -> None:
    """`eval_every` only watches: a calibrator validated at every step and one validated at the last step only are
    the same file's tensors byte for byte, so the recipe's cache key leaves it out (`WATCHING`)."""
    from dataclasses import replace

    from pydetox.recipe import calibrator_key

    target = write_tiny_llama(tmp_path / "target.gguf", **SHAPE)
    often = train(target, tmp_path / "often.gguf", replace(TINY, eval_every=1), progress=False, plot=False)
    once = train(target, tmp_path / "once.gguf", replace(TINY, eval_every=1000), progress=False, plot=False)
    logs = [json.loads(r.log.read_text()) for r in (often, once)]
    assert [len(log["val"]) for log in logs] == [TINY.steps + 1, 2]  # the start, then every step or the last
    assert logs[0]["val"][-1] == logs[1]["val"][-1]
    with ModelFile(often.calibrator) as a, ModelFile(once.calibrator) as b:
        assert sorted(a.tensors) == sorted(b.tensors)
        for name in a.tensors:
            assert a.read(a.tensors[name]).tobytes() == b.read(b.tensors[name]).tobytes(), name
    assert calibrator_key("src", replace(TINY, eval_every=1)) == calibrator_key("src", TINY)
    assert calibrator_key("src", replace(TINY, steps=5)) != calibrator_key("src", TINY)


def _prompts(rt: LlamaRuntime) -> list[list[int]]:
    return [rt.tokenize(t) for t in ("the cat is", "a dog was in the", "the", "and of to in the a cat")]


def test_target_states_kept_on_disk_read_back_what_was_computed(trained: tuple[Path, Path]) -> None:
    """The calibrator's target states for the training steps, kept in a temporary file on the CPU (`_DiskStates`),
    read back bit for bit what the in-memory array holds, for any rows in any order; a row outside them is refused."""
    import torch

    from pydetox.calibrate import _DiskStates, _target_hidden
    from pydetox.discover.model import FullPrecisionModel

    fp = FullPrecisionModel(trained[0], progress=False)
    rows = torch.randint(3, 270, (7, 9), generator=torch.Generator().manual_seed(0))
    in_memory = _target_hidden(fp.model, rows, 3, progress=False)
    on_disk = _target_hidden(fp.model, rows, 3, progress=False, on_disk=True)
    assert isinstance(on_disk, _DiskStates)
    assert len(on_disk) == 7
    pick = torch.tensor([6, 0, 3, 3, 5])
    torch.testing.assert_close(on_disk[pick], in_memory[pick], rtol=0, atol=0)
    with pytest.raises(IndexError, match="row 7 of 7"):
        on_disk[torch.tensor([1, 7])]
    on_disk.close()


def test_alpha_zero_is_exactly_the_target(trained: tuple[Path, Path]) -> None:
    """Fused logits at alpha = 0 equal the target's own (tolerance 0: (1 - 0) * z + 0 * z' is z in float32), and
    llama.cpp's samplers on them draw the same tokens, greedy and sampled."""
    target, cal = trained
    with LlamaRuntime(target, n_ctx=512, n_seq=4) as plain, FusedRuntime(target, cal, 0.0, n_ctx=512, n_seq=4) as fused:
        prompts = _prompts(plain)
        window = [t for p in prompts for t in p]
        assert np.array_equal(fused.logprobs(window), plain.logprobs(window))
        for sampling in (Sampling(), Sampling(temperature=1.0, top_p=0.9, seed=3)):
            assert fused.generate(prompts, 8, sampling, [1, 2, 3, 4]) == plain.generate(prompts, 8, sampling, [1, 2, 3, 4])


def test_fused_logits_match_the_formula(trained: tuple[Path, Path]) -> None:
    """(1 - a) W h_t + a W LN(A h_c), computed here from the target's float output layer, the alignment and the
    calibrator's hidden states, against what FusedRuntime gets from llama.cpp (W' = W diag(g) A folded in the GGUF)."""
    target, cal = trained
    align = Alignment.load(alignment_path(cal))
    with ModelFile(target) as t:
        e = t.tensors.get("output.weight") or t.tensors["token_embd.weight"]
        W = kernels.dequantize(t.read(e), e.qtype, e.rows, e.cols)
    a = 0.6
    with LlamaRuntime(target, n_ctx=256) as plain, LlamaRuntime(cal, n_ctx=256, embeddings=True) as c, \
            FusedRuntime(target, cal, a, n_ctx=256) as fused:
        toks = [t for p in _prompts(plain) for t in p]
        n = len(toks)
        plain._decode([(tok, i, 0, True) for i, tok in enumerate(toks)])
        zt = plain._output_logits(n).copy()
        c._decode([(tok, i, 0, True) for i, tok in enumerate(toks)])
        h = np.ctypeslib.as_array(c.lib.llama_get_embeddings(c.ctx), shape=(n, c.n_embd)).copy()
        u = h @ align.A.T
        ln = align.g * u / np.sqrt((u**2).mean(1, keepdims=True) + align.eps)
        expected = (1 - a) * zt + a * ln @ W.T
        fused._clear()
        fused._decode([(tok, i, 0, True) for i, tok in enumerate(toks)])
        got = fused._output_logits(n)
        assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()
        lp = fused.logprobs(toks)
        assert np.allclose(np.exp(lp).sum(1), 1.0, atol=1e-4)
        both, alone = fused.logprobs_and_target(toks)
        assert np.array_equal(both, lp)
        assert np.array_equal(alone, plain.logprobs(toks))  # the target's own, bit for bit


def test_chat_processor_follows_the_conversation(trained: tuple[Path, Path]) -> None:
    """The logits processor used by `pydetox chat` keeps the calibrator's cache in step with growing, and rewound,
    token sequences and gives the fused logits FusedRuntime gives for the same prefix."""
    target, cal = trained
    a = 0.5
    proc = FusionLogitsProcessor(target, cal, a, n_ctx=256)
    with LlamaRuntime(target, n_ctx=256) as plain, FusedRuntime(target, cal, a, n_ctx=256) as fused:
        toks = [t for p in _prompts(plain) for t in p]
        ref = fused.logprobs([*toks, toks[0]])
        order = [5, 6, 7, 9, 3, 4, 12, len(toks)]  # grow, jump, rewind, grow again
        for k in order:
            scores = plain.logprobs([*toks[:k], toks[0]])[k - 1]  # the target's logits (up to a constant) at k
            out = proc(np.asarray(toks[:k], dtype=np.intc), scores.astype(np.single))
            out = out - np.log(np.exp(out - out.max()).sum()) - out.max()
            # llama.cpp's float results depend a little on how many tokens a batch holds: 5e-3 nats of slack
            assert np.abs(out - ref[k - 1]).max() < 5e-3, k
    proc.close()


def test_mismatches_are_refused(trained: tuple[Path, Path], tmp_path: Path) -> None:
    target, cal = trained
    with pytest.raises(FusionError, match=r"alpha must lie in \[0, 1\]"):
        FusedRuntime(target, cal, 1.5)
    lone = tmp_path / "lone.gguf"
    shutil.copy(cal, lone)
    with pytest.raises(FusionError, match="alignment file"):
        FusedRuntime(target, lone, 0.3)
    # a target with another tokenizer: the tiny vocabulary with one token renamed
    other = write_tiny_llama(tmp_path / "other.gguf", **SHAPE)
    raw = other.read_bytes().replace(b"\xe2\x96\x81dog", b"\xe2\x96\x81cow", 1)
    other.write_bytes(raw)
    with pytest.raises(FusionError, match="another tokenizer"):
        FusedRuntime(other, cal, 0.3)
    bad = tmp_path / "bad.align.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 40)
    with pytest.raises(FusionError, match="not a readable calibrator alignment"):
        Alignment.load(bad)
    mismatched = Alignment(np.eye(4, dtype=np.float32), np.ones(3, np.float32), 1e-6, "x")
    with pytest.raises(FusionError, match="do not fit"):
        mismatched.save(tmp_path / "x.align.gguf")
    assert not (tmp_path / "x.align.gguf").exists()


def test_eval_command_sweeps_alpha(trained: tuple[Path, Path], tmp_path: Path) -> None:
    target, cal = trained
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat is\na dog was\nthe\n")
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pydetox.cli", "eval", str(target), "--calibrator", str(cal), "--alpha", "0,0.5",
         "--prompts", str(prompts), "--evaluators", "profanity-check", "--ppl-tokens", "0", "--max-tokens", "6",
         "--json", str(out), "--quiet"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [m["alpha"] for m in report["models"]] == [0.0, 0.5]
    assert all(m["calibrator"] == str(cal) for m in report["models"])
    assert "a=0.5" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "pydetox.cli", "eval", str(target), "--alpha", "0.3"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2
    assert "--alpha needs --calibrator" in bad.stderr


def test_detox_reports_fusion_next_to_weight_edits(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from pydetox.cli import main

    target, cal = trained
    out = tmp_path / "dx"
    assert main(["detox", "--model", str(target), "--method", "aura", "--types", "F16,Q8_0", "--pairs", "24",
                 "--limit", "5", "--ppl-tokens", "128", "--out", str(out), "--calibrator", str(cal), "--alpha", "0.3",
                 "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {(r["method"], r["type"]) for r in report["detox"]["summary"]}
    assert rows == {(m, t) for m in ("aura", "fusion a=0.3") for t in ("F16", "Q8_0")}
    assert len(report["models"]) == 6


def test_standalone_objective_trains_the_calibrator_alone(tmp_path: Path) -> None:
    from dataclasses import replace

    target = write_tiny_llama(tmp_path / "t.gguf", **SHAPE)
    res = train(target, tmp_path / "c.gguf", replace(TINY, objective="standalone", steps=2, output_type="Q8_0",
                                                     layer_type="F16"), progress=False, plot=False)
    log = json.loads(res.log.read_text())
    with ModelFile(res.calibrator) as m:  # trained layers at layer_type (their activations stay unquantized)
        assert m.tensors["output.weight"].qtype == ggml.parse_type("Q8_0")
        assert m.tensors["blk.0.ffn_down.weight"].qtype == ggml.parse_type("F16")
    assert log["val_alpha"] is None
    assert "val_target_alone" not in log
    assert res.plot is None
    with FusedRuntime(target, res.calibrator, 0.5, n_ctx=128) as fused:
        assert np.isfinite(fused.logprobs(fused.tokenize("the cat was"))).all()


def test_training_refuses_bad_settings(tmp_path: Path) -> None:
    target = write_tiny_llama(tmp_path / "t.gguf", **SHAPE)
    from pydetox.errors import PydetoxError

    with pytest.raises(PydetoxError, match=r"takes 1\.\.2 of the target's 3 layers"):
        train(target, tmp_path / "c.gguf", CalibrateSettings(layers=3, steps=1, clean_tokens=0), progress=False)
    with pytest.raises(PydetoxError, match=r"ending in \.gguf"):
        train(target, tmp_path / "c.bin", TINY, progress=False)
    with pytest.raises(PydetoxError, match="objective is 'fused' or 'standalone'"):
        train(target, tmp_path / "c.gguf", CalibrateSettings(layers=1, objective="both", clean_tokens=0), progress=False)
    with pytest.raises(PydetoxError, match="must not train on `news`"):
        train(target, tmp_path / "c.gguf", CalibrateSettings(layers=1, clean_text="news"), progress=False)
    assert not (tmp_path / "c.gguf").exists()


def test_top_p_draw_samples_the_nucleus_in_proportion() -> None:
    """Drawn tokens come from the nucleus only (the most probable tokens reaching top_p together, the crossing one
    included), each in proportion to its probability; a flat vocabulary whose 256 most probable tokens hold less than
    top_p is searched whole."""
    from pydetox.discover.distill.teacher import top_p_draw

    rng = np.random.default_rng(0)
    z = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    draws = np.bincount([top_p_draw(z, 0.9, rng) for _ in range(4000)], minlength=4)
    assert draws[3] == 0  # 0.5 + 0.3 < 0.9 <= 0.5 + 0.3 + 0.15: the third token crosses, the fourth is out
    assert np.allclose(draws[:3] / 4000, np.array([0.5, 0.3, 0.15]) / 0.95, atol=0.03), draws
    assert top_p_draw(z, 0.4, rng) == 0
    flat = np.zeros(1000)
    flat[0] = 5.0  # ~13% on token 0, the rest spread over 999 tokens
    got = {top_p_draw(flat, 0.9, rng) for _ in range(2000)}
    assert len(got) > 300
    assert max(got) > 255


def test_teacher_samples_continuations_with_the_targets_of_their_tokens(trained: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    """`samples`: each prompt is also continued that many times by sampling the unedited model; each sampled
    sequence carries, at every position, the teacher's distribution a teacher-forced pass over the same tokens gives,
    and shares its prompt's group (held out together)."""
    from pydetox.discover.distill.params import DistillParams
    from pydetox.discover.distill.teacher import _teacher, _TeacherPass
    from pydetox.fusion import FusedRuntime

    target, cal = trained
    prompts = ["the cat sat on", "a dog ran", "we saw the", "she said that it"]
    p = DistillParams(calibrator=str(cal), alpha=0.9, max_new_tokens=8, max_tokens=16, samples=2, plausible=0)
    toxic, _ = _teacher(target, p, prompts, [], False, [])
    counts = np.bincount(toxic.groups, minlength=len(prompts))
    plain, _ = _teacher(target, DistillParams(calibrator=str(cal), alpha=0.9, max_new_tokens=8, max_tokens=16,
                                              plausible=0), prompts, [], False, [])
    # up to 4 continuations a prompt (fused, unedited, 2 sampled), equal ones kept once; sampled ones are new texts
    assert (counts <= 4).all()
    assert counts.sum() > len(plain)
    new = [k for k, q in enumerate(toxic.seqs) if q not in plain.seqs]
    assert new
    with FusedRuntime(target, str(cal), 0.9, n_ctx=64, n_seq=1, n_batch=64) as rt:
        forced = _TeacherPass(rt, p)
        for k in new:
            rows = forced.texts_wave([toxic.seqs[k]])[0]
            assert np.array_equal(np.stack([r[0] for r in rows])[:, :4], toxic.ids[k][:, :4])
            assert np.allclose(np.stack([r[1] for r in rows]), toxic.logp[k], atol=2e-3)


@pytest.mark.parametrize("plausible", [0.0, 1e-3, 0.5], ids=["unrestricted", "plausible", "few-plausible"])
def test_teacher_targets_do_not_depend_on_the_blocks_its_rows_are_computed_in(
        trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, plausible: float) -> None:
    """The teacher's numpy work on a decode's rows a block of ROW_BLOCK rows at a time gives, bit for bit, what it
    gives on the whole batch at once: the same sequences (greedy and sampled continuations), ids, log-probabilities
    and rests, with the one-sided teacher, the whitespace cap and the plausibility restriction (whose dense or sparse
    path is chosen for the whole batch: the two agree only to rounding)."""
    import pydetox.discover.distill.teacher as teacher
    from pydetox.discover.distill.params import DistillParams

    target, cal = trained
    prompts = ["the cat sat on", "a dog ran", "we saw the", "she said that it", "they went to"]
    p = DistillParams(calibrator=str(cal), alpha=0.9, max_new_tokens=8, max_tokens=16, samples=2, plausible=plausible,
                      one_sided=1.0, blank_cap=True)
    got = []
    for block in (512, 3):
        monkeypatch.setattr(teacher, "ROW_BLOCK", block)
        toxic, _ = teacher._teacher(target, p, prompts, ["a cat is a cat", "the dog"], False, [])
        got.append(toxic.arrays(""))
    assert got[0].keys() == got[1].keys()
    for k in got[0]:
        assert np.array_equal(got[0][k], got[1][k]), k


def test_teacher_batch_keeps_a_decode_s_vocabulary_wide_rows_under_its_budget() -> None:
    from pydetox.discover.distill.teacher import TEACHER_LOGITS, teacher_batch

    assert [teacher_batch(v) for v in (49152, 151936, 262144, 32000, 128256)] == [512, 128, 128, 512, 256]
    assert teacher_batch(10**7) == 32  # never fewer positions than 32, whatever the vocabulary
    for v in (1000, 49152, 151936, 262144):
        n = teacher_batch(v)
        assert n * v <= TEACHER_LOGITS
        assert n == 512 or 2 * n * v > TEACHER_LOGITS  # the largest that fits


def test_one_sided_teacher_is_the_unedited_distribution_lowered_where_the_fused_one_is_lower(
        trained: tuple[Path, Path]) -> None:
    """`one_sided`: at every position of every context the targets are log_softmax(log p + s * min(0, log p_fused -
    log p)) of the unedited p, read against a teacher-forced pass of both models; no token gains on the unedited model
    before renormalising, and the fused continuation of each prompt follows the targets' argmax. `one_sided_center`:
    the same with the change log p_fused - log p less its median over the unedited model's top_k likeliest tokens.
    `toxic_gate`: the lowering of each token weighted by `toxic_gate`'s weight for it."""
    from pydetox.discover.distill.params import DistillParams
    from pydetox.discover.distill.teacher import _teacher, toxic_gate
    from pydetox.fusion import FusedRuntime
    from pydetox.runtime import log_softmax

    target, cal = trained
    prompts = ["the cat sat on", "a dog ran", "we saw the", "she said that it"]
    for s, center, gated in ((1.0, False, False), (3.0, False, False), (1.0, True, False), (3.0, False, True)):
        p = DistillParams(calibrator=str(cal), alpha=0.9, max_new_tokens=8, max_tokens=16, plausible=0, one_sided=s,
                          one_sided_center=center, toxic_gate=gated, toxic_gate_from=0.0)
        toxic, _ = _teacher(target, p, prompts, [], False, [])
        n = max(len(q) for q in toxic.seqs)
        followed = set()
        with FusedRuntime(target, str(cal), 0.9, n_ctx=n, n_batch=n) as rt:
            gate = toxic_gate(rt, 0.0) if gated else 1.0
            if gated:  # the pairs weight some of this vocabulary's tokens, and leave most at 0
                assert 0 < np.count_nonzero(gate) < len(gate) / 2
            starts = [len(rt.tokenize(q)) for q in prompts]
            for q, ids, logp, g in zip(toxic.seqs, toxic.ids, toxic.logp, toxic.groups, strict=True):
                fused, base = rt.logprobs_and_target(q)
                shift = fused - base
                if center:
                    likeliest = np.argsort(-base, axis=1)[:, : p.top_k]
                    shift -= np.median(np.take_along_axis(shift, likeliest, axis=1), axis=1, keepdims=True)
                want = log_softmax(base + s * np.minimum(0.0, shift) * gate)[: len(q) - 1]
                np.testing.assert_allclose(np.take_along_axis(want, ids, axis=1), logp, atol=2e-3)
                if all(q[j + 1] == int(want[j].argmax()) for j in range(starts[g] - 1, len(q) - 1)):
                    followed.add(int(g))
        assert len(followed) >= len(prompts) - 1  # each prompt's fused continuation (a tie may break the other way)


def test_toxic_gate_weights_tokens_the_toxic_side_makes_likelier() -> None:
    """`gate_weights`: 0 for tokens both sides use alike (a function word, an identity word the paraphrases keep) and
    for tokens the toxic side uses under 3 times; 1 where the smoothed log-odds reach `start` + 1; linear between."""
    from pydetox.discover.distill.teacher import gate_weights

    # tokens: function word, identity word, profanity, rare, between; 10,000 uses a side
    toxic = np.array([5000.0, 40.0, 300.0, 2.0, 0.0])
    neutral = np.array([5000.0, 40.0, 0.0, 0.0, 0.0])
    toxic[4] = np.exp(1.5) * 20 - 1  # log-odds 1.5 against a neutral count of 19
    neutral[4] = 19
    toxic[0] += 10_000 - toxic.sum()
    neutral[0] += 10_000 - neutral.sum()
    w = gate_weights(toxic, neutral, 1.0)
    assert (w[[0, 1, 3]] == 0).all()
    assert w[2] == 1
    np.testing.assert_allclose(w[4], 0.5, atol=0.01)


def test_blank_cap_keeps_whitespace_tokens_at_the_unedited_probability_and_gives_their_gain_to_the_rest(
        trained: tuple[Path, Path]) -> None:
    """`blank_cap`: against a teacher-forced pass of both models, every whitespace-only token of the one-sided
    teacher's top-k holds at most the unedited probability (where uncapped it would hold more, at some positions), the
    other tokens keep their ratios to each other (scaled up by one factor per position), and the mass still sums to 1."""
    from pydetox.discover.distill.params import DistillParams
    from pydetox.discover.distill.teacher import _teacher, blank_tokens
    from pydetox.fusion import FusedRuntime
    from pydetox.runtime import log_softmax

    target, cal = trained
    prompts = ["the cat sat on", "a dog ran", "we saw the", "she said that it"]
    p = DistillParams(calibrator=str(cal), alpha=0.9, max_new_tokens=8, max_tokens=16, plausible=0, one_sided=1.0,
                      blank_cap=True)
    toxic, _ = _teacher(target, p, prompts, [], False, [])
    n = max(len(q) for q in toxic.seqs)
    gained = 0
    with FusedRuntime(target, str(cal), 0.9, n_ctx=n, n_batch=n) as rt:
        blank = blank_tokens(rt)
        assert len(blank) > 0
        assert all(not rt.detokenize([int(b)]).strip() for b in blank)
        for q, ids, logp, rest in zip(toxic.seqs, toxic.ids, toxic.logp, toxic.rest, strict=True):
            fused, base = rt.logprobs_and_target(q)
            want = log_softmax(base + np.minimum(0.0, fused - base))[: len(q) - 1]
            at_want = np.take_along_axis(want, ids, axis=1)
            at_base = np.take_along_axis(base[: len(q) - 1], ids, axis=1)
            capped = np.isin(ids, blank)
            gained += int((capped & (at_want > at_base + 0.05)).sum())
            assert (logp[capped] <= at_base[capped] + 2e-3).all()
            lift = np.where(capped, np.nan, logp - at_want)
            for row in lift:
                row = row[np.isfinite(row)]
                if len(row):
                    assert row.min() >= -2e-3
                    assert row.max() - row.min() < 2e-3
            np.testing.assert_allclose(np.exp(logp.astype(np.float64)).sum(1) + np.exp(rest.astype(np.float64)), 1.0,
                                       atol=1e-4)
    assert gained > 0  # some whitespace token would have gained: the cap was put to work


def test_distill_moves_the_model_toward_the_fused_teacher_and_llama_cpp_runs_the_edit(
        trained: tuple[Path, Path], tmp_path: Path) -> None:
    """`distill` on the tiny model and its calibrator: held-out KL to the fused teacher on toxic contexts falls, the
    clean-text term keeps the KL to the unedited model down, the plan is one low-rank edit per down-projection from the
    chosen layer on, and llama.cpp's log-probabilities of the applied plan equal torch's with W + L^T R."""
    import torch

    from pydetox.apply import ApplyOptions, apply_plan
    from pydetox.discover import Discovery
    from pydetox.discover.distill.data import _first_half
    from pydetox.discover.model import FullPrecisionModel
    from pydetox.errors import PydetoxError
    from pydetox.plan import EditKind

    target, cal = trained
    disc = Discovery(target, n_pairs=8, progress=False)
    settings = {"calibrator": str(cal), "alpha": "0.9", "max_prompts": "24", "pairs": "24", "clean_texts": "24",
                "steps": "60", "lr": "0.03", "clean_weight": "0.1", "rank": "4", "batch": "4", "first_layer": "1",
                "max_tokens": "32", "cache": str(tmp_path / "teacher.npz")}
    plan = disc.plan("distill", settings)
    diag = plan.params["diagnostics"]
    assert not diag["teacher_from_cache"]
    assert not diag["clean_targets_from_cache"]
    assert (tmp_path / "teacher.npz").is_file()
    assert (tmp_path / "teacher.clean.npz").is_file()
    assert diag["held_out_after"]["teacher_kl"] < 0.7 * diag["held_out_before"]["teacher_kl"], diag
    # The clean-text term holds the model where it was (a random tiny model has no toxic contexts to tell apart,
    # so the teacher's pull shows on clean text too): ten times its weight, a fraction of the clean KL.
    anchored = disc.plan("distill", {**settings, "clean_weight": "10"}).params["diagnostics"]
    # the teacher's targets come back from the cache: same sequences, same distributions (same loss before training)
    assert anchored["teacher_from_cache"]
    assert anchored["clean_targets_from_cache"]  # and the unedited model's on the clean sequences: the same loss
    assert anchored["toxic_sequences"] == diag["toxic_sequences"]
    assert anchored["held_out_before"] == diag["held_out_before"]
    # another training seed: the same teacher (from the cache) and held-out split, another start for the update
    one = disc.plan("distill", {**settings, "steps": "1"})
    reseeded = disc.plan("distill", {**settings, "steps": "1", "train_seed": "1"})
    assert reseeded.params["diagnostics"]["teacher_from_cache"]
    assert reseeded.params["diagnostics"]["held_out_before"] == diag["held_out_before"]
    assert not np.allclose(reseeded.edits[0].b, one.edits[0].b)
    # the exact clean KL over the whole vocabulary (never below the bucketed one) anchors as well
    exact = disc.plan("distill", {**settings, "clean_weight": "10", "clean_kl": "full"}).params["diagnostics"]
    assert exact["teacher_from_cache"]
    assert exact["held_out_before"]["clean_kl"] == 0  # the update starts at zero: edited == unedited
    assert exact["held_out_after"]["teacher_kl"] < exact["held_out_before"]["teacher_kl"]
    assert exact["held_out_after"]["clean_kl"] < 0.3 * diag["held_out_after"]["clean_kl"], (exact, diag)
    # an anti-expert (here the calibrator itself stands in for one: any calibrator GGUF runs the same way) shifts the
    # targets: the teacher comes from the cache, the shift is computed once, then read from its own cache file
    anti = {**settings, "steps": "1", "anti": str(cal), "anti_lambda": "200"}
    shifted = disc.plan("distill", anti).params["diagnostics"]
    assert shifted["teacher_from_cache"]
    assert not shifted["anti_from_cache"]
    assert (tmp_path / "teacher.anti.npz").is_file()
    assert shifted["held_out_before"]["teacher_kl"] != diag["held_out_before"]["teacher_kl"]
    again = disc.plan("distill", {**anti, "anti_lambda": "50"}).params["diagnostics"]
    assert again["anti_from_cache"]  # anti_lambda is applied to the cached log-probabilities
    assert again["held_out_before"]["teacher_kl"] != shifted["held_out_before"]["teacher_kl"]
    with pytest.raises(PydetoxError, match="expected an anti-expert GGUF"):
        disc.plan("distill", {**anti, "anti": str(tmp_path / "none.gguf")})
    # the expert in place of the unedited model: an expert the same as the anti-expert cancels it exactly (the
    # teacher as it was), its log-probabilities in their own cache file, the anti-expert's read from theirs
    same = disc.plan("distill", {**anti, "expert": str(cal)}).params["diagnostics"]
    assert (tmp_path / "teacher.expert.npz").is_file()
    assert not same["anti_from_cache"]  # the expert's were computed
    plain = disc.plan("distill", {**settings, "steps": "1"}).params["diagnostics"]["held_out_before"]
    assert same["held_out_before"]["teacher_kl"] == pytest.approx(plain["teacher_kl"], rel=1e-5)
    assert shifted["held_out_before"]["teacher_kl"] != pytest.approx(plain["teacher_kl"], rel=1e-3)
    assert disc.plan("distill", {**anti, "expert": str(cal)}).params["diagnostics"]["anti_from_cache"]
    with pytest.raises(PydetoxError, match="an expert needs an anti-expert"):
        disc.plan("distill", {**settings, "expert": str(cal)})
    with pytest.raises(PydetoxError, match="anti_rule is 'prob' or 'ratio'"):
        disc.plan("distill", {**anti, "anti_rule": "log"})
    with pytest.raises(PydetoxError, match="toxic_gate weights the one-sided teacher"):
        disc.plan("distill", {**settings, "toxic_gate": "1", "one_sided": "0"})
    # trained on a restricted vocabulary (every target token, then the unedited model's most likely ones): it still
    # learns, and the held-out figures stay over the whole vocabulary (same before-training numbers as `exact`)
    small = disc.plan("distill", {**settings, "clean_weight": "10", "clean_kl": "full", "top_k": "4",
                                  "vocab": "64"}).params["diagnostics"]
    assert 64 <= small["vocab"]["tokens"] < small["vocab"]["of"] == 275, small["vocab"]
    assert 0.5 < small["vocab"]["mass_clean"] <= 1
    assert 0.5 < small["vocab"]["mass_toxic"] <= 1
    assert small["held_out_after"]["teacher_kl"] < small["held_out_before"]["teacher_kl"]
    with pytest.raises(PydetoxError, match="clean_kl is 'top' or 'full'"):
        disc.plan("distill", {**settings, "clean_kl": "tail"})
    other = disc.plan("distill", {**settings, "alpha": "0.5", "steps": "1"}).params["diagnostics"]
    assert not other["teacher_from_cache"]  # another teacher: recomputed (and the cache now holds it)
    assert anchored["held_out_after"]["clean_kl"] < 0.3 * diag["held_out_after"]["clean_kl"], (anchored, diag)
    # further toxic sentences, cut to their first half, as more prompts: another teacher, more contexts
    more = disc.plan("distill", {**settings, "steps": "1", "pair_prompts": "8"}).params["diagnostics"]
    assert not more["teacher_from_cache"]
    assert diag["discovery_prompts"] < more["discovery_prompts"] <= diag["discovery_prompts"] + 8
    assert more["toxic_sequences"] > diag["toxic_sequences"]
    assert more["held_out_contexts"] <= more["held_out_toxic_sequences"] < more["toxic_sequences"]
    assert _first_half("you people are really stupid") == "you people"
    assert _first_half("shut up now") == ""
    with pytest.raises(PydetoxError, match="pairs \\+ pair_prompts must be at most"):
        disc.plan("distill", {**settings, "pair_prompts": "100000"})
    assert [(e.tensor, e.kind) for e in plan.edits] == [(f"blk.{i}.ffn_down.weight", EditKind.LOW_RANK) for i in (1, 2)]
    out = tmp_path / "d.gguf"
    apply_plan(plan, target, out, ApplyOptions(progress=False))
    fp = FullPrecisionModel(target, progress=False)
    with LlamaRuntime(target, n_ctx=128) as rt:
        ids = rt.tokenize("and of to in the a cat is a dog was in the")
        lp0 = rt.logprobs(ids)
    with LlamaRuntime(out, n_ctx=128) as rt:
        lp = rt.logprobs(ids)
    with torch.no_grad():
        ref0 = torch.log_softmax(fp.model(torch.tensor([ids])).logits[0, :-1], dim=-1).numpy()
        for e in plan.edits:
            fp.down_proj(int(e.tensor.split(".")[1])).weight += torch.from_numpy(e.a.T @ e.b)
        ref = torch.log_softmax(fp.model(torch.tensor([ids])).logits[0, :-1], dim=-1).numpy()
    # llama.cpp and torch differ by float noise on this tiny model already (~1e-2 nats unedited); the edit moves
    # log-probabilities by nats, and llama.cpp's edited model sits within that noise of torch's W + L^T R.
    noise = max(np.abs(lp0 - ref0).max(), 1e-3)
    assert np.abs(lp - lp0).max() > 50 * noise
    assert np.abs(lp - ref).max() < 2 * noise, (np.abs(lp - ref).max(), noise)
    with pytest.raises(PydetoxError, match="needs a calibrator"):
        disc.plan("distill", {})


def test_anti_expert_decay_by_hand() -> None:
    """The teacher's top-k probabilities times exp(lam * min(0, p_unedited - p_anti)), renormalised with the rest
    bucket: a token the anti-expert makes likelier loses mass, one it makes less likely gains nothing of its own (only
    its share of the renormalisation), and it sums to one."""
    from pydetox.discover.distill.teacher import _debiased, _Targets

    lp = np.log(np.array([[0.5, 0.3, 0.1]], np.float32))
    rest = np.log(np.array([0.1], np.float32))
    t = _Targets([[1, 2]], [np.array([[7, 8, 9]])], [lp], [rest], np.array([0]))
    unedited = np.array([[0.2, 0.3, 0.1]])
    anti = np.array([[0.3, 0.1, 0.1]])  # token 7 up by 0.1 under the anti-expert, token 8 down by 0.2
    both = [np.log(np.stack([unedited, anti])).astype(np.float32)]
    s = _debiased(t, both, 10.0)
    p = np.exp(s.logp[0][0].astype(np.float64))
    kept = np.array([0.5 * np.exp(-1.0), 0.3, 0.1])
    assert np.allclose(p, kept / (kept.sum() + 0.1), atol=1e-6)
    assert np.isclose(p.sum() + np.exp(s.rest[0][0]), 1.0, atol=1e-6)
    assert np.allclose(np.exp(_debiased(t, both, 0.0).logp[0]), np.exp(lp), atol=1e-6)  # lambda 0: the teacher as it was
    spared = np.exp(_debiased(t, both, 10.0, np.array([7])).logp[0][0])  # a special token keeps its mass
    assert np.allclose(spared, np.exp(lp[0]), atol=1e-6)
    # the ratio rule: token 7 is 1.5x likelier under the anti-expert; past a margin of 1.2 by 1.25x, divided by that
    ratio = np.exp(_debiased(t, both, 1.0, rule="ratio", margin=1.2).logp[0][0].astype(np.float64))
    kept = np.array([0.5 / 1.25, 0.3, 0.1])
    assert np.allclose(ratio, kept / (kept.sum() + 0.1), atol=1e-6)
    assert np.allclose(np.exp(_debiased(t, both, 1.0, rule="ratio", margin=2.0).logp[0]), np.exp(lp), atol=1e-6)


def test_distill_holds_out_whole_contexts() -> None:
    from pydetox.discover.distill.data import _split_by_group

    groups = np.repeat(np.arange(40), np.arange(40) % 3 + 1)  # 40 contexts of one to three sequences each
    val, train = _split_by_group(groups, np.random.default_rng(0))
    assert sorted(val + train.tolist()) == list(range(len(groups)))
    assert len(set(groups[val])) == 4  # a tenth of the contexts, each whole
    assert not set(groups[val]) & set(groups[train])
    val1, _ = _split_by_group(np.zeros(3, np.int64), np.random.default_rng(0))
    assert val1 == [0, 1, 2]  # at least one context held out


def test_distill_targets_drop_tokens_the_unedited_model_finds_implausible() -> None:
    """The teacher's distribution restricted to the plausible tokens and renormalized over them: a junk token the
    teacher likes is not a target, and the top-k plus the rest bucket still hold probability 1."""
    from pydetox.discover.distill.teacher import _top

    teacher = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))  # token 0: junk the teacher likes
    base = np.log(np.array([[1e-6, 0.6, 0.3, 0.1 - 1e-6]]))
    ids, lp, rest = _top(teacher, 2, base >= base.max(axis=1, keepdims=True) + np.log(1e-3))
    assert sorted(ids[0].tolist()) == [1, 2]
    np.testing.assert_allclose(np.exp(lp[0][np.argsort(ids[0])]), [0.6, 0.3], rtol=1e-6)
    np.testing.assert_allclose(np.exp(lp).sum() + np.exp(rest[0]), 1.0, rtol=1e-6)
    ids, lp, _ = _top(teacher, 3, np.array([[False, True, False, False]]))  # fewer plausible tokens than k
    assert np.isfinite(lp).all()
    assert np.exp(lp).sum() == pytest.approx(1.0)


def test_plausible_top_k_on_the_masked_tokens_equals_the_whole_row_computation() -> None:
    from pydetox.discover.distill.teacher import _top, _top_dense, _top_plausible

    rng = np.random.default_rng(0)
    logits = 3 * rng.standard_normal((40, 20000))
    logp = (logits - np.log(np.exp(logits).sum(1, keepdims=True))).astype(np.float32)
    mask = np.zeros(logp.shape, bool)
    for i, n in enumerate(rng.integers(1, 80, len(mask))):  # 1 to 79 plausible tokens per position
        mask[i, rng.choice(mask.shape[1], n, replace=False)] = True
    assert mask.sum(1).min() < 32 < mask.sum(1).max()  # rows with fewer plausible tokens than k, and with more
    dense, sparse = _top_dense(logp, 32, mask), _top_plausible(logp, 32, mask)
    for i in range(len(logp)):
        want = {int(j): float(v) for j, v in zip(dense[0][i], dense[1][i], strict=True) if v > -1e4}
        got = {int(j): float(v) for j, v in zip(sparse[0][i], sparse[1][i], strict=True) if v > -1e4}
        assert want.keys() == got.keys()
        assert [got[j] for j in want] == pytest.approx(list(want.values()), abs=1e-5)
        assert len(set(sparse[0][i].tolist())) == 32  # padding slots: other ids, no mass, never a repeat
    np.testing.assert_allclose(np.exp(sparse[2]), np.exp(dense[2]), atol=1e-5)
    assert _top(logp, 32, mask)[0].tolist() == sparse[0].tolist()  # a sparse mask takes the sparse path


def test_restricted_vocabulary_log_probabilities_are_the_full_ones_renormalised(trained: tuple[Path, Path]) -> None:
    """distill's training forward with a restricted output layer gives the whole vocabulary's logits on those rows,
    renormalised over them, at every position but the last of each sequence, padding left out."""
    import types

    import torch

    from pydetox.discover.distill.student import _forward
    from pydetox.discover.model import FullPrecisionModel

    fp = FullPrecisionModel(trained[0], progress=False)
    ctx = types.SimpleNamespace(fp=fp)
    seqs = [[1, 260, 261, 262, 263, 264], [1, 265, 266]]
    keep = torch.tensor([2, 5, 259, 260, 262, 270, 274])
    full = _forward(ctx, seqs)  # type: ignore[arg-type]
    with torch.no_grad():
        want = torch.cat([torch.log_softmax(fp.model(torch.tensor([s])).logits[0, :-1], -1) for s in seqs])
        part = _forward(ctx, seqs, fp.model.get_output_embeddings().weight[keep])  # type: ignore[arg-type]
    assert full.shape == (5 + 2, 275)
    torch.testing.assert_close(full, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(part, torch.log_softmax(full[:, keep], -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("cap", "restricted"), [(None, False), (None, True), (5.0, False)],
                         ids=["whole", "restricted", "softcap"])
def test_distill_loss_streamed_over_the_output_layer_equals_autograd_through_the_log_softmax(
        trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, cap: float | None, restricted: bool) -> None:
    """The student's KL with its gradient in closed form, streamed over chunks of the output layer (running
    log-sum-exp), gives the loss and the update's gradients of autograd through the whole batch's log-softmax
    (`_kl(_forward(...))`)."""
    import types

    import torch

    from pydetox.discover.distill import student
    from pydetox.discover.distill.teacher import _Targets, _top
    from pydetox.discover.model import FullPrecisionModel

    fp = FullPrecisionModel(trained[0], progress=False)
    monkeypatch.setattr(fp.model.config, "final_logit_softcapping", cap, raising=False)
    ctx = types.SimpleNamespace(fp=fp)
    seqs = [[1, 260, 261, 262, 263, 264, 265], [1, 266, 267], [1, 268, 269, 270, 271]]
    keep = torch.tensor([2, 5, 100, 259, *range(260, 275)])
    vocab = types.SimpleNamespace(head=fp.unembedding()[keep], ids=lambda i: np.searchsorted(keep.numpy(), i))
    n_vocab = len(keep) if restricted else 275
    rng = np.random.default_rng(0)
    logits = [2 * rng.standard_normal((len(q) - 1, n_vocab)) for q in seqs]
    parts = [_top((z - np.log(np.exp(z).sum(1, keepdims=True))).astype(np.float32), 6) for z in logits]
    ids = [keep.numpy()[p[0]] if restricted else p[0] for p in parts]  # targets name full-vocabulary ids
    t = _Targets(seqs, ids, [p[1] for p in parts], [p[2] for p in parts], np.arange(3))
    lora = student._LoRA(ctx, [0, 1], 4, seed=1)  # type: ignore[arg-type]
    with torch.no_grad():
        for b in lora.B:
            b.normal_(0, 0.1)
    v = vocab if restricted else None

    def loss_and_grads(kl_of: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for q in lora.params():
            q.grad = None
        kl = kl_of()
        (kl * torch.linspace(0.5, 1.5, len(kl))).sum().backward()  # a different weight per position
        return kl.detach(), [q.grad.clone() for q in lora.params()]

    def reference() -> torch.Tensor:
        lq = student._forward(ctx, seqs, None if v is None else v.head)  # type: ignore[arg-type]
        full = np.concatenate(ids)
        idx = torch.from_numpy(full if v is None else v.ids(full))
        return student._kl(lq, idx, torch.from_numpy(np.concatenate(t.logp)), torch.from_numpy(np.concatenate(t.rest)))

    want, g_want = loss_and_grads(reference)
    monkeypatch.setattr(student, "OUTPUT_ROWS", 8)  # the output layer 8 rows at a time: 35 chunks (3 restricted)
    got, g_got = loss_and_grads(lambda: student._batch_kl(ctx, t, [0, 1, 2], v))  # type: ignore[arg-type]
    assert want.shape == (12,)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for a, b in zip(g_got, g_want, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(student._batch_kl(ctx, t, [0, 1, 2], v), want, atol=1e-6, rtol=1e-5)  # type: ignore[arg-type]
    lora.close()


def test_recomputed_layers_give_the_same_loss_and_update_gradients(trained: tuple[Path, Path]) -> None:
    """`recompute`: the edited decoder layers keep only their inputs and run again in the backward pass; the loss and
    the update's gradients are those of the plain pass (the same operations, computed twice), under bfloat16
    autocast as the recipe trains; closing it gives the layers back their own forward."""
    import types

    import torch

    from pydetox.discover.distill import student
    from pydetox.discover.distill.teacher import _Targets, _top
    from pydetox.discover.model import FullPrecisionModel

    fp = FullPrecisionModel(trained[0], progress=False)
    fp.model.requires_grad_(False)
    ctx = types.SimpleNamespace(fp=fp)
    seqs = [[1, 260, 261, 262, 263, 264, 265], [1, 266, 267], [1, 268, 269, 270, 271]]
    rng = np.random.default_rng(0)
    parts = [_top(np.log(rng.dirichlet(np.ones(275), len(q) - 1)).astype(np.float32), 6) for q in seqs]
    t = _Targets(seqs, [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts], np.arange(3))
    lora = student._LoRA(ctx, [1, 2], 4, seed=1)  # type: ignore[arg-type]
    with torch.no_grad():
        for b in lora.B:
            b.normal_(0, 0.1)

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        for q in lora.params():
            q.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kl = student._batch_kl(ctx, t, [0, 1, 2]).mean()  # type: ignore[arg-type]
        kl.backward()
        return kl.detach(), [q.grad.clone() for q in lora.params()]

    calls = []
    # a pre-hook: the recomputation stops once it has what the backward pass needs, which can be before a
    # module's own forward hooks
    counter = fp.down_proj(2).register_forward_pre_hook(lambda *_: calls.append(1))
    want, g_want = loss_and_grads()
    assert len(calls) == 1
    layers = [fp.spec.layers(fp.model)[i] for i in (1, 2)]
    recompute = student._Recompute(torch, layers)
    got, g_got = loss_and_grads()
    assert len(calls) == 3  # the layer ran again in the backward pass
    counter.remove()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for a, b in zip(g_got, g_want, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    recompute.close()
    assert all("forward" not in layer.__dict__ for layer in layers)
    lora.close()


def test_special_tokens_read_from_the_vocabulary_alone_are_the_runtimes(trained: tuple[Path, Path],
                                                                        tmp_path: Path) -> None:
    """`special_tokens` loads the vocabulary only (no weights) and names the tokens a full llama.cpp runtime treats
    as end of generation, and with them the control tokens."""
    from pydetox.errors import RuntimeUnavailableError
    from pydetox.runtime import LlamaRuntime, special_tokens

    target = trained[0]
    with LlamaRuntime(target, n_ctx=16) as rt:
        eog = [t for t in range(rt.n_vocab) if rt.is_eog(t)]
        control = [t for t in range(rt.n_vocab) if rt.lib.llama_vocab_is_control(rt.vocab, t)]
    assert eog
    assert special_tokens(target, eog_only=True) == eog
    assert special_tokens(target) == sorted(set(eog) | set(control))
    assert special_tokens(target, [5, *eog, 7], eog_only=True) == eog
    with pytest.raises(RuntimeUnavailableError, match="expected a GGUF model at"):
        special_tokens(tmp_path / "absent.gguf")


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_the_step_interface_forks_a_sequence_like_decoding_it_again(trained: tuple[Path, Path], fused: bool) -> None:
    """decode / copy_sequence / logits / target_logits / clear, as discovery drives them: a sequence forked after
    its prompt continues exactly as the same tokens decoded from scratch (both contexts of a fused runtime fork)."""
    target, cal = trained
    prompt, nxt = [1, 260, 261, 262, 263], 264

    def make() -> LlamaRuntime:
        return FusedRuntime(target, cal, 0.5, n_ctx=64, n_seq=2) if fused else LlamaRuntime(target, n_ctx=64, n_seq=2)

    with make() as rt:
        rt.decode([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        rt.copy_sequence(0, 1)
        rt.decode([(nxt, len(prompt), 0, True), (nxt, len(prompt), 1, True)])
        forked = rt.logits(2).copy()
        own = rt.target_logits(2).copy()
        rt.clear()
        rt.decode([(t, i, 1, True) for i, t in enumerate([*prompt, nxt])])
        fresh = rt.logits(len(prompt) + 1)[-1].copy()
    np.testing.assert_allclose(forked[0], forked[1], rtol=0, atol=1e-4)
    np.testing.assert_allclose(forked[1], fresh, rtol=0, atol=1e-3)
    assert (not np.allclose(own, forked, atol=1e-3)) if fused else np.array_equal(own, forked)
    with pytest.raises(Exception, match="over this runtime's n_batch"), LlamaRuntime(target, n_ctx=64, n_batch=4) as small:
        small.decode([(t, i, 0, False) for i, t in enumerate(prompt)])


def test_distill_benign_starts_join_the_clean_text_continued_by_the_unedited_model(
        trained: tuple[Path, Path], tmp_path: Path) -> None:
    """`benign_starts`: wiki sentence starts (never the held-out paragraphs) continued greedily by the unedited
    model are added to the clean sequences; the teacher's cache is the same with or without them."""
    from pydetox.discover import Discovery
    from pydetox.discover.distill.data import _benign_continuations
    from pydetox.discover.distill.params import DistillParams

    target, cal = trained
    seqs = _benign_continuations(target, DistillParams(benign_starts=6, max_new_tokens=5), False)
    assert len(seqs) == 6
    with LlamaRuntime(target, n_ctx=256) as rt:
        for s in seqs:  # each is a start followed by what the unedited model says next, greedily (<= 5 tokens)
            assert any(rt.generate([s[:k]], 5, Sampling(), [0])[0] == s[k:] for k in range(max(1, len(s) - 5), len(s)))
    disc = Discovery(target, n_pairs=8, progress=False)
    settings = {"calibrator": str(cal), "alpha": "0.9", "max_prompts": "8", "pairs": "8", "clean_texts": "8",
                "steps": "2", "rank": "2", "batch": "2", "first_layer": "1", "max_tokens": "32",
                "cache": str(tmp_path / "teacher.npz")}
    plain = disc.plan("distill", settings).params["diagnostics"]
    more = disc.plan("distill", {**settings, "benign_starts": "6"}).params["diagnostics"]
    assert more["teacher_from_cache"]
    assert more["clean_sequences"] == plain["clean_sequences"] + 6
    chat = disc.plan("distill", {**settings, "chat_starts": "4", "chat_tokens": "5"}).params["diagnostics"]
    assert chat["teacher_from_cache"]
    assert chat["clean_sequences"] == plain["clean_sequences"] + 4
    # the continuations are kept beside the teacher's cache and read back, not computed again
    from pydetox.discover.distill import teacher

    assert (tmp_path / "teacher.benign.npz").is_file()
    assert (tmp_path / "teacher.chat.npz").is_file()

    def refuse(*_: object) -> list[list[int]]:
        raise AssertionError("computed again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(teacher, "_benign_continuations", refuse)
        again = disc.plan("distill", {**settings, "benign_starts": "6"}).params["diagnostics"]
    assert again["clean_sequences"] == more["clean_sequences"]
    assert again["held_out_before"] == more["held_out_before"]


def test_distill_computes_the_unedited_targets_of_the_clean_sequences_its_steps_draw(
        trained: tuple[Path, Path], tmp_path: Path) -> None:
    """A student computes the unedited model's targets only for the clean sequences its steps draw and the held-out
    ones; another run's draws add theirs to the same cache, `prepare_targets` (the sweep's shared stage) completes
    it, and what was computed piecemeal equals what one full pass computes."""
    from pydetox.discover import Discovery
    from pydetox.discover.distill import prepare_targets

    target, cal = trained
    disc = Discovery(target, n_pairs=8, progress=False)
    settings = {"calibrator": str(cal), "alpha": "0.9", "max_prompts": "8", "pairs": "24", "clean_texts": "24",
                "steps": "2", "rank": "2", "batch": "2", "first_layer": "1", "max_tokens": "32", "held_out": "2",
                "cache": str(tmp_path / "a.npz")}
    first = disc.plan("distill", settings).params["diagnostics"]
    assert not first["clean_targets_from_cache"]
    with np.load(tmp_path / "a.clean.npz") as z:
        have = z["c_have"].copy()
    n = first["clean_sequences"]
    assert 4 <= have.sum() <= 2 * 2 + 2 < n  # two steps of two, two held out
    again = disc.plan("distill", settings).params["diagnostics"]  # the same draws: nothing to compute
    assert again["clean_targets_from_cache"]
    assert again["held_out_after"] == first["held_out_after"]
    other = disc.plan("distill", {**settings, "train_seed": "5"}).params["diagnostics"]
    with np.load(tmp_path / "a.clean.npz") as z:
        grown = z["c_have"].copy()
    assert not other["clean_targets_from_cache"]
    assert (grown >= have).all()
    assert grown.sum() > have.sum()
    assert not prepare_targets(disc.context, settings)["clean_targets_from_cache"]
    assert prepare_targets(disc.context, settings)["clean_targets_from_cache"]
    assert not prepare_targets(disc.context, {**settings, "cache": str(tmp_path / "b.npz")})["clean_targets_from_cache"]
    with np.load(tmp_path / "a.clean.npz") as a, np.load(tmp_path / "b.clean.npz") as b:
        assert "c_have" not in a
        assert "c_have" not in b
        assert np.array_equal(a["c_tokens"], b["c_tokens"])
        np.testing.assert_allclose(a["c_logp"], b["c_logp"], atol=1e-4)
        np.testing.assert_allclose(a["c_rest"], b["c_rest"], atol=1e-4)
        assert (a["c_ids"] == b["c_ids"]).mean() > 0.99


def test_distill_unedited_targets_a_block_of_positions_at_a_time_equal_the_whole_batchs(
        trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """`_base_targets` holds the vocabulary-wide log-softmax of TARGET_ROWS positions at a time: its top-k targets
    are those of one log-softmax over the whole batch's positions."""
    import types

    import torch

    from pydetox.discover.distill import student
    from pydetox.discover.model import FullPrecisionModel

    fp = FullPrecisionModel(trained[0], progress=False)
    ctx = types.SimpleNamespace(fp=fp)
    rng = np.random.default_rng(0)
    seqs = [[1, *rng.integers(3, 275, n).tolist()] for n in (9, 4, 12, 7, 2)]
    monkeypatch.setattr(student, "TARGET_ROWS", 5)  # 38 positions in 8 blocks, one of them across sequences
    got = student._base_targets(ctx, seqs, 6, progress=False, batch=4)
    with torch.no_grad():
        top, idx = student._forward(ctx, seqs).topk(6, dim=1)
    assert np.array_equal(np.concatenate(got.ids), idx.numpy())
    np.testing.assert_allclose(np.concatenate(got.logp), top.numpy(), atol=1e-6)
    assert [len(i) for i in got.ids] == [len(q) - 1 for q in seqs]


def test_schedule_draws_what_drawing_step_by_step_draws() -> None:
    """`_schedule` draws every step's batches before training, in the order the steps drew them."""
    from pydetox.discover.distill.params import DistillParams
    from pydetox.discover.distill.student import _schedule

    p = DistillParams(steps=7, batch=3)
    train_t, train_c = np.arange(40), np.arange(100, 130)
    gen = np.random.default_rng([1, 2])
    expected = [(gen.choice(train_t, 3, replace=False).tolist(), gen.choice(train_c, 3, replace=False).tolist())
                for _ in range(7)]
    assert _schedule(p, np.random.default_rng([1, 2]), [], [], train_t, train_c) == expected


def test_distill_chat_starts_are_answers_of_the_unedited_model_in_its_chat_format(trained: tuple[Path, Path]) -> None:
    """`chat_starts`: wiki sentences asked as the chat check asks (the GGUF's template, here none: "Question:
    ...\nAnswer:"), each followed by the unedited model's greedy answer."""
    from pydetox.discover.distill.data import _chat_continuations
    from pydetox.discover.distill.params import DistillParams
    from pydetox.helpfulness import chat_prompt

    target, _ = trained
    seqs = _chat_continuations(target, DistillParams(chat_starts=3, chat_tokens=4), False)
    assert len(seqs) == 3
    ending = chat_prompt(None, "QQQ").split("QQQ")[-1]  # "\nAnswer:"
    with LlamaRuntime(target, n_ctx=512) as rt:
        for s in seqs:  # the question in the chat check's format, then the unedited model's greedy answer (<= 4)
            assert any(rt.detokenize(s[:k]).endswith(ending) and rt.generate([s[:k]], 4, Sampling(), [0])[0] == s[k:]
                       for k in range(len(s) - 4, len(s)))


def test_distill_eog_free_leaves_no_direct_push_on_end_of_generation(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """`eog_free`: the trained update's output directions lose their component along the end-of-generation tokens'
    logit-lens rows (against the vocabulary's mean), so the edit cannot raise those logits directly; the rest of
    the update stays."""
    from pydetox.discover import Discovery
    from pydetox.discover.base import final_gain
    from pydetox.runtime import LlamaRuntime

    target, cal = trained
    disc = Discovery(target, n_pairs=8, progress=False)
    settings = {"calibrator": str(cal), "alpha": "0.9", "max_prompts": "8", "pairs": "8", "clean_texts": "8",
                "steps": "3", "rank": "2", "batch": "2", "first_layer": "1", "max_tokens": "32", "lr": "0.05",
                "cache": str(tmp_path / "teacher.npz")}
    plain = disc.plan("distill", settings)
    free = disc.plan("distill", {**settings, "eog_free": "1"})
    fp = disc.fp
    with LlamaRuntime(target, n_ctx=16) as rt:
        eog = [t for t in range(fp.unembedding().shape[0]) if rt.is_eog(t)]
    assert eog
    w = fp.unembedding().double().numpy()
    rows = (w[eog] - w.mean(0)) * final_gain(disc.context)  # (n_eog, d)
    for e, f in zip(plain.edits, free.edits, strict=True):
        pushed = np.abs(rows @ e.a.T).max()  # a: (rank, d) output directions of the low-rank edit
        assert pushed > 1e-4
        assert np.abs(rows @ f.a.T).max() < 1e-5 * pushed + 1e-7
        np.testing.assert_allclose(f.b, e.b)  # the input side is the trained one
        removed = np.linalg.norm(e.a - f.a) / np.linalg.norm(e.a)
        assert 0 < removed < 0.9
