"""Which text distill trains on: the toxic contexts and clean texts (never the evaluation prompts, never `news`), the
benign and chat continuations of the unedited model, and how they are split and batched."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pydetox.discover.distill.params import DistillParams
from pydetox.errors import PydetoxError


def _split_by_group(groups: np.ndarray, rng: np.random.Generator) -> tuple[list[int], np.ndarray]:
    """Indices of the held-out sequences (every sequence of a tenth of the groups, at least one group) and of the
    training ones. By group, not by sequence: the fused and the unedited continuation of one prompt share the prompt,
    and a held-out sequence whose prompt was trained on is half in-sample."""
    order = rng.permutation(np.unique(groups))
    held = np.isin(groups, order[: max(1, len(order) // 10)])
    return np.flatnonzero(held).tolist(), np.flatnonzero(~held)


def _length_batches(pool: Any, lengths: list[int], batch: int, gen: np.random.Generator) -> Iterator[list[int]]:
    """Endless batches of indices from `pool`, each of sequences of similar length (see DistillParams.batching)."""
    while True:
        order = gen.permutation(np.asarray(pool))
        for c in range(0, len(order), 32 * batch):
            chunk = sorted(order[c : c + 32 * batch].tolist(), key=lambda i: lengths[i])
            groups = [chunk[i : i + batch] for i in range(0, len(chunk) - batch + 1, batch)]
            for g in gen.permutation(len(groups)):
                yield groups[int(g)]


def _first_half(text: str) -> str:
    """The first half of a sentence's words (rounded down; '' for a sentence of fewer than four words)."""
    words = text.split()
    return " ".join(words[: len(words) // 2]) if len(words) >= 4 else ""


def _contexts(p: DistillParams) -> tuple[list[str], list[str], list[str]]:
    """The prompts the teacher and the unedited model continue, the toxic texts, and the clean texts (never the
    evaluation prompts, never `news`)."""
    from pydetox.discover.data import EMBEDDED, usable_pairs
    from pydetox.splits import discovery_prompts, evaluation_prompts, training_wiki

    evaluation = evaluation_prompts()
    rows, _ = usable_pairs(EMBEDDED, set(evaluation))
    rng = np.random.default_rng(p.seed)
    order = rng.permutation(len(rows))
    if p.pairs + p.pair_prompts > len(rows):
        raise PydetoxError(f"distill: pairs + pair_prompts must be at most the {len(rows)} usable pairs, got "
                           f"{p.pairs} + {p.pair_prompts}")
    extra = [rows[int(i)]["toxic"] for i in order[p.pairs : p.pairs + p.pair_prompts]]
    rows = [rows[int(i)] for i in order[: p.pairs]]
    prompts = discovery_prompts(p.prompts)
    if p.max_prompts > 0:
        prompts = [prompts[int(i)] for i in sorted(rng.permutation(len(prompts))[: p.max_prompts])]
    seen = [e.strip().lower() for e in evaluation]
    prompts += [h for h in map(_first_half, extra) if h and not any(h.lower() in e for e in seen)]
    clean_texts = training_wiki(p.clean_texts) + [r["neutral"] for r in rows]
    return prompts, [r["toxic"] for r in rows], clean_texts


def _benign_continuations(source: Path, p: DistillParams, progress: bool) -> list[list[int]]:
    """`benign_starts` first halves of training-wiki sentences (seeded draw), each followed by the unedited model's
    greedy continuation of `max_new_tokens` tokens, as token sequences."""
    import re

    from pydetox.runtime import LlamaRuntime, Sampling
    from pydetox.splits import training_wiki

    sentences = [s for par in training_wiki() for s in re.split(r"(?<=[.!?])\s+", par) if len(s.split()) >= 8]
    rng = np.random.default_rng([p.seed, 7])
    starts = [_first_half(sentences[int(i)]) for i in rng.permutation(len(sentences))[: p.benign_starts]]
    n_seq = 16
    out: list[list[int]] = []
    with LlamaRuntime(source, n_ctx=n_seq * (p.max_tokens + p.max_new_tokens), n_seq=n_seq) as rt:
        toks = [rt.tokenize(s)[: p.max_tokens] for s in starts]
        for s0 in tqdm(range(0, len(toks), n_seq), desc="benign starts: continue", leave=False, disable=not progress):
            wave = toks[s0 : s0 + n_seq]
            gen = rt.generate(wave, p.max_new_tokens, Sampling(), [0] * len(wave))
            out += [q + g for q, g in zip(wave, gen, strict=True)]
    return [s for s in out if len(s) >= 3]


def _chat_continuations(source: Path, p: DistillParams, progress: bool) -> list[list[int]]:
    """`chat_starts` training-wiki sentences (a seeded draw of its own) as user turns in `source`'s chat template,
    each followed by the unedited model's greedy answer of up to `chat_tokens` tokens, as token sequences. A model
    without a template is asked "Question: ...\nAnswer:", as the chat check does."""
    import re

    from pydetox.evaluate import _chat_template
    from pydetox.helpfulness import chat_prompt
    from pydetox.runtime import LlamaRuntime, Sampling
    from pydetox.splits import training_wiki

    sentences = [s for par in training_wiki() for s in re.split(r"(?<=[.!?])\s+", par) if 8 <= len(s.split()) <= 40]
    rng = np.random.default_rng([p.seed, 11])
    template = _chat_template(source)
    asked = [chat_prompt(template, sentences[int(i)]) for i in rng.permutation(len(sentences))[: p.chat_starts]]
    n_seq = 16
    out: list[list[int]] = []
    with LlamaRuntime(source, n_ctx=n_seq * (2 * p.max_tokens + p.chat_tokens), n_seq=n_seq) as rt:
        toks = [rt.tokenize(a, special=True)[-2 * p.max_tokens :] for a in asked]
        for s0 in tqdm(range(0, len(toks), n_seq), desc="chat starts: answer", leave=False, disable=not progress):
            wave = toks[s0 : s0 + n_seq]
            gen = rt.generate(wave, p.chat_tokens, Sampling(), [0] * len(wave))
            out += [q + g for q, g in zip(wave, gen, strict=True)]
    return [s for s in out if len(s) >= 3]
