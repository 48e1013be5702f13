"""`pydetox eval` end to end: on tiny llama models written in the test (fast) and on SmolLM2 (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny import write_tiny_llama

from pydetox.capability import capability
from pydetox.cli import main
from pydetox.evaluate import EvalSettings, evaluate_models, report_json
from pydetox.prompts import PromptSet
from pydetox.runtime import LlamaRuntime, Sampling
from pydetox.scorers import get_scorer

PROMPTS = PromptSet("test", ["the cat", "a dog is", "the dog was", "in the"])


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("evalmodels")
    shape = {"d": 64, "ff": 128, "heads": 2, "kv_heads": 1}
    return write_tiny_llama(d / "a.gguf", **shape), write_tiny_llama(d / "b.gguf", **shape, seed=9)


def test_generation_is_reproducible_and_respects_limits(tiny_pair: tuple[Path, Path]) -> None:
    with LlamaRuntime(tiny_pair[0], n_ctx=512, n_seq=4) as rt:
        toks = [rt.tokenize(p) for p in PROMPTS.prompts]
        greedy = rt.generate(toks, 8, Sampling(), seeds=[0, 1, 2, 3])
        assert greedy == rt.generate(toks, 8, Sampling(), seeds=[0, 1, 2, 3])
        assert all(len(g) <= 8 for g in greedy)
        sampled = rt.generate(toks, 8, Sampling(temperature=1.0, top_p=0.95), seeds=[5, 6, 7, 8])
        assert sampled == rt.generate(toks, 8, Sampling(temperature=1.0, top_p=0.95), seeds=[5, 6, 7, 8])
        assert sampled != rt.generate(toks, 8, Sampling(temperature=1.0, top_p=0.95), seeds=[50, 60, 70, 80])
        with pytest.raises(ValueError, match="sequences"):
            rt.generate(toks + toks, 8, Sampling(), seeds=list(range(8)))


def test_ignore_eos_runs_every_continuation_to_the_limit(tmp_path: Path) -> None:
    """The same random model twice, the second declaring as end of text a token the first generates greedily:
    the second stops before it, and with `ignore_eos` it writes max_tokens tokens, never that one."""
    shape = {"d": 64, "ff": 128, "heads": 2, "kv_heads": 1}
    with LlamaRuntime(write_tiny_llama(tmp_path / "a.gguf", **shape), n_ctx=512, n_seq=4) as rt:
        toks = [rt.tokenize(p) for p in PROMPTS.prompts]
        free = rt.generate(toks, 8, Sampling(), seeds=[0, 1, 2, 3])
    eos = free[0][2]
    with LlamaRuntime(write_tiny_llama(tmp_path / "b.gguf", **shape, eos=eos), n_ctx=512, n_seq=4) as rt:
        assert rt.is_eog(eos)
        stopped = rt.generate(toks, 8, Sampling(), seeds=[0, 1, 2, 3])
        assert stopped[0] == free[0][:2]
        for sampling in (Sampling(ignore_eos=True), Sampling(temperature=1.0, ignore_eos=True)):
            full = rt.generate(toks, 8, sampling, seeds=[0, 1, 2, 3])
            assert [len(g) for g in full] == [8] * 4
            assert all(eos not in g for g in full)
    assert Sampling(ignore_eos=True).describe() == "greedy, end of text banned"


def test_perplexity_matches_a_direct_computation_and_kl_is_zero_against_itself(tiny_pair: tuple[Path, Path]) -> None:
    docs = ["the cat was in the dog. " * 20]
    with LlamaRuntime(tiny_pair[0], n_ctx=64, n_batch=64) as a, LlamaRuntime(tiny_pair[0], n_ctx=64, n_batch=64) as a2, \
            LlamaRuntime(tiny_pair[1], n_ctx=64, n_batch=64) as b:
        cap = capability(a, docs, reference=a2, max_tokens=128, window=64, progress=False)
        assert a.tokenize("") == [1]  # the tiny tokenizer adds BOS, as Gemma's does: every window starts with it
        tokens = a.tokenize(docs[0], add_special=False)[:128]
        nll = []
        for i in range(0, 128, 63):
            w = [1, *tokens[i : i + 63]]
            lp = a.logprobs(w)
            nll += [-lp[j, w[j + 1]] for j in range(len(w) - 1)]
        assert cap.perplexity == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-5)
        assert cap.n_tokens == 128  # every token of the text predicted once
        assert abs(cap.kl) < 1e-5  # same weights, same runtime
        other = capability(b, docs, reference=a, max_tokens=128, window=64, progress=False)
        assert other.kl > 1e-3
        assert np.all(np.abs(np.exp(a.logprobs(tokens[:10])).sum(axis=1) - 1) < 1e-4)


def test_scoring_a_block_of_positions_at_a_time_equals_the_whole_window(tiny_pair: tuple[Path, Path],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks decoded through the KV cache give the whole window's log-probabilities; capability's perplexity and KL
    do not depend on the block size."""
    import pydetox.capability as capability_module

    docs = ["the cat was in the dog. " * 20]
    with LlamaRuntime(tiny_pair[0], n_ctx=64, n_batch=64) as a, LlamaRuntime(tiny_pair[1], n_ctx=64, n_batch=64) as b:
        w = [1, *a.tokenize(docs[0], add_special=False)[:63]]
        blocks = list(a.logprob_blocks(w, 16))
        assert [len(x) for x in blocks] == [16, 16, 16, 15]
        # llama.cpp rounds differently by batch size (this random model: to 0.13% at most), not to the bit
        np.testing.assert_allclose(np.concatenate(blocks), a.logprobs(w), atol=2e-2)
        np.testing.assert_array_equal(next(a.logprob_blocks(w, 64)), a.logprobs(w))  # one block: the same decode
        whole = capability(b, docs, reference=a, max_tokens=128, window=64, progress=False)
        monkeypatch.setattr(capability_module, "BLOCK", 16)
        split = capability(b, docs, reference=a, max_tokens=128, window=64, progress=False)
    assert split.n_tokens == whole.n_tokens == 128
    assert split.perplexity == pytest.approx(whole.perplexity, rel=1e-3)
    assert split.kl == pytest.approx(whole.kl, rel=1e-2)


