"""Word filtering, baked into the output layer: the model stops producing the tokens of a bad-words list.

The "word filtering" baseline of Gehman et al., "RealToxicityPrompts: Evaluating Neural Toxic Degeneration in
Language Models" (Findings of EMNLP 2020): banned words get probability zero at decoding. Here it is a weight edit,
so every llama.cpp client gets it without a sampler hook: each banned token's output row w_b becomes w_b - beta m,
with m the unit mean direction of the final hidden states on non-toxic text. Its logit drops by beta (m . h) at every
position; beta is set so that the drop is at least `drop` nats at the `quantile` of the positions measured on the
neutral texts (m . h is positive at nearly every position: post-norm hidden states share a large common component).
One `low_rank` edit of rank one (V + d numbers); on tied models it goes to a new output tensor.

Which tokens: those whose text is a word of the list or an inflection (`badword_token_mask`); short words (< 5
letters, e.g. "ass", "tit") only as whole-word tokens (with a leading space or capital), so that "class", "title" and
"assess" keep their pieces. It removes the words, not the intent: a toxic sentence without listed words stays, and
word-based evaluators (profanity-check, and largely the bilstm and hatesonar ones) reward it more than a human would.

Parameters: `drop` (nats, default 10), `quantile` (default 0.01), `texts` (neutral texts for the statistics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pydetox.discover.base import Context, Method, badword_token_mask, register_method, token_strings
from pydetox.errors import PydetoxError
from pydetox.plan import Edit, EditKind


@dataclass(frozen=True)
class WordFilterParams:
    drop: float = 10.0
    quantile: float = 0.01
    texts: int = 200
    min_subword_letters: int = 5


def banned_tokens(ctx: Context, min_subword_letters: int) -> np.ndarray:
    tok = ctx.fp.tokenizer
    vocab = ctx.fp.unembedding().shape[0]
    strings = token_strings(ctx)
    mask = badword_token_mask(ctx, strings, vocab)
    pieces = tok.convert_ids_to_tokens(list(range(min(len(tok), vocab))))
    for i in np.flatnonzero(mask):
        raw = str(pieces[i])
        word_start = raw[:1] in ("Ġ", "▁", " ") or raw[:1].isupper()
        letters = sum(ch.isalpha() for ch in strings[i])
        if letters < min_subword_letters and not word_start:
            mask[i] = False
    return np.flatnonzero(mask)


@register_method
class WordFilter(Method):
    name = "wordfilter"
    paper = "Gehman et al., RealToxicityPrompts, Findings of EMNLP 2020 (word filtering baseline)"
    Params = WordFilterParams

    def edits(self, ctx: Context, params: Any) -> tuple[list[Edit], dict[str, Any]]:
        p: WordFilterParams = params
        torch = ctx.fp.torch
        banned = banned_tokens(ctx, p.min_subword_letters)
        if len(banned) == 0:
            raise PydetoxError("wordfilter: no token of this vocabulary is a word of the bad-words list")
        texts = ctx.data.neutral[: p.texts]
        tok = ctx.fp.tokenizer
        states = []
        with torch.no_grad():
            for start in range(0, len(texts), 16):
                enc = tok(texts[start : start + 16], return_tensors="pt", padding=True, truncation=True, max_length=64)
                h = ctx.fp.model(**enc, output_hidden_states=True).hidden_states[-1]  # after the final norm
                keep = enc["attention_mask"].bool()
                keep[:, 0] = False  # the attention-sink position
                states.append(h[keep].double().numpy())
        H = np.concatenate(states)
        m = H.mean(0)
        m /= np.linalg.norm(m)
        proj = H @ m
        low = float(np.quantile(proj, p.quantile))
        if low <= 0:
            raise PydetoxError(f"wordfilter: the mean hidden direction is not shared by {p.quantile:.0%} of positions "
                               f"(quantile of m.h = {low:.3f}); this model needs another way to lower logits")
        beta = p.drop / low
        w = ctx.fp.unembedding()
        L = np.zeros((1, w.shape[0]), np.float32)
        L[0, banned] = -beta
        edit = Edit(ctx.fp.output_name, EditKind.LOW_RANK, (w.shape[0], w.shape[1]), L, b=m[None, :].astype(np.float32),
                    source=ctx.fp.output_source)
        words = [tok.convert_tokens_to_string([t]) for t in tok.convert_ids_to_tokens(banned[:60].tolist())]
        return [edit], {"banned_tokens": len(banned), "beta": beta, "m_dot_h_quantile": low,
                        "m_dot_h_median": float(np.median(proj)), "examples": words}
