"""Unlikelihood-trained output rows: the model keeps its hidden states and learns, token by token, not to spell bad
words where they would come, while its next-token distribution on clean text stays where it was.

The loss is the token-level unlikelihood of Welleck et al., "Neural Text Generation with Unlikelihood Training"
(ICLR 2020), -log(1 - p(bad | context)), here on the positions where a bad word starts or goes on, plus the exact
KL divergence to the unedited model on clean text. Only the output-layer rows of the tokens that can spell those
words move (one `add_rows` edit, k x d numbers; a new output tensor on tied models), so the hidden states are the
unedited model's and are computed once; training is a few hundred Adam steps on them. A row can move along any
direction of the final hidden state, so the penalty depends on the context: ' f' stays likely before 'ocus' and
loses before 'uck'.

Where the bad words come from (never the evaluation prompts):
- the toxic side of the ParaDetox pairs, teacher-forced;
- the model's own greedy continuations of RealToxicityPrompts prompts outside the evaluation set (rtp-perspective
  minus every prompt of rtp-challenging), so the training sees the spellings the model actually uses (SmolLM2 writes
  ' fuck' as ' f' + 'uck'); after each round the edited model generates again and the new spellings it finds
  (' f' + 'agg' + 'ot' once 'uck' is gone) join the next round.
A bad word is a word of the bad-words list (with inflections) or a word the ParaDetox rewrites take out (at least
`min_count` times on the toxic side, `ratio` times more often than on the neutral side) that is rare in clean text.
At a bad word, the penalised tokens are every token that spells a prefix of the rest of the word (' f', ' fu',
' fuck'), or that the rest of the word is a prefix of (' fucking'), in lower, capitalised and upper case.

Measured on SmolLM2 (docs/results/detox-runs.md): without the KL on the unmarked positions the edit
raised pieces in toxic contexts and greedy decoding looped on them ('vaggyvaggy...') in 36% of the continuations,
which the evaluators scored as 2-4x less toxic at +0.4% clean-text perplexity; with it, 1.2-1.4x for +0.4%.

Parameters: `rounds`, `steps` (Adam steps per round), `lr`, `kl_weight`, `unmarked_kl_weight`, `clean_positions`,
`pairs`, `prompts` (discovery prompt set), `max_new_tokens`, `min_count`, `ratio`, `max_clean_per_million`.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from pydetox.badwords import badword_forms
from pydetox.discover.base import Context, Method, register_method
from pydetox.errors import PydetoxError
from pydetox.plan import Edit, EditKind

_WORD = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class UnlikelihoodParams:
    rounds: int = 2  # generate, train, generate again with the edit: new spellings join the next round
    steps: int = 300  # Adam steps per round
    lr: float = 0.003  # Adam's learning rate for the output rows
    kl_weight: float = 100.0  # weight of the exact KL to the unedited model on clean text
    unmarked_kl_weight: float = 100.0  # KL weight on the other positions of the marked texts (0: the loops of v1)
    clean_positions: int = 30000  # clean-text positions the KL is measured on
    pairs: int = 1500  # ParaDetox pairs: toxic sides teacher-forced, and where rewrites show which words are bad
    prompts: str = "rtp-perspective"  # discovery prompts the model continues (evaluation prompts left out)
    max_new_tokens: int = 20  # tokens of each greedy continuation of a discovery prompt
    min_count: int = 4  # a word the rewrites take out at least this often on the toxic side counts as bad
    ratio: float = 8.0  # ... and this many times more often than on the neutral side
    max_clean_per_million: float = 30.0  # ... and at most this often per million clean-text tokens
    seed: int = 0  # the draw of pairs, prompts and clean positions, and the training


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(re.sub(r"\s?['\u2019]", "", text))]


def bad_words(ctx: Context, p: UnlikelihoodParams, pairs: list[dict[str, str]], clean: list[str]) -> set[str]:
    """The bad-words list with inflections, and the words ParaDetox rewrites take out that clean text rarely uses."""
    out = badword_forms(ctx.badwords)
    toxic: Counter[str] = Counter()
    neutral: Counter[str] = Counter()
    wiki: Counter[str] = Counter()
    for r in pairs:
        t, n = set(_words(r["toxic"])), set(_words(r["neutral"]))
        toxic.update(t - n)
        neutral.update(n)
    for text in clean:
        wiki.update(_words(text))
    total = max(1, sum(wiki.values()))
    for w, c in toxic.items():
        if len(w) >= 3 and c >= p.min_count and c >= p.ratio * neutral[w] and wiki[w] / total * 1e6 <= p.max_clean_per_million:
            out.add(w)
    return out


class _Spelling:
    """Token strings (with their leading space) and the tokens that can spell a piece of a word."""

    def __init__(self, tok: Any, vocab: int) -> None:
        pieces = tok.convert_ids_to_tokens(list(range(min(len(tok), vocab))))
        special = set(tok.all_special_ids)
        sentencepiece = any(str(x).startswith("▁") for x in pieces[:5000])
        self.strings = [""] * vocab
        for i, piece in enumerate(pieces):
            if piece is None or i in special:
                continue
            self.strings[i] = piece.replace("▁", " ") if sentencepiece else tok.convert_tokens_to_string([piece])
        self.by: dict[str, list[int]] = {}
        for i, s in enumerate(self.strings):
            if any(ch.isalpha() for ch in s):
                self.by.setdefault(s, []).append(i)
        self.order = sorted(self.by)

    def tokens(self, region: str) -> set[int]:
        """Tokens spelling a prefix of `region` (with a letter in it), or extending it (regions of 3+ letters)."""
        out: set[int] = set()
        lead = " " if region.startswith(" ") else ""
        core = region[len(lead):]
        letters = sum(ch.isalpha() for ch in core)
        for variant in {core, core.lower(), core.capitalize(), core.upper()}:
            v = lead + variant
            for k in range(len(lead) + 1, len(v) + 1):
                out.update(self.by.get(v[:k], ()))
            if letters >= 3:
                j = bisect.bisect_left(self.order, v)
                while j < len(self.order) and self.order[j].startswith(v):
                    out.update(self.by[self.order[j]])
                    j += 1
        return out

    def marks(self, ids: list[int], bad: set[str]) -> list[tuple[int, set[int]]]:
        """(position whose prediction spells a bad word, tokens that would spell it) for a token sequence."""
        offsets, text = [], ""
        for t in ids:
            offsets.append(len(text))
            text += self.strings[t] if t < len(self.strings) else ""
        out = []
        for m in _WORD.finditer(text):
            if m.group().lower() not in bad:
                continue
            ws, we = m.start(), m.end()
            for j in range(1, len(ids)):
                a = offsets[j]
                b = a + len(self.strings[ids[j]])
                if b <= ws or a >= we or a == b:
                    continue
                region = text[a:we]
                tokens = self.tokens(region)
                if tokens:
                    out.append((j - 1, tokens))
        return out


class _Marks(NamedTuple):
    """Positions where a bad word comes (hidden state, unedited log-sum-exp, penalised tokens) and the other
    positions of the same texts (hidden state, log-sum-exp)."""

    h: Any
    lse: Any
    tokens: list[set[int]]
    h_other: Any
    lse_other: Any

    def join(self, more: _Marks) -> _Marks:
        import torch

        return _Marks(torch.cat([self.h, more.h]), torch.cat([self.lse, more.lse]), self.tokens + more.tokens,
                      torch.cat([self.h_other, more.h_other]), torch.cat([self.lse_other, more.lse_other]))


class _Hidden:
    """Final hidden states (what the output layer reads) and the log-sum-exp of the unedited logits."""

    def __init__(self, ctx: Context) -> None:
        self.fp = ctx.fp
        self.progress = ctx.progress
        self.captured: list[Any] = []
        head = ctx.fp.model.get_output_embeddings()  # type: ignore[no-untyped-call]
        self.hook = head.register_forward_hook(lambda _m, args, _out: self.captured.append(args[0]))

    def run(self, batch_ids: list[list[int]]) -> tuple[list[Any], list[Any]]:
        torch = self.fp.torch
        inp, att = self.fp.padded(batch_ids)
        self.captured.clear()
        with torch.no_grad():
            logits = self.fp.model(input_ids=inp, attention_mask=att).logits.float()
        h = self.captured[-1].float()
        lse = torch.logsumexp(logits, dim=-1)
        return [h[k, : len(ids)] for k, ids in enumerate(batch_ids)], [lse[k, : len(ids)] for k, ids in enumerate(batch_ids)]

    def close(self) -> None:
        self.hook.remove()


@register_method
class Unlikelihood(Method):
    name = "unlikelihood"
    paper = "Welleck et al., Neural Text Generation with Unlikelihood Training, ICLR 2020 (as an output-row edit)"
    Params = UnlikelihoodParams

    def edits(self, ctx: Context, params: Any) -> tuple[list[Edit], dict[str, Any]]:
        p: UnlikelihoodParams = params
        if p.rounds < 1 or p.steps < 1:
            raise PydetoxError(f"unlikelihood: rounds and steps must be >= 1, got {p.rounds} and {p.steps}")
        torch = ctx.fp.torch
        torch.manual_seed(p.seed)
        from pydetox.discover.data import EMBEDDED, usable_pairs
        from pydetox.splits import discovery_prompts, evaluation_prompts, training_wiki

        tok = ctx.fp.tokenizer
        w = ctx.fp.unembedding().float()
        vocab, d = w.shape
        spell = _Spelling(tok, vocab)
        rows, _ = usable_pairs(EMBEDDED, set(evaluation_prompts()))
        rng = np.random.default_rng(p.seed)
        rows = [rows[int(i)] for i in rng.permutation(len(rows))[: p.pairs]]
        clean_texts = training_wiki()
        bad = bad_words(ctx, p, rows, clean_texts)
        prompts = discovery_prompts(p.prompts)
        hidden = _Hidden(ctx)
        try:
            # Marks on the toxic side of the pairs.
            seqs = [tok(r["toxic"], truncation=True, max_length=64)["input_ids"] for r in rows]
            marks = _collect(hidden, seqs, spell, bad, "marks: pairs")
            n_pair_marks = len(marks.tokens)
            # Clean positions: Wikipedia after the texts the calibrator may see, with and without BOS, and the
            # neutral side of the pairs.
            clean_seqs = [tok(t, truncation=True, max_length=96)["input_ids"] for t in clean_texts[:320]]
            clean_seqs += [tok(t, truncation=True, max_length=96, add_special_tokens=False)["input_ids"] for t in clean_texts[320:400]]
            clean_seqs += [tok(r["neutral"], truncation=True, max_length=64)["input_ids"] for r in rows]
            hc, lc = _positions(hidden, clean_seqs, "clean text")
            keep = torch.randperm(len(hc), generator=torch.Generator().manual_seed(p.seed))[: p.clean_positions]
            hc, lc = hc[keep], lc[keep]
            rows_t = np.zeros(0, dtype=np.int64)
            delta = torch.zeros(0, d)
            history = []
            for rnd in range(p.rounds):
                gen = _generate(ctx, prompts, p.max_new_tokens, rows_t, delta, f"round {rnd + 1}: generate")
                new = _collect(hidden, gen, spell, bad, f"round {rnd + 1}: marks")
                marks = marks.join(new)
                rows_t, delta, log = _train(w, marks, hc, lc, rows_t, delta, p, rnd, ctx.progress)
                history.append({"round": rnd + 1, "generated_marks": len(new.tokens), **log})
        finally:
            hidden.close()
        if len(rows_t) == 0:
            raise PydetoxError("unlikelihood: no bad word was found in the discovery texts")
        edit = Edit(ctx.fp.output_name, EditKind.ADD_ROWS, (vocab, d), rows_t.astype(np.float32),
                    delta.detach().numpy().astype(np.float32), source=ctx.fp.output_source)
        return [edit], {"bad_words": len(bad), "pair_marks": n_pair_marks, "discovery_prompts": len(prompts),
                        "rows": len(rows_t), "rounds": history,
                        "examples": sorted(spell.strings[int(t)] for t in rows_t[:60])}


def _positions(hidden: _Hidden, seqs: list[list[int]], label: str, batch: int = 16) -> tuple[Any, Any]:
    torch = hidden.fp.torch
    hs, ls = [], []
    for s in tqdm(range(0, len(seqs), batch), desc=label, leave=False, disable=not hidden.progress):
        h, lse = hidden.run(seqs[s : s + batch])
        hs += h
        ls += lse
    return torch.cat(hs), torch.cat(ls)


def _collect(hidden: _Hidden, seqs: list[list[int]], spell: _Spelling, bad: set[str], label: str,
             batch: int = 16) -> _Marks:
    """Hidden states, log-sum-exp and penalised tokens at every bad-word position of the sequences, and hidden
    states and log-sum-exp at every other position of the sequences that have a mark (the KL keeps the edit from
    raising tokens there: without it greedy decoding fell into loops of raised pieces such as 'vag' + 'gy')."""
    torch = hidden.fp.torch
    d = hidden.fp.output_shape[1]
    marked = [(k, spell.marks(ids, bad)) for k, ids in enumerate(seqs)]
    marked = [(k, m) for k, m in marked if m]
    hs, ls, sets = [torch.zeros(0, d)], [torch.zeros(0)], []
    hu, lu = [torch.zeros(0, d)], [torch.zeros(0)]
    for s in tqdm(range(0, len(marked), batch), desc=label, leave=False, disable=not hidden.progress):
        chunk = marked[s : s + batch]
        h, lse = hidden.run([seqs[k] for k, _ in chunk])
        for i, (k, m) in enumerate(chunk):
            at = {q for q, _ in m}
            pos = torch.tensor([q for q, _ in m])
            hs.append(h[i][pos])
            ls.append(lse[i][pos])
            sets += [tokens for _, tokens in m]
            rest = torch.tensor([q for q in range(1, len(seqs[k]) - 1) if q not in at], dtype=torch.long)
            hu.append(h[i][rest])
            lu.append(lse[i][rest])
    return _Marks(torch.cat(hs), torch.cat(ls), sets, torch.cat(hu), torch.cat(lu))


def _generate(ctx: Context, prompts: list[str], max_new: int, rows_t: np.ndarray, delta: Any, label: str,
              batch: int = 32) -> list[list[int]]:
    """Greedy continuations (prompt + continuation token ids) of the model with the edit so far."""
    torch = ctx.fp.torch
    tok = ctx.fp.tokenizer
    head = ctx.fp.model.get_output_embeddings()  # type: ignore[no-untyped-call]
    idx = torch.from_numpy(rows_t)

    def add(_m: Any, args: tuple[Any, ...], out: Any) -> Any:
        if len(idx) == 0:
            return out
        out = out.clone()
        out[..., idx] += args[0] @ delta.detach().T
        return out

    hook = head.register_forward_hook(add)
    side = tok.padding_side
    tok.padding_side = "left"
    seqs = []
    try:
        with torch.no_grad():
            for s in tqdm(range(0, len(prompts), batch), desc=label, leave=False, disable=not ctx.progress):
                enc = tok(prompts[s : s + batch], return_tensors="pt", padding=True, truncation=True, max_length=64)
                out = ctx.fp.model.generate(**enc, max_new_tokens=max_new, do_sample=False,  # type: ignore[misc, unused-ignore]
                                            pad_token_id=tok.pad_token_id)
                for k in range(len(out)):
                    seqs.append([int(t) for t, m in zip(out[k].tolist(), enc["attention_mask"][k].tolist() + [1] * max_new, strict=False)
                                 if m and t != tok.pad_token_id])
    finally:
        tok.padding_side = side
        hook.remove()
    return seqs


def _train(w: Any, marks: _Marks, hc: Any, lc: Any, rows_t: np.ndarray, delta: Any,
           p: UnlikelihoodParams, rnd: int, progress: bool) -> tuple[np.ndarray, Any, dict[str, float]]:
    """Adam on the added rows: unlikelihood of the penalised tokens at the marks + kl_weight x KL on clean text and
    on the other positions of the marked texts (half of each batch from either)."""
    import torch

    hm, lm, sets, hu, lu = marks
    rows_new = np.array(sorted(set(rows_t.tolist()).union(*sets)), dtype=np.int64)
    where = {int(t): k for k, t in enumerate(rows_new)}
    start = torch.zeros(len(rows_new), w.shape[1])
    if len(rows_t):
        start[torch.tensor([where[int(t)] for t in rows_t])] = delta.detach()
    D = start.clone().requires_grad_(True)
    sel = torch.zeros(len(sets), len(rows_new), dtype=torch.bool)
    for i, tokens in enumerate(sets):
        sel[i, torch.tensor([where[t] for t in tokens])] = True
    wr = w[torch.from_numpy(rows_new)]
    gen = torch.Generator().manual_seed(p.seed + rnd)
    pick = torch.randperm(len(hu), generator=gen)[: p.clean_positions]
    hu, lu = hu[pick], lu[pick]
    zm, zc, zu = hm @ wr.T, hc @ wr.T, hu @ wr.T  # unedited logits of the edited rows
    n_val_m = max(1, len(sets) // 10)
    perm = torch.randperm(len(sets), generator=gen)
    vm, tm = perm[:n_val_m], perm[n_val_m:]
    n_val_c = min(4000, len(hc) // 5)
    n_val_u = min(4000, len(hu) // 5)

    def rest(z: Any, lse: Any) -> Any:
        # log-sum-exp of the logits the edit leaves alone
        share = torch.exp(torch.logsumexp(z, 1) - lse).clamp(max=1 - 1e-6)
        return lse + torch.log1p(-share)

    rm, rc, ru = rest(zm, lm), rest(zc, lc), rest(zu, lu)

    def unlikely(i: Any) -> tuple[Any, Any]:
        zn = zm[i] + hm[i] @ D.T
        lse = torch.logaddexp(rm[i], torch.logsumexp(zn, 1))
        pbad = torch.logsumexp((zn - lse[:, None]).masked_fill(~sel[i], -1e30), 1).exp().clamp(max=1 - 1e-6)
        return -torch.log1p(-pbad), pbad

    def kl(i: Any, h: Any = hc, z: Any = zc, r: Any = rc) -> Any:
        z0, zn = z[i], z[i] + h[i] @ D.T
        lse0 = torch.logaddexp(r[i], torch.logsumexp(z0, 1))
        lse1 = torch.logaddexp(r[i], torch.logsumexp(zn, 1))
        p0 = torch.exp(z0 - lse0[:, None])
        return (lse1 - lse0) + (p0 * (z0 - zn)).sum(1)

    with torch.no_grad():
        _, base_val = unlikely(vm)
    opt = torch.optim.Adam([D], lr=p.lr)
    for _ in tqdm(range(p.steps), desc=f"round {rnd + 1}: train", leave=False, disable=not progress):
        batch = torch.randint(n_val_c, len(hc), (4096,), generator=gen)
        loss = unlikely(tm)[0].mean() + p.kl_weight * kl(batch).mean()
        if len(hu) > n_val_u:
            other = torch.randint(n_val_u, len(hu), (4096,), generator=gen)
            loss = loss + p.unmarked_kl_weight * kl(other, hu, zu, ru).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, val = unlikely(vm)
        val_kl = kl(torch.arange(n_val_c))
        val_kl_u = kl(torch.arange(n_val_u), hu, zu, ru) if n_val_u else torch.zeros(1)
    return rows_new, D.detach(), {"marks": len(sets), "rows": len(rows_new),
                                  "held_out_p_bad_before": float(base_val.mean()), "held_out_p_bad_after": float(val.mean()),
                                  "held_out_clean_kl": float(val_kl.mean()),
                                  "held_out_unmarked_kl": float(val_kl_u.mean())}