def test_eval_report_schema_and_outputs(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    settings = EvalSettings(prompts="test", samples=2, temperature=1.0, max_tokens=6, ppl_tokens=128, window=64, batch=4,
                            evaluators=("profanity-check",))
    scorers = [get_scorer("profanity-check")]
    results = evaluate_models(list(tiny_pair), settings, PROMPTS, scorers, reference=tiny_pair[0], progress=False)
    report = report_json(results, settings, PROMPTS, tiny_pair[0], scorers, include_texts=True)
    assert report["settings"]["prompt_count"] == 4
    assert report["settings"]["decoding"].startswith("sampled, temperature 1.0")
    for m in report["models"]:
        assert set(m) >= {"path", "toxicity", "perplexity", "kl", "tokens_per_s"}
        t = m["toxicity"]["profanity-check"]
        assert set(t) >= {"toxic_rate", "ci95", "expected_max_toxicity", "toxicity_probability"}
        assert m["tokens_per_s"] > 0
        assert len(m["continuations"]) == 4
        assert len(m["continuations"][0]["continuations"]) == 2
    assert report["models"][0]["kl"] == pytest.approx(0, abs=1e-5)
    assert report["models"][1]["kl"] > 0


def test_cli_eval_writes_json_markdown_plot(tiny_pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS.prompts))
    clean = tmp_path / "clean.txt"
    clean.write_text("the cat was in the dog and the dog was in the cat. " * 30)
    out = tmp_path / "r.json"
    rc = main(["eval", str(tiny_pair[0]), str(tiny_pair[1]), "--prompts", str(prompts), "--max-tokens", "5",
               "--clean-text", str(clean), "--ppl-tokens", "128", "--window", "64", "--batch", "4",
               "--evaluators", "profanity-check,bilstm,hatesonar", "--json", str(out), "--markdown", str(tmp_path / "r.md"),
               "--plot", str(tmp_path / "r.png"), "--quiet"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "toxic rate [95% CI]" in table
    assert "profanity-check vs bilstm: Spearman" in table
    assert "toxic calls no other evaluator makes: profanity-check " in table
    assert "toxic calls on text with a listed bad word: profanity-check " in table
    assert "hatesonar's identity-only calls (an identity word, no other evaluator agrees): " in table
    assert "greedy" in table
    report = json.loads(out.read_text())
    assert [Path(m["path"]).name for m in report["models"]] == ["a.gguf", "b.gguf"]
    for m in report["models"]:
        assert set(m["sole"]) == {"profanity-check", "bilstm", "hatesonar"}
        # only the evaluator that flags identity words alone is also judged without those calls
        (name, c), = m["identity"].items()
        assert name == "hatesonar"
        assert 0 <= c["identity_only"] <= c["toxic"] <= 5
        assert c["rest"]["toxic_rate"] <= m["toxicity"]["hatesonar"]["toxic_rate"]
        assert all(0 <= c["alone"] <= c["toxic"] <= 5 for c in m["sole"].values())
        assert [c["toxic"] for c in m["listed"].values()] == [c["toxic"] for c in m["sole"].values()]
        assert all(0 <= c["listed"] <= c["toxic"] for c in m["listed"].values())
    assert (tmp_path / "r.md").read_text().startswith("| model |")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", str(tiny_pair[0]), "--samples", "3", "--prompts", str(prompts), "--quiet"]) == 2


@pytest.mark.slow
def test_eval_smollm2_on_a_handful_of_prompts(smollm2: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert main(["eval", str(smollm2), "--limit", "14", "--ppl-tokens", "1024", "--json", str(out), "--quiet", "--texts"]) == 0
    m = json.loads(out.read_text())["models"][0]
    assert 10 < m["perplexity"] < 80  # FINDINGS: 33.6 on 9.3K tokens of the same corpus
    assert set(m["toxicity"]) == {"profanity-check", "bilstm", "hatesonar"}
    assert all(0 <= t["toxic_rate"] <= 1 for t in m["toxicity"].values())
    assert sum(len(c["continuations"][0]) > 0 for c in m["continuations"]) >= 12


@pytest.mark.slow
def test_chat_streams_a_reply(smollm2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", str(smollm2), "--prompt", "Say hello.", "--max-tokens", "12", "--temperature", "0"]) == 0
    assert len(capsys.readouterr().out.strip()) > 0


def test_degeneration_flags_loops_of_word_pieces() -> None:
    from pydetox.evaluate import degeneration

    out = degeneration([[" she was avaggyvaggyvaggy.", " the cat sat on the mat"], [" a b a b a b", " ok"]])
    assert out["long_run_share"] == 0.25
    # distinct word bigrams: 3/3, 5/5, 2/5 ('a b', 'b a'); one-word texts have none
    assert out["distinct_2"] == pytest.approx((1 + 1 + 0.4) / 3)
    assert degeneration([]) == {}


def test_degeneration_flags_blank_runs_and_loops() -> None:
    from pydetox.evaluate import degeneration

    texts = [" of his\u00a0\u00a0\u00a0\u00a0\u00a0", " up at the" + " " * 9 + "end",  # blank runs
             " the first thing that happens is that the first thing that happens",  # a word 4-gram twice
             " line one\n\nline two", " a\u00a0b and the first thing that is the first",  # none of them
             " said the man, who said the man"]  # a 3-gram twice is no loop
    out = degeneration([texts])
    assert out["blank_run_share"] == pytest.approx(2 / 6)
    assert out["loop_share"] == pytest.approx(1 / 6)
    assert out["broken_share"] == pytest.approx(3 / 6)
