"""The teacher: the fused model's top-k distributions on the toxic contexts (computed in llama.cpp, kept in a .npz
cache keyed by everything they depend on), restricted to tokens the unedited model finds plausible, and the
anti-expert's decay of them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from pydetox.discover.distill.data import _benign_continuations, _chat_continuations
from pydetox.discover.distill.params import DistillParams
from pydetox.errors import PydetoxError


class _Targets:
    """Token sequences with a target distribution at each position but the last: top-k token ids, their
    log-probabilities, and the log-probability of the rest of the vocabulary. `groups`: the context each sequence
    came from (sequences of one group share their prompt, and are held out together). `have` (None: every one): which
    sequences have their targets; the others hold none (zero rows)."""

    def __init__(self, seqs: list[list[int]], ids: list[Any], logp: list[Any], rest: list[Any],
                 groups: np.ndarray, have: np.ndarray | None = None) -> None:
        self.seqs, self.ids, self.logp, self.rest, self.groups, self.have = seqs, ids, logp, rest, groups, have

    def __len__(self) -> int:
        return len(self.seqs)

    def missing(self, pick: Any) -> list[int]:
        """The sequences of `pick` without targets."""
        return [] if self.have is None else [int(i) for i in pick if not self.have[i]]

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {**_pack(self.seqs, prefix), f"{prefix}ids": np.concatenate(self.ids),
                f"{prefix}logp": np.concatenate(self.logp), f"{prefix}rest": np.concatenate(self.rest),
                f"{prefix}groups": self.groups, **({} if self.have is None else {f"{prefix}have": self.have})}

    @classmethod
    def from_arrays(cls, z: Any, prefix: str) -> _Targets:
        have = z.get(f"{prefix}have", None)
        rows = z[f"{prefix}lengths"] - 1  # targets: every position but the last
        pos = np.cumsum(rows if have is None else rows * have)[:-1]
        return cls(_unpack(z, prefix), np.split(z[f"{prefix}ids"], pos), np.split(z[f"{prefix}logp"], pos),
                   np.split(z[f"{prefix}rest"], pos), z[f"{prefix}groups"], have)


def _pack(seqs: list[list[int]], prefix: str) -> dict[str, np.ndarray]:
    """Token sequences of different lengths as two flat arrays, PREFIXlengths and PREFIXtokens."""
    return {f"{prefix}lengths": np.array([len(s) for s in seqs], np.int64),
            f"{prefix}tokens": np.concatenate([np.asarray(s, np.int64) for s in seqs])}


def _unpack(z: Any, prefix: str) -> list[list[int]]:
    return [t.tolist() for t in np.split(z[f"{prefix}tokens"], np.cumsum(z[f"{prefix}lengths"])[:-1])]


# Bumped when the teacher's contexts or targets change for the same settings, so that no cache serves the old ones
# (5: decodes of `teacher_batch` positions, which moves some targets by llama.cpp's rounding).
TEACHER_FORMAT = 5
TEACHER_KEYS = ("calibrator", "alpha", "top_k", "plausible", "one_sided", "one_sided_center", "blank_cap", "toxic_gate",
                "toxic_gate_from", "pairs", "pair_prompts", "clean_texts", "prompts", "max_prompts", "max_new_tokens",
                "max_tokens", "seed", "samples", "top_p")


def file_stamp(f: Path) -> list[Any]:
    """A file as distill's caches see it: its name, size and modification time, not its folder. The recipe's stages
    are keyed by their inputs, not by where the stages folder lies, so a moved or renamed output folder keeps them;
    with the path in these keys its student would find the teacher's cache stale and compute the teacher again in
    its own process, beside the torch model."""
    st = f.stat()
    return [f.name, st.st_size, st.st_mtime_ns]


def _cache_key(source: Path, p: DistillParams) -> str:
    import json

    return json.dumps({"format": TEACHER_FORMAT, "model": file_stamp(source), "calibrator_file": file_stamp(Path(p.calibrator)),
                       **{k: getattr(p, k) for k in TEACHER_KEYS}}, sort_keys=True)


_T = TypeVar("_T")


def _sibling(cache: Path | None, role: str) -> Path | None:
    """`cache`'s sibling CACHE.<role>.npz: where a part of distill's targets computed apart from the teacher's is kept."""
    return None if cache is None else cache.with_name(cache.name.removesuffix(".npz") + f".{role}.npz")


