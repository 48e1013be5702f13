"""Word filtering, baked into the output layer: the model stops producing the tokens of a bad-words list.

The "word filtering" baseline of Gehman et al., "RealToxicityPrompts: Evaluating Neural Toxic Degeneration in
Language Models" (Findings of EMNLP 2020): banned words get probability zero at decoding. Here it is a weight edit,
so every llama.cpp client gets it without a sampler hook: each banned token's output row w_b becomes w_b - beta m,
with m the unit mean direction of the final hidden states on non-toxic text. Its logit drops by beta (m . h) at every
position; beta is set so that the drop is at least `drop` nats at the `quantile` of the positions measured on the
neutral texts (m . h is positive at nearly every position: post-norm hidden states share a large common component).
One `low_rank` edit of rank one (V + d numbers); on tied models it goes to a new output tensor.

Which tokens: see `banned_tokens`. The list alone misses most profanity on subword vocabularies (SmolLM2 writes
" fucking" as " f" + "ucking" and " bitch" as " b" + "itch"); the ParaDetox pairs, where the neutral side is the
same sentence without the offensive words, find those pieces, and Wikipedia text keeps common pieces off the list.
It removes the words, not the intent: a toxic sentence without listed words stays, and word-based evaluators
(profanity-check, and largely the bilstm and hatesonar ones) reward it more than a human would.

Parameters: `drop` (nats, default 10), `quantile` (default 0.01), `texts` (neutral texts for the statistics of m),
and the token-selection thresholds of `banned_tokens`.
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
    min_unseen_letters: int = 5
    min_count: int = 5
    max_clean_per_million: float = 30.0
    select: str = "pairs"  # "pairs": list + pairs + clean-text filters (banned_tokens); "list": the list's tokens only


def _counts(tok: Any, texts: list[str], vocab: int) -> np.ndarray:
    c = np.zeros(vocab, np.int64)
    for t in texts:
        ids = np.asarray(tok(t, add_special_tokens=False)["input_ids"], dtype=np.int64)
        np.add.at(c, ids[ids < vocab], 1)
    return c


def banned_tokens(ctx: Context, p: WordFilterParams) -> tuple[np.ndarray, dict[str, Any]]:
    """Tokens to ban, and how they were chosen.

    Candidates: tokens that are a listed bad word or its inflection (`badword_token_mask`; words under
    `min_subword_letters` letters only as whole-word tokens), and tokens the pairs show are toxic: used at least
    `min_count` times on the toxic side of the ParaDetox pairs and never on the neutral side (the pairs are
    paraphrases without the offensive words; on subword vocabularies this is what finds the second pieces of split
    words, e.g. SmolLM2's ' f' + 'ucking'). Kept: candidates more frequent on the toxic than the neutral side, or,
    never seen there, listed words (not inflections: 'butt' + 'er' is 'butter') of `min_unseen_letters` letters or
    more; and rare in clean text (Wikipedia, at most `max_clean_per_million` per million tokens), so that common
    pieces (' f', ' sh', 'um') are never banned. That rate also bounds the cost on clean text: at 30 per million
    and a 10-nat drop, at most 3e-4 nats/token of cross-entropy (+0.03% perplexity) on text like Wikipedia."""
    if p.select not in ("pairs", "list"):
        raise PydetoxError(f"wordfilter: select is 'pairs' or 'list', not {p.select!r}")
    from pydetox.calibrate import SKIP_WIKI
    from pydetox.discover.data import EMBEDDED, _read
    from pydetox.prompts import load_clean_text, load_prompts

    tok = ctx.fp.tokenizer
    vocab = ctx.fp.unembedding().shape[0]
    strings = token_strings(ctx)
    pieces = tok.convert_ids_to_tokens(list(range(min(len(tok), vocab))))
    listed_mask = badword_token_mask(ctx, strings, vocab)
    listed = {w.lower() for w in ctx.badwords}
    if p.select == "list":
        keep_list = [i for i in np.flatnonzero(listed_mask)
                     if str(pieces[i])[:1] in ("Ġ", "▁", " ") or str(pieces[i])[:1].isupper()
                     or sum(ch.isalpha() for ch in strings[i]) >= p.min_subword_letters]
        return np.asarray(keep_list, dtype=np.int64), {"select": "list"}
    exclude = {x.strip().lower() for x in load_prompts("rtp-challenging").prompts}
    rows, _ = _read(EMBEDDED)
    rows = [r for r in rows if r["toxic"].strip().lower() not in exclude]
    toxic_texts = list(dict.fromkeys([*ctx.data.toxic, *(r["toxic"] for r in rows)]))
    neutral_texts = list(dict.fromkeys([*ctx.data.neutral, *(r["neutral"] for r in rows)]))
    toxic, neutral = _counts(tok, toxic_texts, vocab), _counts(tok, neutral_texts, vocab)
    clean_texts = load_clean_text("wiki")[SKIP_WIKI:]
    clean = _counts(tok, clean_texts, vocab)
    clean_rate = clean / max(1, int(clean.sum())) * 1e6
    data_mask = (toxic >= p.min_count) & (neutral == 0)
    keep = np.zeros(vocab, dtype=bool)
    for i in np.flatnonzero(listed_mask | data_mask):
        raw = str(pieces[i]) if i < len(pieces) else ""
        word_start = raw[:1] in ("Ġ", "▁", " ") or raw[:1].isupper()
        word = "".join(ch for ch in strings[i] if ch.isalpha())
        if clean_rate[i] > p.max_clean_per_million:
            continue
        if listed_mask[i] and len(word) < p.min_subword_letters and not word_start:
            continue
        if toxic[i] + neutral[i] > 0:
            keep[i] = toxic[i] > neutral[i]
        else:
            keep[i] = word in listed and len(word) >= p.min_unseen_letters
    info = {"pairs_counted": len(toxic_texts), "clean_tokens_counted": int(clean.sum()),
            "from_list": int((keep & listed_mask).sum()), "from_pairs_only": int((keep & ~listed_mask).sum())}
    return np.flatnonzero(keep), info


@register_method
class WordFilter(Method):
    name = "wordfilter"
    paper = "Gehman et al., RealToxicityPrompts, Findings of EMNLP 2020 (word filtering baseline)"
    Params = WordFilterParams

    def edits(self, ctx: Context, params: Any) -> tuple[list[Edit], dict[str, Any]]:
        p: WordFilterParams = params
        torch = ctx.fp.torch
        banned, chosen = banned_tokens(ctx, p)
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
        words = [tok.convert_tokens_to_string([t]) for t in tok.convert_ids_to_tokens(banned[:200].tolist())]
        return [edit], {"banned_tokens": len(banned), **chosen, "beta": beta, "m_dot_h_quantile": low,
                        "m_dot_h_median": float(np.median(proj)), "examples": words}
