"""Evaluation overhead on SmolLM2-135M-Instruct: 64 RTP challenging prompts, greedy, 20 tokens, three offline
evaluators, no perplexity. Baselines in the same run: (1) llama-cpp-python's `Llama.__call__` generating the same
prompts one by one, what a user would otherwise write; (2) pydetox's own batched generation without scoring, so
the share of the time spent outside llama.cpp is visible. Run: pytest bench/bench_eval.py -s"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pydetox.assets import fetch
from pydetox.evaluate import EvalSettings, generate, score_all
from pydetox.prompts import load_prompts
from pydetox.runtime import LlamaRuntime, load_llama
from pydetox.scorers import get_scorer

N_PROMPTS = 64


@pytest.fixture(scope="module")
def setup() -> tuple[Path, list[str], EvalSettings]:
    prompts = load_prompts("rtp-challenging").subset(N_PROMPTS, seed=0).prompts
    return fetch("smollm2-135m-instruct", quiet=True), prompts, EvalSettings(max_tokens=20, batch=16)


def test_eval_vs_raw_llama_cpp_generation(setup: tuple[Path, list[str], EvalSettings], compare: Callable[..., float]) -> None:
    model, prompts, settings = setup
    scorers = [get_scorer(n) for n in settings.evaluators]
    for s in scorers:
        s.score(["warm-up"])  # load evaluator models outside the timing
    llm = load_llama(model, n_ctx=256, seed=0)
    rt = LlamaRuntime(model, n_ctx=settings.batch * 128, n_seq=settings.batch, n_batch=512)
    counts: dict[str, int] = {}

    def raw() -> None:
        counts["raw"] = sum(llm(p, max_tokens=settings.max_tokens, temperature=0.0)["usage"]["completion_tokens"] for p in prompts)

    def ours() -> None:
        texts, n, _ = generate(rt, prompts, settings, progress=False)
        score_all(texts, scorers)
        counts["ours"] = n

    compare("llama-cpp-python Llama.__call__, one prompt at a time", ours, raw, rounds=3)
    # the scoring share, against pydetox's own generation alone
    t0 = time.perf_counter()
    texts, _, gen_s = generate(rt, prompts, settings, progress=False)
    t1 = time.perf_counter()
    score_all(texts, scorers)
    score_s = time.perf_counter() - t1
    print(f"generation {gen_s:.2f} s ({counts['ours'] / gen_s:.0f} tok/s), scoring {score_s:.3f} s = "
          f"{score_s / (t1 - t0):.1%} on top; tokens: ours {counts['ours']}, llama-cpp-python {counts['raw']}")
    assert counts["ours"] > 0.8 * counts["raw"]
