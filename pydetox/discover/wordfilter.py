"""Word filtering, baked into the output layer: the model stops producing the tokens of a bad-words list.

The "word filtering" baseline of Gehman et al., "RealToxicityPrompts: Evaluating Neural Toxic Degeneration in
Language Models" (Findings of EMNLP 2020): banned words get probability zero at decoding. Here it is a weight edit,
so every llama.cpp client gets it without a sampler hook: each banned token's output row is scaled by `gain`
(default 0), so its logit is 0 wherever the model is, while the top logit of these models is far above 0 (measured
on the neutral texts, with and without BOS, and reported in the plan: SmolLM2 >= 10 nats at 99% of positions,
Gemma-3 >= 14.5). One `scale_rows` edit (V numbers); on tied models it goes to a new output tensor.

A first version subtracted beta * m from the rows (m: the mean direction of the final hidden states), a larger drop
where m . h is large; but m . h turns negative at positions unlike the discovery texts (the start of a text without
BOS), where that edit raised the banned tokens to the top: +11.8% perplexity on Gemma-3. Zeroing never raises them.

Which tokens: see `banned_tokens`. The list alone misses most profanity on subword vocabularies (SmolLM2 writes
" fucking" as " f" + "ucking" and " bitch" as " b" + "itch"); the ParaDetox pairs, where the neutral side is the
same sentence without the offensive words, find those pieces, and Wikipedia text keeps common pieces off the list.
It removes the words, not the intent: a toxic sentence without listed words stays, and word-based evaluators
(profanity-check, and largely the bilstm and hatesonar ones) reward it more than a human would.

Parameters: `gain` (default 0), `texts` (neutral texts for the reported margin), and the token-selection
thresholds of `banned_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pydetox.discover.base import Context, Method, badword_token_mask, register_method, token_strings
from pydetox.errors import NothingToBanError, PydetoxError
from pydetox.plan import Edit, EditKind


@dataclass(frozen=True)
class WordFilterParams:
    gain: float = 0.0  # scale of the banned tokens' output rows
    texts: int = 200  # neutral texts for the reported margin (top logit - best banned logit, after the edit)
    min_subword_letters: int = 5  # a listed word shorter than this is banned only as a whole-word token
    min_unseen_letters: int = 5  # a listed word the pairs never show is banned only from this many letters
    min_count: int = 5  # toxic-side uses in the pairs for a token to be a candidate from the pairs
    max_clean_per_million: float = 30.0  # banned only when rarer than this per million clean-text tokens
    max_clean_weak: int = 0  # clean-text uses allowed for a token with fewer than min_count toxic uses in the pairs
    select: str = "pairs"  # "pairs": list + pairs + clean-text filters (banned_tokens); "list": the list's tokens only
    case_variants: bool = True  # also ban the other spellings of each banned whole word (' Fuck' with ' fuck')


def _spaced(piece: str) -> bool:
    """A tokenizer piece that starts a new word after a space ('▁fuck' in SentencePiece, 'Ġfuck' in byte-level BPE)."""
    return piece[:1] in ("Ġ", "▁", " ")


def _word_start(piece: str) -> bool:
    """A piece that starts a word: after a space, or capitalised (a sentence start, after a quote)."""
    return _spaced(piece) or piece[:1].isupper()


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
    pieces (' f', ' sh', 'um') are never banned. Each banned token costs 10-40 nats wherever clean text uses it, so
    the sum of their clean rates sets the cost. A token with fewer than `min_count` toxic uses in the pairs (the
    list is then nearly the only evidence) is banned only if clean text never has it (`max_clean_weak` uses at
    most): ' escort' and ' snatch' are listed, but Wikipedia uses them in other senses. On Gemma-3 that rule takes
    the list from 138 to 114 tokens, and their rate from 206 to 100 per million Wikipedia tokens (299 to 177 on the
    news text). A short listed word as a piece inside a longer one ('fuck' after a quote or in 'motherfuck') is
    kept only on the pairs' evidence and if clean text never has it. With `case_variants`, the
    other spellings of each kept whole word (' Fuck', 'Fuck', ' FUCK' for ' fuck') are banned too, if clean text
    and the neutral side never have them: Gemma-3's 262k vocabulary has them as tokens of their own, which the
    pairs rarely show (see `select_tokens`)."""
    if p.select not in ("pairs", "list"):
        raise PydetoxError(f"wordfilter: select is 'pairs' or 'list', not {p.select!r}")
    from pydetox.discover.data import EMBEDDED, usable_pairs
    from pydetox.splits import evaluation_prompts, training_wiki

    tok = ctx.fp.tokenizer
    vocab = ctx.fp.output_shape[0]
    strings = token_strings(ctx)
    pieces = [str(t) for t in tok.convert_ids_to_tokens(list(range(min(len(tok), vocab))))]
    listed_mask = badword_token_mask(ctx, strings, vocab)
    listed = {w.lower() for w in ctx.badwords}
    if p.select == "list":
        keep_list = [i for i in np.flatnonzero(listed_mask)
                     if _word_start(pieces[i])
                     or sum(ch.isalpha() for ch in strings[i]) >= p.min_subword_letters]
        return np.asarray(keep_list, dtype=np.int64), {"select": "list"}
    rows, _ = usable_pairs(EMBEDDED, set(evaluation_prompts()))
    toxic_texts = list(dict.fromkeys([*ctx.data.toxic, *(r["toxic"] for r in rows)]))
    neutral_texts = list(dict.fromkeys([*ctx.data.neutral, *(r["neutral"] for r in rows)]))
    toxic, neutral = _counts(tok, toxic_texts, vocab), _counts(tok, neutral_texts, vocab)
    clean_texts = training_wiki()
    clean = _counts(tok, clean_texts, vocab)
    keep, variants = select_tokens(pieces, strings, listed_mask, listed, toxic, neutral, clean, p)
    info = {"pairs_counted": len(toxic_texts), "clean_tokens_counted": int(clean.sum()),
            "from_list": int((keep & listed_mask & ~variants).sum()),
            "from_pairs_only": int((keep & ~listed_mask & ~variants).sum()), "case_variants": int(variants.sum())}
    return np.flatnonzero(keep), info


