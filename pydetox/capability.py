"""Capability on clean text through llama.cpp: perplexity, and KL divergence of next-token distributions against a
reference model (the unedited or full-precision one).

The clean documents are joined with blank lines, tokenized once by the evaluated model, cut to `max_tokens`, and
split into non-overlapping windows of `window` tokens. A model whose tokenizer adds a BOS token (Gemma) gets one at
the start of every window, as llama.cpp's perplexity tool gives it: without it Gemma-3-270m is out of its element
(perplexity 437 on 64-token windows, 55 on 512-token ones, for one edited model) and KL measures that state. Every
token of the text is predicted once, from the tokens before it in its window. Perplexity = exp(mean negative
log-likelihood); KL = mean over those positions of KL(P_reference || P_model), in nats, over the full vocabulary.
Both models must share the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from pydetox.errors import PydetoxError
from pydetox.runtime import LlamaRuntime


@dataclass(frozen=True)
class Capability:
    perplexity: float
    kl: float | None
    n_tokens: int
    window: int
    kl_base: float | None = None  # KL(P_base || P_model) against a second reference (the unedited model at the same type)


def windows(runtime: LlamaRuntime, documents: list[str], max_tokens: int, window: int) -> list[list[int]]:
    prefix = runtime.tokenize("", add_special=True)  # [BOS] where the model wants one, [] otherwise
    if len(prefix) >= window - 1:
        raise PydetoxError(f"a scoring window of {window} tokens leaves no room after the {len(prefix)} special tokens")
    tokens = runtime.tokenize("\n\n".join(documents), add_special=False)[:max_tokens]
    step = window - len(prefix)
    out = [prefix + tokens[i : i + step] for i in range(0, len(tokens), step)]
    return [w for w in out if len(w) >= 2]


BLOCK = 128  # positions scored at once


def _kl_sum(ref: np.ndarray, lp: np.ndarray, rows: int = 64) -> float:
    """sum over positions of KL(ref || lp), from (n, vocab) log-probabilities, `rows` positions at a time: whole, its
    temporaries are three more (n, vocab) float32 arrays (1.6 GB for a 512-token window of Gemma-3's 262k vocabulary)."""
    return sum(float((np.exp(r) * (r - q)).sum(dtype=np.float64))
               for r, q in ((ref[i : i + rows], lp[i : i + rows]) for i in range(0, len(ref), rows)))


def capability(runtime: LlamaRuntime, documents: list[str], *, reference: LlamaRuntime | None = None,
               base: LlamaRuntime | None = None, max_tokens: int = 8192, window: int = 512, progress: bool = True,
               label: str = "") -> Capability:
    wins = windows(runtime, documents, max_tokens, window)
    if not wins:
        raise PydetoxError("the clean text is too short to score")
    for ref_rt in (reference, base):
        if ref_rt is not None and ref_rt.n_vocab != runtime.n_vocab:
            raise PydetoxError(f"KL needs one vocabulary: the reference has {ref_rt.n_vocab} tokens, the model {runtime.n_vocab}")
    nll = 0.0
    kls = {"reference": 0.0, "base": 0.0}
    count = 0
    refs = {key: rt for key, rt in (("reference", reference), ("base", base)) if rt is not None}
    for w in tqdm(wins, desc=f"perplexity {label}".strip(), disable=not progress, leave=False):
        # The models' log-probabilities a block of positions at a time (each runtime keeps its own KV cache of the
        # window): the window's whole (positions, vocabulary) arrays were 537 MB each on Gemma-3.
        start = 0
        for lp, *ref_lps in zip(runtime.logprob_blocks(w, BLOCK), *(rt.logprob_blocks(w, BLOCK) for rt in refs.values()),
                                strict=True):
            targets = np.asarray(w[start + 1 : start + 1 + len(lp)])
            nll -= float(lp[np.arange(len(targets)), targets].astype(np.float64).sum())
            for key, ref in zip(refs, ref_lps, strict=True):
                kls[key] += _kl_sum(ref, lp)
            start += len(lp)
        count += len(w) - 1
    return Capability(float(np.exp(nll / count)), None if reference is None else kls["reference"] / count, count, window,
                      None if base is None else kls["base"] / count)