def _read_npz(path: Path | None, key: str, read: Callable[[Any], _T]) -> _T | None:
    """`read` of the .npz at `path` when it is there and was written under `key` (`_save_npz`); None otherwise."""
    if path is None or not path.is_file():
        return None
    with np.load(path) as z:
        return read(z) if str(z["key"]) == key else None


def _save_npz(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """`arrays` and the cache `key` in a .npz written under a temporary name and renamed when complete."""
    from pydetox.output import atomic

    with atomic(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would add .npz to the name
        np.savez(f, key=np.array(key), **arrays)  # type: ignore[arg-type]


def _save_cache(path: Path, key: str, toxic: _Targets, clean: list[list[int]]) -> None:
    _save_npz(path, key, {**_pack(clean, "clean_"), **toxic.arrays("t_")})


def _top(logp: np.ndarray, k: int, plausible: np.ndarray | None = None, sparse: bool | None = None,
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k ids, their log-probabilities and the log-probability of the rest, per row. With `plausible` (a mask of
    the same shape), the distribution is first restricted to the masked tokens and renormalized over them. `sparse`:
    whether to compute on the masked tokens alone (None: `_sparse` of the mask decides)."""
    if plausible is not None and (_sparse(np.count_nonzero(plausible, axis=1), plausible.shape[1])
                                  if sparse is None else sparse):
        return _top_plausible(logp, k, plausible)
    return _top_dense(logp, k, plausible)


def _sparse(per_row: np.ndarray, vocab: int) -> bool:
    """Whether a mask with `per_row` tokens in each row is for `_top_plausible` (each row has one, all together
    under 1% of the rows' vocabulary) rather than `_top_dense`. The two agree to rounding, not bit for bit: a
    teacher's rows all take the path its whole decode batch takes, whatever blocks it is computed in."""
    return bool(per_row.all() and per_row.sum() < 0.01 * per_row.size * vocab)


def _top_plausible(logp: np.ndarray, k: int, plausible: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_top` with a mask, computed on the masked tokens only (a handful to a few hundred of Gemma-3's 262,144 per
    position) instead of whole rows. Every row must have a masked token. Where a row has fewer than k, the other slots
    hold other token ids with no mass (log-probability -1e4), as in `_top_dense`."""
    n = logp.shape[0]
    rows, cols = np.nonzero(plausible)  # row-major: sorted by row
    counts = np.bincount(rows, minlength=n)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    vals = logp[rows, cols].astype(np.float64)
    m = np.maximum.reduceat(vals, starts)
    norm = vals - (m + np.log(np.add.reduceat(np.exp(vals - m[rows]), starts)))[rows]
    order = np.lexsort((-norm, rows))  # by row, then most likely first
    rank = np.arange(len(order)) - starts[rows[order]]
    first_k = rank < k
    kept, slot = order[first_k], rank[first_k]
    idx = np.empty((n, k), np.int64)
    top = np.full((n, k), -1e4, np.float32)
    idx[rows[kept], slot] = cols[kept]
    top[rows[kept], slot] = norm[kept]
    for i in np.flatnonzero(counts < k):
        have = cols[starts[i] : starts[i] + counts[i]]
        idx[i, counts[i] :] = np.setdiff1d(np.arange(k + counts[i]), have)[: k - counts[i]]
    mass = np.exp(top.astype(np.float64)).sum(1)
    return idx, top, np.log(np.clip(1.0 - mass, 1e-12, None)).astype(np.float32)


def _top_dense(logp: np.ndarray, k: int, plausible: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray,
                                                                                         np.ndarray]:
    """`_top` on whole rows (numpy over every token); the reference `_top_plausible` is measured against."""
    if plausible is not None:
        logp = np.where(plausible, logp, -np.inf)
        m = logp.max(axis=1, keepdims=True)
        logp = logp - (m + np.log(np.exp(logp - m).sum(axis=1, keepdims=True)))
    idx = np.argpartition(-logp, k, axis=1)[:, :k].astype(np.int64)
    top = np.maximum(np.take_along_axis(logp, idx, axis=1), -1e4).astype(np.float32)  # -inf: masked, mass 0
    mass = np.exp(top.astype(np.float64)).sum(1)
    rest = np.log(np.clip(1.0 - mass, 1e-12, None)).astype(np.float32)
    return idx, top, rest


def top_p_draw(z: np.ndarray, top_p: float, rng: np.random.Generator) -> int:
    """One token drawn from softmax(z) (temperature 1) restricted to its nucleus: the most probable tokens whose
    probabilities first reach `top_p` together, the token that crosses it included (llama.cpp's top-p sampler after
    its temperature sampler, as `pydetox eval --temperature 1 --top-p P` samples). Exact: the nucleus is looked for
    among the 256 most probable tokens, and over the whole sorted vocabulary only when they hold less than `top_p`."""
    pr = np.exp(z.astype(np.float64) - z.max())
    pr /= pr.sum()
    cand = np.argpartition(-pr, 255)[:256] if pr.size > 256 else np.arange(pr.size)
    if pr[cand].sum() < top_p:
        cand = np.arange(pr.size)
    cand = cand[np.argsort(-pr[cand], kind="stable")]
    cum = np.cumsum(pr[cand])
    keep = cand[: int(np.searchsorted(cum, top_p)) + 1]
    w = pr[keep]
    return int(keep[rng.choice(len(keep), p=w / w.sum())])


def blank_tokens(rt: Any) -> np.ndarray:
    """Ids of the tokens whose text is whitespace only (spaces, no-break spaces, tabs, newlines); control and
    end-of-generation tokens excluded."""
    out = []
    for t in range(rt.n_vocab):
        if rt.is_eog(t) or rt.lib.llama_vocab_is_control(rt.vocab, t):
            continue
        text = rt.detokenize([t])
        if text and not text.strip():
            out.append(t)
    return np.asarray(out, np.int64)


GATE_MIN_COUNT = 3  # toxic-side uses of a token in the pairs before `toxic_gate` can weight it


def gate_weights(toxic: np.ndarray, neutral: np.ndarray, start: float) -> np.ndarray:
    """`toxic_gate`'s weight per token from its counts on the two sides of the pairs: the add-one smoothed log-odds
    of the toxic side against the neutral one, from `start` nats (weight 0) to `start` + 1 (weight 1); 0 for a token
    the toxic side uses under GATE_MIN_COUNT times."""
    log_odds = np.log((toxic + 1.0) / max(1.0, toxic.sum())) - np.log((neutral + 1.0) / max(1.0, neutral.sum()))
    return (np.clip(log_odds - start, 0.0, 1.0) * (toxic >= GATE_MIN_COUNT)).astype(np.float32)


def toxic_gate(rt: Any, start: float) -> np.ndarray:
    """`gate_weights` on the runtime's tokenization of every usable embedded ParaDetox pair (evaluation prompts left
    out), each text after a space as the teacher's contexts continue mid-text."""
    from pydetox import splits
    from pydetox.discover.data import EMBEDDED, usable_pairs

    rows, _ = usable_pairs(EMBEDDED, set(splits.evaluation_prompts()))
    counts = np.zeros((2, rt.n_vocab), np.float64)
    for r in rows:
        for side, text in enumerate((r["toxic"], r["neutral"])):
            ids = np.asarray(rt.tokenize(" " + text, add_special=False), np.int64)
            np.add.at(counts[side], ids[ids < rt.n_vocab], 1.0)
    return gate_weights(counts[0], counts[1], start)


def cap_gain(lp: np.ndarray, rest: np.ndarray, base: np.ndarray, capped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows (log-probabilities `lp`, the rest's `rest`) with the `capped` slots lowered to at most `base` (the
    unedited log-probabilities there) and the mass they lose given to the other slots and the rest in proportion.
    Rows whose capped tokens hold everything are left as they are."""
    p = np.exp(lp.astype(np.float64))
    others = np.where(capped, 0.0, p).sum(1) + np.exp(rest.astype(np.float64))
    capped = capped & (others > 0)[:, None]
    new = np.where(capped, np.minimum(p, np.exp(base.astype(np.float64))), p)
    scale = 1.0 + (p - new).sum(1) / np.maximum(others, 1e-300)
    new = np.where(capped, new, p * scale[:, None])
    out = np.where(lp <= -1e4, lp, np.log(np.maximum(new, 1e-300))).astype(np.float32)  # no-mass slots stay so
    return out, (rest + np.log(scale)).astype(np.float32)


class _TeacherPass:
    """The fused runtime's decodes, read as targets: per decoded position the teacher's top-k row (ids, logp, rest),
    the argmax of the fused and of the unedited logits (the next greedy token of each continuation), and where asked
    a token drawn from the unedited logits (the next token of a sampled continuation)."""

    def __init__(self, rt: Any, p: DistillParams) -> None:
        self.rt, self.p = rt, p
        self.floor = np.log(p.plausible) if p.plausible > 0 else None
        self.rng = np.random.default_rng(p.seed)
        self.blank = blank_tokens(rt) if p.blank_cap else None
        self.gate = toxic_gate(rt, p.toxic_gate_from) if p.toxic_gate else None

    def rows(self, items: list[tuple[int, int, int, bool]], draw: dict[int, int] | None = None,
             ) -> tuple[list[tuple[Any, Any, Any]], np.ndarray, np.ndarray, dict[int, list[int]]]:
        """Decode items (all with outputs) in chunks of the runtime's batch; for each item index in `draw`, that
        many tokens sampled independently from its unedited logits (`top_p_draw`)."""
        rt = self.rt
        out: list[tuple[Any, Any, Any]] = []
        best_f, best_b = [], []
        drawn: dict[int, list[int]] = {}
        for c in range(0, len(items), rt.n_batch):
            chunk = items[c : c + rt.n_batch]
            rt.decode(chunk)
            zf, zb = rt.logits(len(chunk)), rt.target_logits(len(chunk))
            # the tokens the unedited model finds plausible (a bool per logit: a quarter of a float32 copy), for the
            # whole decode: it also picks `_top`'s path for every row of it
            ok = None if self.floor is None else zb >= zb.max(axis=1, keepdims=True) + self.floor
            sparse = None if ok is None else _sparse(np.count_nonzero(ok, axis=1), rt.n_vocab)
            # Every step below is row by row: a block of rows at a time holds a few vocabulary-wide float32 copies
            # of ROW_BLOCK rows, not of the whole batch (Qwen2.5: 0.6 MB a row)
            for b in range(0, len(chunk), ROW_BLOCK):
                rows = range(c + b, c + min(b + ROW_BLOCK, len(chunk)))
                ids, lp, rest, bf, bb, got = self._block(
                    zf[b : b + ROW_BLOCK], zb[b : b + ROW_BLOCK], None if ok is None else ok[b : b + ROW_BLOCK],
                    {i - c - b: draw[i] for i in sorted(draw or ()) if i in rows}, sparse)
                out += list(zip(ids, lp, rest, strict=True))
                best_f.append(bf)
                best_b.append(bb)
                drawn.update({i + c + b: d for i, d in got.items()})
            del zf, zb  # views of this decode's buffers: the next decode replaces them
        return out, np.concatenate(best_f), np.concatenate(best_b), drawn

    def _block(self, zf: np.ndarray, zb: np.ndarray, ok: np.ndarray | None, draw: dict[int, int],
               sparse: bool | None) -> tuple[Any, ...]:
        """Rows of one decode (fused logits `zf`, unedited `zb`, the plausible tokens `ok`; None: no restriction):
        top-k ids, log-probabilities and rest, the fused and the unedited argmax, and the tokens drawn for the rows in
        `draw` (row: how many). `sparse`: `_top`'s."""
        from pydetox.runtime import log_softmax

        p = self.p
        best_b = zb.argmax(1)
        drawn = {i: [top_p_draw(zb[i], p.top_p, self.rng) for _ in range(n)] for i, n in draw.items()}
        lb = log_softmax(zb) if p.one_sided > 0 or self.blank is not None else None
        if p.one_sided > 0:  # the unedited distribution, lowered where the fused one is lower (see one_sided)
            assert lb is not None
            shift = log_softmax(zf)
            shift -= lb
            if p.one_sided_center:
                likeliest = np.argpartition(-lb, p.top_k, axis=1)[:, : p.top_k]
                shift -= np.median(np.take_along_axis(shift, likeliest, axis=1), axis=1, keepdims=True)
            np.minimum(shift, 0.0, out=shift)
            if self.gate is not None:
                shift *= self.gate
            shift *= p.one_sided
            shift += lb
            zf = shift
        if ok is None:
            best_f = zf.argmax(1)
            i, lp, r = _top(log_softmax(zf), p.top_k)
        else:  # the restricted distribution is renormalised over the plausible tokens: raw logits will do
            # the fused continuation follows the restricted teacher too: the raw fused argmax walks into junk
            # ('pulumi', runs of no-break spaces) that the targets then have to continue, and the student learns
            # to emit it (docs/results/teacher-junk.md)
            best_f = np.where(ok, zf, -np.inf).argmax(1)
            i, lp, r = _top(zf, p.top_k, ok, sparse)
        if self.blank is not None:
            assert lb is not None
            base = np.take_along_axis(lb, i, axis=1)
            if ok is not None:  # the unedited model restricted to the plausible tokens, as the teacher is
                rows, cols = np.nonzero(ok)
                mass = np.bincount(rows, weights=np.exp(lb[rows, cols].astype(np.float64)), minlength=len(ok))
                base = base - np.log(mass)[:, None].astype(np.float32)
            lp, r = cap_gain(lp, r, base, np.isin(i, self.blank))
            order = np.argsort(-lp, axis=1, kind="stable")  # most likely first, as `_top` gives them
            i, lp = np.take_along_axis(i, order, axis=1), np.take_along_axis(lp, order, axis=1)
            best_f = i[:, 0]
        return i, lp, r, best_f, best_b, drawn

    def continue_wave(self, wave: list[list[int]]) -> tuple[list[list[int]], list[list[Any]]]:
        """Prompts (at most n_seq) continued greedily by the fused model (sequences 0..n-1) and by the unedited one
        (n..2n-1), and `samples` times sampled from the unedited one (2n.., prompt by prompt within each round), all
        from one decode of each prompt (KV cache copied); each sequence with its target rows."""
        rt, p = self.rt, self.p
        n = len(wave)
        m = (2 + p.samples) * n
        rt.clear()
        last, at = [], 0
        for q in wave:
            at += len(q)
            last.append(at - 1)
        got, bf, bb, drawn = self.rows([(t, j, s, True) for s, q in enumerate(wave) for j, t in enumerate(q)],
                                       dict.fromkeys(last, p.samples) if p.samples else None)
        seq_rows: list[list[Any]] = [[] for _ in range(m)]
        nxt: dict[int, int] = {}
        at = 0
        for s, q in enumerate(wave):
            for k in range(2 + p.samples):
                seq_rows[s + k * n] = list(got[at : at + len(q)])
                if k:
                    rt.copy_sequence(s, s + k * n)
            nxt[s], nxt[s + n] = int(bf[at + len(q) - 1]), int(bb[at + len(q) - 1])  # fused, unedited
            for k in range(p.samples):
                nxt[s + (2 + k) * n] = drawn[at + len(q) - 1][k]
            at += len(q)
        gen: list[list[int]] = [[] for _ in range(m)]
        active = list(range(m))
        for _ in range(p.max_new_tokens):
            still = []
            for s in active:
                if rt.is_eog(nxt[s]):
                    continue
                gen[s].append(nxt[s])
                if len(gen[s]) < p.max_new_tokens:  # the last token's row is no target
                    still.append(s)
            active = still
            if not active:
                break
            got, bf, bb, drawn = self.rows([(nxt[s], len(wave[s % n]) + len(gen[s]) - 1, s, True) for s in active],
                                           {i: 1 for i, s in enumerate(active) if s >= 2 * n})
            for i, s in enumerate(active):
                seq_rows[s].append(got[i])
                nxt[s] = int(bf[i] if s < n else bb[i] if s < 2 * n else drawn[i][0])
        seqs = [wave[s % n] + gen[s] for s in range(m)]
        return seqs, [seq_rows[s][: len(seqs[s]) - 1] for s in range(m)]

    def texts_wave(self, wave: list[list[int]]) -> list[list[Any]]:
        """Texts (teacher-forced, at most n_seq): the target rows of each."""
        self.rt.clear()
        got, _, _, _ = self.rows([(t, j, s, True) for s, q in enumerate(wave) for j, t in enumerate(q)])
        out, at = [], 0
        for q in wave:
            out.append(got[at : at + len(q) - 1])
            at += len(q)
        return out


# Logits a teacher decode may hold per vocabulary-wide copy: llama.cpp keeps about four (each model's output buffer and
# its graph's output tensor) and the fused logits one more, so at 512 positions Qwen2.5's 151,936 tokens took 0.3 GB a
# copy: on 32 prompts the stage peaked at 2.94 GB with 512 positions, 2.56 GB with 128 (the whole stage: 2.63 GB).
TEACHER_LOGITS = 1 << 25


def teacher_batch(vocab: int) -> int:
    """Positions per teacher decode for a vocabulary of `vocab` tokens: the largest power of two from 32 to 512 whose
    vocabulary-wide rows hold at most TEACHER_LOGITS logits (SmolLM2: 512, Qwen2.5: 128, Gemma-3: 128)."""
    n = 512
    while n > 32 and n * vocab > TEACHER_LOGITS:
        n //= 2
    return n


# Rows of a decode the teacher's numpy work takes at a time (`_TeacherPass.rows`): each of its vocabulary-wide
# float32 copies is this many rows, whatever the batch.
ROW_BLOCK = 32

# Prompts continued together: each decode carries 2 x WAVE sequences (the fused and the unedited continuation of
# every prompt), all in one KV cache whose used cells every token attends over. 32 was no faster on SmolLM2 (96
# prompts + 32 texts: 38.2 s against 33.1-37.8 s at 16) and changes the continuations (other batch shapes, other
# rounding in llama.cpp).
WAVE = 16


def _teacher(source: Path, p: DistillParams, prompts: list[str], toxic_texts: list[str], progress: bool,
             tokenize_only: list[str]) -> tuple[_Targets, list[list[int]]]:
    """Contexts: the prompts continued greedily by the fused model and by the unedited model (where the edit has to
    act), `samples` times sampled from the unedited model (where sampled decoding takes it), and the toxic texts.
    Targets: the fused model's top-k next-token distribution at every position,
    restricted to tokens the unedited model finds plausible (probability >= `plausible` times its top token's, the
    adaptive plausibility constraint of contrastive decoding, Li et al. 2023): at a strong mixing weight the fused
    model puts mass on junk tokens ('HETATM', 'firehose') that a student would learn to emit. Also the llama.cpp
    tokenization of `tokenize_only` (the clean texts).

    One pass: the fused runtime computes the unedited model's logits and the fused ones in the same decode, so the
    targets are read off while the continuations are generated (both continuations of a prompt share its decoded
    prompt through a copy of its KV cache), instead of generating first and decoding every sequence again."""
    from pydetox.fusion import FusedRuntime
    from pydetox.gguf_io import ModelFile

    with ModelFile(source) as model:
        batch = teacher_batch(model.tensors["token_embd.weight"].rows)
    n_seq = WAVE
    per = 2 + p.samples  # continuations of each prompt
    n_ctx = per * n_seq * (p.max_tokens + p.max_new_tokens) + 64
    seqs: list[list[int]] = []
    targets: list[list[Any]] = []
    groups: list[int] = []  # the prompt's index; len(prompts) + j for the j-th toxic text
    with FusedRuntime(source, p.calibrator, p.alpha, n_ctx=n_ctx, n_seq=per * n_seq, n_batch=batch) as rt:
        teach = _TeacherPass(rt, p)
        toks = [rt.tokenize(q)[: p.max_tokens] for q in prompts]
        for s0 in tqdm(range(0, len(toks), n_seq), desc="teacher: continue prompts", leave=False, disable=not progress):
            wave = toks[s0 : s0 + n_seq]
            got_seqs, got_rows = teach.continue_wave(wave)
            seqs += got_seqs
            targets += got_rows
            groups += [s0 + s % len(wave) for s in range(per * len(wave))]
        texts = [rt.tokenize(t)[: p.max_tokens] for t in toxic_texts]
        for s0 in tqdm(range(0, len(texts), n_seq), desc="teacher: toxic texts", leave=False, disable=not progress):
            numbered = [(s0 + j, t) for j, t in enumerate(texts[s0 : s0 + n_seq]) if len(t) >= 2]
            if not numbered:
                continue
            seqs += [q for _, q in numbered]
            targets += teach.texts_wave([q for _, q in numbered])
            groups += [len(prompts) + j for j, _ in numbered]
        clean = [rt.tokenize(t)[: p.max_tokens] for t in tokenize_only]
    unique: dict[tuple[int, ...], int] = {}
    for k, seq in enumerate(seqs):
        if len(seq) >= 3:
            unique.setdefault(tuple(seq), k)  # continuations often agree
    keep = list(unique.values())
    ids = [np.stack([r[0] for r in targets[k]]) for k in keep]
    logp = [np.stack([r[1] for r in targets[k]]) for k in keep]
    rest = [np.array([r[2] for r in targets[k]], np.float32) for k in keep]
    return (_Targets([seqs[k] for k in keep], ids, logp, rest, np.asarray([groups[k] for k in keep], np.int64)),
            [c for c in clean if len(c) >= 3])


def _fused_logp(source: Path, model: str, alpha: float, toxic: _Targets, progress: bool, desc: str) -> list[np.ndarray]:
    """Per sequence, log p_unedited and log p of the unedited model fused with `model` at `alpha`, at the teacher's
    top-k token ids, stacked ((2, positions, k), float32; one decode of both)."""
    from pydetox.fusion import FusedRuntime

    n = max(len(s) for s in toxic.seqs)
    out = []
    with FusedRuntime(source, model, alpha, n_ctx=n, n_batch=n) as rt:
        for seq, ids in tqdm(zip(toxic.seqs, toxic.ids, strict=True), total=len(toxic), desc=desc, leave=False,
                             disable=not progress):
            la, lb = rt.logprobs_and_target(seq)
            out.append(np.stack([np.take_along_axis(lb, ids, axis=1), np.take_along_axis(la, ids, axis=1)]))
    return out


def _debiased(t: _Targets, both: list[np.ndarray], lam: float, spare: np.ndarray | None = None, rule: str = "prob",
              margin: float = 1.0) -> _Targets:
    """The targets with lam * min(0, p_ref - p_anti) (rule "prob"), or lam * min(0, log p_ref - log p_anti +
    log margin) (rule "ratio"), added to their top-k log-probabilities (`both`: the two log-probabilities per position
    and token, p_ref first: the unedited model's or the expert's), renormalised together with the rest bucket (left
    as it is). Slots with no mass (-1e4) stay without mass; token ids in `spare` (special tokens) get no penalty."""
    logp, rest = [], []
    for lp, r, b, ids in zip(t.logp, t.rest, both, t.ids, strict=True):
        ref, anti = b[0].astype(np.float64), b[1].astype(np.float64)
        gap = ref - anti + np.log(margin) if rule == "ratio" else np.exp(ref) - np.exp(anti)
        pen = lam * np.minimum(0.0, gap)
        if spare is not None:
            pen[np.isin(ids, spare)] = 0.0
        new = lp.astype(np.float64) + pen
        z = np.logaddexp(np.logaddexp.reduce(new, axis=1), r.astype(np.float64))
        logp.append((new - z[:, None]).astype(np.float32))
        rest.append((r - z).astype(np.float32))
    return _Targets(t.seqs, t.ids, logp, rest, t.groups)


def _side_logp(source: Path, role: str, model: str, alpha: float, toxic: _Targets, teacher_key: str,
               cache: Path | None, progress: bool) -> tuple[list[np.ndarray], bool]:
    """`_fused_logp` for the anti-expert or the expert (`role`), read from or written to `cache`'s sibling
    CACHE.<role>.npz, and whether it came from there."""
    import json

    key = json.dumps({"teacher": teacher_key, role: file_stamp(Path(model)), "anti_alpha": alpha}, sort_keys=True)
    path = _sibling(cache, role)
    cached = _read_npz(path, key, lambda z: np.split(z["logp"], np.cumsum([len(i) for i in toxic.ids])[:-1], axis=1))
    if cached is not None:
        return cached, True
    both = _fused_logp(source, model, alpha, toxic, progress, f"teacher: {role}")
    if path is not None:
        _save_npz(path, key, {"logp": np.concatenate(both, axis=1)})
    return both, False


def _anti_targets(source: Path, p: DistillParams, toxic: _Targets, teacher_key: str, cache: Path | None,
                  progress: bool, spare: np.ndarray) -> tuple[_Targets, bool]:
    """The teacher's targets moved away from the anti-expert (see `anti`), measured against the expert when there
    is one and against the unedited model when not, and whether the log-probabilities all came from the cache."""
    both, hit = _side_logp(source, "anti", p.anti, p.anti_alpha, toxic, teacher_key, cache, progress)
    if p.expert:
        ref, hit_ref = _side_logp(source, "expert", p.expert, p.anti_alpha, toxic, teacher_key, cache, progress)
        both = [np.stack([e[1], a[1]]) for e, a in zip(ref, both, strict=True)]
        hit = hit and hit_ref
    return _debiased(toxic, both, p.anti_lambda, spare, p.anti_rule, p.anti_margin), hit


def _continuations(cache: Path | None, role: str, source: Path, p: DistillParams, keys: tuple[str, ...],
                   make: Callable[[], list[list[int]]]) -> list[list[int]]:
    """The unedited model's continuations `make` computes (benign sentence starts, chat answers; the default's 600
    benign starts take ~2.5 min on Qwen2.5-0.5B), read from or written to `cache`'s sibling CACHE.<role>.npz, keyed
    by the model file and the parameters they depend on, so a resumed run or another training seed reuses them."""
    import json

    key = json.dumps({"source": file_stamp(source), "seed": p.seed, "max_tokens": p.max_tokens,
                      **{k: getattr(p, k) for k in keys}}, sort_keys=True)
    path = _sibling(cache, role)
    cached = _read_npz(path, key, lambda z: _unpack(z, "seq_"))
    if cached is not None:
        return cached
    seqs = make()
    if path is not None and seqs:
        _save_npz(path, key, _pack(seqs, "seq_"))
    return seqs


def _targets(p: DistillParams, source: Path, prompts: list[str], toxic_texts: list[str], clean_texts: list[str],
             progress: bool, special: Callable[[], Any]) -> tuple[_Targets, list[list[int]], dict[str, Any]]:
    """The teacher's targets on the toxic contexts and the tokenized clean texts, from `cache` when it holds them
    for these settings; with the anti-expert's decay applied when `anti` is set (`special()`: the token ids it leaves
    alone). Also what came from the cache. llama.cpp only: no torch model is needed."""
    cache = Path(p.cache) if p.cache else None
    if cache is not None and cache.suffix != ".npz":
        raise PydetoxError(f"distill: the teacher cache is a .npz file, got {p.cache}")
    key = _cache_key(source, p)
    cached = _read_npz(cache, key, lambda z: (_Targets.from_arrays(z, "t_"), _unpack(z, "clean_")))
    if cached is None:
        toxic, clean_seqs = _teacher(source, p, prompts, toxic_texts, progress, clean_texts)
        if cache is not None:
            _save_cache(cache, key, toxic, clean_seqs)
    else:
        toxic, clean_seqs = cached
    anti_cached = None
    if p.anti:
        spare = np.asarray(special(), np.int64)  # the anti-expert's data ends every text at EOS
        toxic, anti_cached = _anti_targets(source, p, toxic, key, cache, progress, spare)
    if p.benign_starts > 0:
        clean_seqs = clean_seqs + _continuations(cache, "benign", source, p, ("benign_starts", "max_new_tokens"),
                                                 lambda: _benign_continuations(source, p, progress))
    if p.chat_starts > 0:
        clean_seqs = clean_seqs + _continuations(cache, "chat", source, p, ("chat_starts", "chat_tokens"),
                                                 lambda: _chat_continuations(source, p, progress))
    return toxic, clean_seqs, {"teacher_from_cache": cached is not None, **({"anti_from_cache": anti_cached} if p.anti else {})}