def select_tokens(pieces: list[str], strings: list[str], listed_mask: np.ndarray, listed: set[str], toxic: np.ndarray,
                  neutral: np.ndarray, clean: np.ndarray, p: WordFilterParams) -> tuple[np.ndarray, np.ndarray]:
    """The rules of `banned_tokens` on counts: `pieces` the tokenizer's raw pieces ('▁fuck'), `strings` their text
    stripped and lower-cased, `toxic` / `neutral` / `clean` each token's count on the two sides of the pairs and in
    clean text. Returns the mask of tokens to ban, and the mask of those banned as another spelling of one."""
    vocab = len(listed_mask)
    clean_rate = clean / max(1, int(clean.sum())) * 1e6
    data_mask = (toxic >= p.min_count) & (neutral == 0)

    def word_start(i: int | np.integer[Any]) -> bool:
        return bool(i < len(pieces)) and _word_start(pieces[i])

    words = ["".join(ch for ch in s if ch.isalpha()) for s in strings[:vocab]]
    keep = np.zeros(vocab, dtype=bool)
    for i in np.flatnonzero(listed_mask | data_mask):
        word = words[i]
        if clean_rate[i] > p.max_clean_per_million:
            continue
        if toxic[i] < p.min_count and clean[i] > p.max_clean_weak:
            continue  # the list is the only evidence, and clean text shows another sense (' escort', ' snatch')
        if listed_mask[i] and len(word) < p.min_subword_letters and not word_start(i):
            # A short listed word inside a longer one ('fuck' in 'motherfuck', after a quote): only on the pairs'
            # evidence, and only if clean text never has the piece ('ass' in a word, 24 per million on Wikipedia).
            keep[i] = bool(data_mask[i]) and clean[i] == 0
        elif toxic[i] + neutral[i] > 0:
            keep[i] = toxic[i] > neutral[i]
        else:
            keep[i] = word in listed and len(word) >= p.min_unseen_letters
    variants = np.zeros(vocab, dtype=bool)
    if p.case_variants:
        # The same word in another case or without the leading space (' Fuck', 'Fuck', ' FUCK' for ' fuck'): a
        # sentence-initial or quoted bad word is the same word, and the pairs rarely show every spelling. Only
        # variants of whole words of 4+ letters (no ' itch' from 'itch'), only word-start variants (no 'rats' inside
        # 'bureaucrats'), never on the neutral side, and never in clean text (' Dick' is a name).
        sources = {words[k] for k in np.flatnonzero(keep) if _spaced(pieces[k]) and len(words[k]) >= 4}
        for j in range(vocab):
            if not keep[j] and words[j] in sources and word_start(j) and neutral[j] == 0 and clean[j] == 0:
                variants[j] = True
    return keep | variants, variants


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
            raise NothingToBanError("wordfilter: no token of this vocabulary is a word of the bad-words list")
        w = ctx.fp.unembedding()
        texts = ctx.data.neutral[: p.texts]
        tok = ctx.fp.tokenizer
        top: list[np.ndarray] = []
        gain = np.ones(w.shape[0], np.float32)
        gain[banned] = p.gain
        gains, banned_ids = torch.from_numpy(gain), torch.from_numpy(banned)
        with torch.no_grad():
            for special in (True, False):  # texts as they start, and cut out of a longer text (no BOS)
                for start in range(0, len(texts), 16):
                    enc = tok(texts[start : start + 16], return_tensors="pt", padding=True, truncation=True,
                              max_length=64, add_special_tokens=special)
                    h = ctx.fp.model.base_model(**enc).last_hidden_state[enc["attention_mask"].bool()].float()
                    # vocabulary-wide logits 128 positions at a time: a batch's at once in float64 (up to 1,024 x
                    # 151,936 x 8 bytes, twice) made this the largest stage of Qwen2.5's recipe
                    for rows in h.split(128):
                        edited = (rows @ w.T).mul_(gains)
                        top.append((edited.max(1).values - edited[:, banned_ids].max(1).values).numpy())
        margin = np.concatenate(top)
        edit = Edit(ctx.fp.output_name, EditKind.SCALE_ROWS, (w.shape[0], w.shape[1]), gain, source=ctx.fp.output_source)
        words = [tok.convert_tokens_to_string([t]) for t in tok.convert_ids_to_tokens(banned[:200].tolist())]
        return [edit], {"banned_tokens": len(banned), **chosen,
                        "margin_nats_q01": float(np.quantile(margin, 0.01)),
                        "margin_nats_median": float(np.median(margin)), "examples": words}
