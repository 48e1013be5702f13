"""Fusion distilled into the weights: a low-rank edit of the FFN down-projections that makes the model, in toxic
contexts, predict what the model fused with a calibration model predicts, and elsewhere what it predicted before.

Calibration-model fusion (pydetox.fusion; arXiv 2506.01266) cuts toxicity by large factors at a strong mixing
weight, but it pays for it on every token, clean text included (SmolLM2 at alpha 0.4: 2-2.9x less toxic, +59%
perplexity on news), and it needs a second model at run time. The detox it does happens only where the context is
toxic; the cost is everywhere. So the teacher here is the fused model, asked only about toxic contexts, and the
reference is the unedited model on clean text; the student is the model with a rank-`rank` update B A added to the
down-projection of each chosen layer (the plan's `low_rank` kind, W <- W + L^T R), trained with

    loss = KL(teacher || student) on toxic contexts + clean_weight * KL(unedited || student) on clean text

(knowledge distillation of Hinton et al. 2015, sequence-level as in Kim & Rush 2016: the teacher's distribution at
every position of greedy continuations, the teacher's own and the unedited model's). The edit is free to act only
where the hidden states say the context is toxic, which the fused model cannot do. The teacher KL is over the
teacher's top-`top_k` tokens plus one bucket for the rest of the vocabulary. The clean KL is the same with
`clean_kl=top`, or exact over the whole vocabulary with `clean_kl=full`, the unedited model computed alongside at
each step: the bucket does not see mass moved inside the rest, which matters where the top-k tokens hold little of
the mass (Gemma-3-270m's 262,144 tokens: the bucket read 0.35 where the full KL was 0.43).

Toxic contexts (never the evaluation prompts): the RealToxicityPrompts prompts of `prompts` that are not in
rtp-challenging, each with the fused model's and the unedited model's greedy continuations of `max_new_tokens` tokens,
and the toxic side of `pairs` ParaDetox pairs. The teacher's distributions are restricted to tokens the unedited
model finds plausible (see `_teacher`). Clean text: `clean_texts` Wikipedia paragraphs from the ones the calibrator
trains on (after the held-out ones of `pydetox.splits`; never `news`, where perplexity is measured) and the neutral side of the pairs.
The teacher runs in llama.cpp (the fused runtime of `pydetox eval --calibrator`) on the GGUF the discovery loaded;
the student in torch, on that GGUF's weights dequantized. Given a Q4_K_M, the update is learned on top of the
rounded weights it will be added to, the teacher is that Q4_K_M fused, and the clean anchor is its own output (on
SmolLM2 such an edit cut more at Q4_K_M for less KL than the F16-discovered one, and did as well at F16:
docs/results/detox-runs.md).

Parameters: `calibrator` (path to a `pydetox calibrate train` GGUF; required), `alpha` (teacher's mixing weight),
`rank`, `first_layer` (-1: a third of the way up), `steps`, `batch` (sequences of each kind per step), `lr`,
`clean_weight`, `clean_kl` (top | full), `top_k`, `vocab` (0: the whole vocabulary), `plausible` (0: no
restriction), `pairs`, `pair_prompts`, `clean_texts`, `prompts`, `max_prompts`, `max_new_tokens`, `max_tokens`,
`seed`, `train_seed`, `cache` (a .npz to keep the teacher's targets in between runs), `anti`, `anti_alpha`,
`anti_lambda`, `expert`, `anti_rule`, `anti_margin` (an anti-expert the teacher moves away from, measured against
an expert; see DistillParams).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pydetox.discover.base import Context, Method, register_method
from pydetox.discover.model import autocast
from pydetox.errors import PydetoxError
from pydetox.plan import Edit, EditKind


@dataclass(frozen=True)
class DistillParams:
    calibrator: str = ""  # the teacher's calibration model (`pydetox calibrate train`); required
    alpha: float = 0.7  # the defaults are the SmolLM2 setting of docs/results/detox-runs.md
    rank: int = 32  # rank of the update of each down-projection
    first_layer: int = -1  # first edited layer (every layer from it to the last); -1: a third of the way up
    steps: int = 450  # Adam steps
    batch: int = 8  # sequences of each kind (toxic, clean) per step
    lr: float = 0.003  # Adam's learning rate
    clean_weight: float = 8.0  # weight of KL(unedited || student) on clean text against the teacher KL
    clean_kl: str = "top"  # top: top_k tokens + a bucket; full: the whole vocabulary, unedited computed per step
    top_k: int = 32  # teacher tokens kept per position (the rest of the vocabulary is one bucket)
    # Train with the output layer restricted to this many tokens (0: the whole vocabulary): every token a target
    # names, then the ones the unedited model gives the most mass. Gemma-3's 262,144-row output layer is most of a
    # training step; held-out figures are always over the whole vocabulary.
    vocab: int = 0
    vocab_sample: int = 256  # sequences (half toxic, half clean) whose unedited mass picks the rest of `vocab`
    plausible: float = 1e-3  # teacher tokens the unedited model gives under this times its top token's probability are dropped
    pairs: int = 600  # ParaDetox pairs: toxic side as teacher contexts, neutral side as clean text
    # More toxic contexts like the evaluation's (sentence starts that invite a toxic ending): this many further
    # ParaDetox toxic sentences, none of the `pairs` ones, cut to their first half (in words) and continued like the
    # prompts: an edit trained on the 896 RTP discovery prompts alone cut far more on them than on the evaluation
    # prompts (Gemma-3: 7.0x against 2.3x, profanity-check).
    pair_prompts: int = 0
    clean_texts: int = 600  # Wikipedia paragraphs of clean text (never `news`, where perplexity is measured)
    # This many benign sentence starts (the first half of training-wiki sentences), continued greedily by the
    # unedited model, join the clean text: the clean KL then also holds how, and when, the model ends a benign
    # continuation, which text alone does not show (a student can learn to stop benign answers early).
    benign_starts: int = 0
    # This many training-wiki sentences asked as a user turn in the model's chat template (the GGUF's
    # `tokenizer.chat_template`) and answered greedily by the unedited model (`chat_tokens` tokens) join the clean
    # text: the clean KL then also holds the assistant's answers, which prose does not show (an edit trained on
    # prose answered 60 of the 113 chat-check questions against the unedited 66).
    chat_starts: int = 0
    # Take out of the trained update's output directions the part that raises the end-of-generation tokens' logits
    # directly (through the final norm's logit lens, against the vocabulary's mean row): a student taught to end
    # toxic continuations learns to push these tokens everywhere and ends benign answers early (docs/speed-distill.md).
    eog_free: bool = False
    chat_tokens: int = 32  # the longest answer the unedited model writes to each of the `chat_starts` questions
    prompts: str = "rtp-perspective"  # discovery prompts (those also in rtp-challenging are always left out)
    max_prompts: int = 0  # 0: every prompt of the set that is not an evaluation prompt
    max_new_tokens: int = 20  # tokens of each greedy continuation the teacher and the unedited model write
    max_tokens: int = 64  # prompts and texts are cut to this many tokens
    seed: int = 0  # the data draw, the held-out split and (unless train_seed) the training
    # The training's own seed (the update's initialisation and the order of the batches); -1: `seed`. Unlike `seed`
    # it leaves the teacher's data and the held-out split alone, so a second training run reads the same cache and is
    # measured on the same held-out sequences.
    train_seed: int = -1
    # A .npz file for the teacher's contexts and distributions: written after they are computed, read instead of
    # computing them when every setting they depend on (model file, calibrator, alpha, top_k, plausible, the data and
    # lengths, seed) is the same. Tuning rank, lr, steps or clean_weight then skips the teacher (~7 min on SmolLM2,
    # ~10 on Gemma-3: 9.5 min to the written cache in the second run).
    cache: str = ""
    # An anti-expert: a calibrator trained on the toxic side of the pairs (`pydetox calibrate train --side toxic
    # --clean-tokens 0`; the anti-expert of DExperts, Liu et al. ACL 2021), fused with the unedited model at
    # `anti_alpha`. The teacher's top-k probabilities are multiplied by exp(anti_lambda * min(0, p_unedited - p_anti))
    # and renormalised with the rest bucket (which is left as it is): the decay of self-debiasing (Schick et al.,
    # TACL 2021), with the anti-expert in place of a self-debiasing prompt. Only tokens the anti-expert gives more
    # probability than the unedited model lose mass, by how much more in probability (not in log-probability): the
    # anti-expert is trained on short, lower-case comments, and its log-ratio to the unedited model (DExperts' own
    # rule) also rewards what it finds unlikely for style alone ('.' after "I'm going to" to 0.89 on Gemma-3).
    # The calibrator is trained on clean text and leaves some insults and threats to the teacher; the anti-expert
    # rates them up (' stupid', ' kill', ' damn'). Special tokens get no penalty (the anti-expert's texts all end at
    # EOS). On Gemma-3, most of what it moves against the unedited model is style ('▁i', '▁.', 'and': ParaDetox's
    # sentences are lower-case, with spaces before punctuation), not toxicity (docs/results/detox-runs.md). Both
    # log-probabilities at the teacher's top-k tokens are kept in `cache`'s sibling CACHE.anti.npz (they depend on
    # the teacher, the anti-expert and anti_alpha).
    anti: str = ""
    anti_alpha: float = 0.5  # mixing weight of the anti-expert (and expert) with the unedited model
    anti_lambda: float = 50.0  # strength of the anti-expert's penalty
    # The expert of DExperts: a calibrator trained like the anti-expert on the other side of the same pairs
    # (`--side neutral --clean-tokens 0`), fused with the unedited model at `anti_alpha`, in place of the unedited
    # model in the rule above: exp(anti_lambda * min(0, p_expert - p_anti)). The pairs differ in their toxic words
    # and share their style, so the style the anti-expert learnt is learnt by the expert as well and cancels.
    # Kept in CACHE.expert.npz.
    expert: str = ""
    # "prob": the rule above. "ratio": exp(anti_lambda * min(0, log p_ref - log p_anti + log anti_margin)), p_ref the
    # expert's (or the unedited model's): DExperts' log-ratio, penalty only, for tokens the anti-expert rates more
    # than anti_margin times likelier; with anti_lambda 1, such a token's probability is divided by the excess.
    # The probability rule's changes fall mostly on frequent words ('▁the', '▁a'), whose probabilities are large;
    # the ratio rule's less so. Neither has yet cut more than the same run without an anti-expert (Gemma-3, two
    # seeds: docs/results/detox-runs.md).
    anti_rule: str = "prob"
    anti_margin: float = 3.0  # ratio rule: how many times likelier the anti-expert must rate a token
    # "bfloat16": the student's forward and backward passes under torch's CPU autocast (the update and Adam's state
    # stay float32). On AVX-512 BF16 CPUs a step is ~1.3x faster, ~1.5x with `vocab`.
    precision: str = "float32"
    # "random": each step's sequences drawn at random. "length": batches of sequences of similar length (a sortish
    # sampler: a shuffled pool of 32 batches sorted by length, cut into batches, the batches shuffled), so that a
    # batch pads little; every sequence is seen once per epoch.
    batching: str = "random"
    # At most this many held-out sequences of each kind (toxic, clean) for the before/after KLs (0: all of them);
    # the held-out split itself does not change.
    held_out: int = 0


class _Targets:
    """Token sequences with a target distribution at each position but the last: top-k token ids, their
    log-probabilities, and the log-probability of the rest of the vocabulary. `groups`: the context each sequence
    came from (sequences of one group share their prompt, and are held out together)."""

    def __init__(self, seqs: list[list[int]], ids: list[Any], logp: list[Any], rest: list[Any],
                 groups: np.ndarray) -> None:
        self.seqs, self.ids, self.logp, self.rest, self.groups = seqs, ids, logp, rest, groups

    def __len__(self) -> int:
        return len(self.seqs)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {**_pack(self.seqs, prefix), f"{prefix}ids": np.concatenate(self.ids),
                f"{prefix}logp": np.concatenate(self.logp), f"{prefix}rest": np.concatenate(self.rest),
                f"{prefix}groups": self.groups}

    @classmethod
    def from_arrays(cls, z: Any, prefix: str) -> _Targets:
        pos = np.cumsum(z[f"{prefix}lengths"] - 1)[:-1]  # targets: every position but the last
        return cls(_unpack(z, prefix), np.split(z[f"{prefix}ids"], pos), np.split(z[f"{prefix}logp"], pos),
                   np.split(z[f"{prefix}rest"], pos), z[f"{prefix}groups"])


def _pack(seqs: list[list[int]], prefix: str) -> dict[str, np.ndarray]:
    """Token sequences of different lengths as two flat arrays, PREFIXlengths and PREFIXtokens."""
    return {f"{prefix}lengths": np.array([len(s) for s in seqs], np.int64),
            f"{prefix}tokens": np.concatenate([np.asarray(s, np.int64) for s in seqs])}


def _unpack(z: Any, prefix: str) -> list[list[int]]:
    return [t.tolist() for t in np.split(z[f"{prefix}tokens"], np.cumsum(z[f"{prefix}lengths"])[:-1])]


TEACHER_KEYS = ("calibrator", "alpha", "top_k", "plausible", "pairs", "pair_prompts", "clean_texts", "prompts",
                 "max_prompts", "max_new_tokens", "max_tokens", "seed")


def file_stamp(f: Path) -> list[Any]:
    """A file as a cache key sees it: its path, size and modification time."""
    st = f.stat()
    return [f.resolve().as_posix(), st.st_size, st.st_mtime_ns]


def _cache_key(source: Path, p: DistillParams) -> str:
    import json

    return json.dumps({"format": 3, "model": file_stamp(source), "calibrator_file": file_stamp(Path(p.calibrator)),
                       **{k: getattr(p, k) for k in TEACHER_KEYS}}, sort_keys=True)


def _load_cache(path: Path, key: str) -> tuple[_Targets, list[list[int]]] | None:
    if not path.is_file():
        return None
    with np.load(path) as z:
        if str(z["key"]) != key:
            return None
        return _Targets.from_arrays(z, "t_"), _unpack(z, "clean_")


def _save_npz(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """`arrays` and the cache `key` in a .npz written under a temporary name and renamed when complete."""
    from pydetox.output import atomic

    with atomic(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would add .npz to the name
        np.savez(f, key=np.array(key), **arrays)  # type: ignore[arg-type]


def _save_cache(path: Path, key: str, toxic: _Targets, clean: list[list[int]]) -> None:
    _save_npz(path, key, {**_pack(clean, "clean_"), **toxic.arrays("t_")})


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


def _top(logp: np.ndarray, k: int, plausible: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k ids, their log-probabilities and the log-probability of the rest, per row. With `plausible` (a mask of
    the same shape), the distribution is first restricted to the masked tokens and renormalized over them."""
    if plausible is not None:
        per_row = np.count_nonzero(plausible, axis=1)  # one pass over the mask for both conditions
        if per_row.all() and per_row.sum() < 0.01 * plausible.size:
            return _top_plausible(logp, k, plausible)
    return _top_dense(logp, k, plausible)


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


def _teacher(source: Path, p: DistillParams, prompts: list[str], toxic_texts: list[str], progress: bool,
             tokenize_only: list[str]) -> tuple[_Targets, list[list[int]]]:
    """Contexts: the prompts continued greedily by the fused model and by the unedited model (where the edit has to
    act), and the toxic texts. Targets: the fused model's top-k next-token distribution at every position,
    restricted to tokens the unedited model finds plausible (probability >= `plausible` times its top token's, the
    adaptive plausibility constraint of contrastive decoding, Li et al. 2023): at a strong mixing weight the fused
    model puts mass on junk tokens ('HETATM', 'firehose') that a student would learn to emit. Also the llama.cpp
    tokenization of `tokenize_only` (the clean texts).

    One pass: the fused runtime computes the unedited model's logits and the fused ones in the same decode, so the
    targets are read off while the continuations are generated (both continuations of a prompt share its decoded
    prompt through a copy of its KV cache), instead of generating first and decoding every sequence again."""
    from pydetox.fusion import FusedRuntime
    from pydetox.runtime import log_softmax

    n_seq = 16
    n_ctx = 2 * n_seq * (p.max_tokens + p.max_new_tokens) + 64
    floor = np.log(p.plausible) if p.plausible > 0 else None
    with FusedRuntime(source, p.calibrator, p.alpha, n_ctx=n_ctx, n_seq=2 * n_seq, n_batch=512) as rt:

        def rows(items: list[tuple[int, int, int, bool]]) -> tuple[list[tuple[Any, Any, Any]], np.ndarray, np.ndarray]:
            """Decode items (all with outputs) in chunks; per item its target row (ids, logp, rest), and the argmax
            of the fused and of the unedited logits."""
            out: list[tuple[Any, Any, Any]] = []
            best_f, best_b = [], []
            for c in range(0, len(items), rt.n_batch):
                chunk = items[c : c + rt.n_batch]
                rt.decode(chunk)
                zf = rt.logits(len(chunk))
                zb = rt.target_logits(len(chunk))
                best_f.append(zf.argmax(1))
                best_b.append(zb.argmax(1))
                if floor is None:
                    i, lp, r = _top(log_softmax(zf), p.top_k)
                else:  # the restricted distribution is renormalised over the plausible tokens: raw logits will do
                    i, lp, r = _top(zf, p.top_k, zb >= zb.max(axis=1, keepdims=True) + floor)
                out += list(zip(i, lp, r, strict=True))
            return out, np.concatenate(best_f), np.concatenate(best_b)

        seqs: list[list[int]] = []
        targets: list[list[tuple[Any, Any, Any]]] = []
        groups: list[int] = []  # the prompt's index; len(prompts) + j for the j-th toxic text
        toks = [rt.tokenize(q)[: p.max_tokens] for q in prompts]
        waves = range(0, len(toks), n_seq)
        for s0 in tqdm(waves, desc="teacher: continue prompts", leave=False, disable=not progress):
            wave = toks[s0 : s0 + n_seq]
            n = len(wave)
            rt.clear()
            got, bf, bb = rows([(t, j, s, True) for s, q in enumerate(wave) for j, t in enumerate(q)])
            seq_rows: list[list[Any]] = [[] for _ in range(2 * n)]
            nxt: dict[int, int] = {}
            at = 0
            for s, q in enumerate(wave):
                seq_rows[s] = got[at : at + len(q)]
                seq_rows[s + n] = list(seq_rows[s])
                nxt[s], nxt[s + n] = int(bf[at + len(q) - 1]), int(bb[at + len(q) - 1])  # fused, unedited
                at += len(q)
                rt.copy_sequence(s, s + n)
            gen: list[list[int]] = [[] for _ in range(2 * n)]
            active = list(range(2 * n))
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
                got, bf, bb = rows([(nxt[s], len(wave[s % n]) + len(gen[s]) - 1, s, True) for s in active])
                for i, s in enumerate(active):
                    seq_rows[s].append(got[i])
                    nxt[s] = int(bf[i] if s < n else bb[i])
            for s in range(2 * n):
                seq = wave[s % n] + gen[s]
                seqs.append(seq)
                targets.append(seq_rows[s][: len(seq) - 1])
                groups.append(s0 + s % n)
        texts = [rt.tokenize(t)[: p.max_tokens] for t in toxic_texts]
        for s0 in tqdm(range(0, len(texts), n_seq), desc="teacher: toxic texts", leave=False, disable=not progress):
            wave = [(s0 + j, t) for j, t in enumerate(texts[s0 : s0 + n_seq]) if len(t) >= 2]
            rt.clear()
            got, _, _ = rows([(t, j, s, True) for s, (_, q) in enumerate(wave) for j, t in enumerate(q)])
            at = 0
            for j, q in wave:
                seqs.append(q)
                targets.append(got[at : at + len(q) - 1])
                groups.append(len(prompts) + j)
                at += len(q)
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
    path = None if cache is None else cache.with_name(cache.name.removesuffix(".npz") + f".{role}.npz")
    if path is not None and path.is_file():
        with np.load(path) as z:
            if str(z["key"]) == key:
                return np.split(z["logp"], np.cumsum([len(i) for i in toxic.ids])[:-1], axis=1), True
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


class _LoRA:
    """W x + B (A x) on the down-projections of the chosen layers, through forward hooks (the model stays frozen)."""

    def __init__(self, ctx: Context, layers: list[int], rank: int, seed: int) -> None:
        torch = ctx.fp.torch
        gen = torch.Generator().manual_seed(seed)
        self.layers = layers
        self.A, self.B, self.hooks = [], [], []
        for layer in layers:
            lin = ctx.fp.down_proj(layer)
            d, ff = lin.weight.shape
            # drawn on the CPU whatever the device, so that a seed gives the same start everywhere
            a = (torch.randn(rank, ff, generator=gen) / ff**0.5).to(ctx.fp.device).requires_grad_(True)
            b = torch.zeros(d, rank, device=ctx.fp.device).requires_grad_(True)
            self.A.append(a)
            self.B.append(b)
            self.hooks.append(lin.register_forward_hook(self._hook(a, b)))
        self.on = True

    def _hook(self, a: Any, b: Any) -> Any:
        def add(_m: Any, args: tuple[Any, ...], out: Any) -> Any:
            return out + (args[0] @ a.T) @ b.T if self.on else out
        return add

    def params(self) -> list[Any]:
        return self.A + self.B

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _forward(ctx: Context, seqs: list[list[int]], head: Any = None) -> Any:
    """log-softmax of the model's logits at every position but the last of each sequence, (n_positions, vocab), in
    the order of `seqs`. `head` (n, d): output-layer rows to compute the logits with, the log-softmax then being over
    those n tokens only (a restricted vocabulary, see `vocab`); None: the whole output layer."""
    torch = ctx.fp.torch
    n = max(len(s) for s in seqs)
    pad = ctx.fp.tokenizer.pad_token_id
    inp = torch.full((len(seqs), n), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    for k, s in enumerate(seqs):
        inp[k, : len(s)] = torch.tensor(s)
        att[k, : len(s)] = 1
    model = ctx.fp.model
    inp, att = inp.to(ctx.fp.device), att.to(ctx.fp.device)
    hidden = model.model(input_ids=inp, attention_mask=att).last_hidden_state  # after the final norm
    rows = torch.cat([hidden[k, : len(s) - 1] for k, s in enumerate(seqs)])  # no padded positions through the head
    # the whole output layer through its module: a weight kept in a half type is upcast a block of rows at a time
    logits = model.get_output_embeddings()(rows) if head is None else rows @ head.T
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits.float(), dim=-1)


def _kl(lq: Any, ids: Any, lp: Any, rest: Any) -> Any:
    """KL(p || q) per position over the top-k tokens of p and one bucket for the rest of the vocabulary."""
    import torch

    lq_top = torch.gather(lq, 1, ids)
    lq_rest = torch.log1p(-torch.exp(torch.logsumexp(lq_top, 1)).clamp(max=1 - 1e-6))
    p_top, p_rest = lp.exp(), rest.exp()
    return (p_top * (lp - lq_top)).sum(1) + p_rest * (rest - lq_rest)


class _Vocab:
    """A restricted vocabulary for training: the token ids kept, their output-layer rows, and a map from full ids
    to positions among them (-1: not kept)."""

    def __init__(self, ctx: Context, keep: np.ndarray) -> None:
        torch = ctx.fp.torch
        full = ctx.fp.unembedding()
        self.keep = np.sort(keep).astype(np.int64)
        self.head = full[torch.from_numpy(self.keep).to(full.device)].contiguous()
        self.index = np.full(full.shape[0], -1, np.int64)
        self.index[self.keep] = np.arange(len(self.keep))

    def ids(self, ids: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.index[ids]
        assert (out >= 0).all(), "a target token outside the restricted vocabulary"
        return out


def _restricted_vocab(ctx: Context, size: int, targets: list[_Targets], clean: list[list[int]], seed: int,
                      sample: int = 256, batch: int = 16) -> _Vocab:
    """Every token a target names, then the tokens the unedited model gives the most probability mass on a sample of
    the toxic and clean sequences, up to `size` tokens."""
    torch = ctx.fp.torch
    toxic = targets[0]
    keep = np.unique(np.concatenate([i for t in targets for i in t.ids]))
    rng = np.random.default_rng(seed)
    seqs = [toxic.seqs[int(i)] for i in rng.permutation(len(toxic))[: sample // 2]]
    seqs += [clean[int(i)] for i in rng.permutation(len(clean))[: sample // 2]]
    mass = np.zeros(ctx.fp.unembedding().shape[0])
    with torch.no_grad():
        for s in tqdm(range(0, len(seqs), batch), desc="vocab: unedited mass", leave=False, disable=not ctx.progress):
            mass += _forward(ctx, seqs[s : s + batch]).exp().sum(0).double().cpu().numpy()
    mass[keep] = np.inf
    return _Vocab(ctx, np.argsort(-mass, kind="stable")[: max(size, len(keep))])


def _batch_kl(ctx: Context, t: _Targets, pick: list[int], vocab: _Vocab | None = None) -> Any:
    import torch

    seqs = [t.seqs[i] for i in pick]
    lq = _forward(ctx, seqs, None if vocab is None else vocab.head)
    full = np.concatenate([t.ids[i] for i in pick])
    ids = torch.from_numpy(full if vocab is None else vocab.ids(full)).to(lq.device)
    lp = torch.from_numpy(np.concatenate([t.logp[i] for i in pick])).to(lq.device)
    rest = torch.from_numpy(np.concatenate([t.rest[i] for i in pick])).to(lq.device)
    return _kl(lq, ids, lp, rest)


def _full_kl(ctx: Context, lora: _LoRA, seqs: list[list[int]], vocab: _Vocab | None = None) -> Any:
    """Exact KL(unedited || edited) per position over the whole vocabulary (or over `vocab`, both distributions
    renormalised on it); the unedited model is the same one with the update switched off."""
    torch = ctx.fp.torch
    head = None if vocab is None else vocab.head
    with torch.no_grad():
        lora.on = False
        try:
            lp = _forward(ctx, seqs, head)
        finally:
            lora.on = True
    return (lp.exp() * (lp - _forward(ctx, seqs, head))).sum(1)


def _base_targets(ctx: Context, seqs: list[list[int]], k: int, progress: bool, batch: int = 16) -> _Targets:
    torch = ctx.fp.torch
    ids, logp, rest = [], [], []
    with torch.no_grad():
        for s in tqdm(range(0, len(seqs), batch), desc="unedited: distributions", leave=False, disable=not progress):
            chunk = seqs[s : s + batch]
            lq = _forward(ctx, chunk)
            lq = lq.cpu().numpy()
            at = 0
            for c in chunk:
                i, lp, r = _top(lq[at : at + len(c) - 1], k)
                at += len(c) - 1
                ids.append(i)
                logp.append(lp)
                rest.append(r)
    return _Targets(seqs, ids, logp, rest, np.arange(len(seqs)))


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


def _eog_directions(ctx: Context, source: Path) -> Any:
    """(d, n) orthonormal basis of the residual directions that raise an end-of-generation token's logit against
    the vocabulary's mean: gamma * (w_k - mean_j w_j) for every token k llama.cpp ends a generation at (gamma: the
    final norm's gain, Gemma's 1 + weight)."""
    from pydetox.discover.base import final_gain
    from pydetox.runtime import LlamaRuntime

    torch = ctx.fp.torch
    special = sorted(set(ctx.fp.tokenizer.all_special_ids) | {ctx.fp.tokenizer.eos_token_id} - {None})
    with LlamaRuntime(source, n_ctx=16) as rt:
        eog = [t for t in special if rt.is_eog(int(t))]
    if not eog:
        raise PydetoxError(f"distill: eog_free, but no special token of {source.name} ends a generation in llama.cpp")
    w = ctx.fp.unembedding().double()
    gamma = torch.from_numpy(final_gain(ctx)).to(w.device)
    rows = (w[eog] - w.mean(0)) * gamma
    q, _ = torch.linalg.qr(rows.T)
    return q.to(torch.float32)


def _check(p: DistillParams, source: Path) -> None:
    """Every parameter that can be checked before the teacher's half hour, checked."""
    if not p.calibrator:
        raise PydetoxError("distill needs a calibrator: --param calibrator=CAL.gguf (from `pydetox calibrate train`)")
    if not Path(p.calibrator).is_file():
        raise PydetoxError(f"distill: expected a calibrator GGUF at {p.calibrator}, found nothing")
    if source.suffix != ".gguf" or not source.is_file():
        raise PydetoxError(f"distill runs the fused teacher in llama.cpp and needs the model as a GGUF file; got {source}")
    if not 0.0 <= p.plausible < 1.0:
        raise PydetoxError(f"distill: plausible must lie in [0, 1), got {p.plausible}")
    if p.clean_kl not in ("top", "full"):
        raise PydetoxError(f"distill: clean_kl is 'top' or 'full', got {p.clean_kl!r}")
    if p.anti and not Path(p.anti).is_file():  # checked before the teacher's half hour, not after
        raise PydetoxError(f"distill: expected an anti-expert GGUF at {p.anti}, found nothing")
    if p.expert and not (p.anti and Path(p.expert).is_file()):
        raise PydetoxError(f"distill: an expert needs an anti-expert (anti=...) and a GGUF at {p.expert}; got "
                           f"anti={p.anti!r}, and {'a file' if Path(p.expert).is_file() else 'nothing'} there")
    if not 0.0 <= p.anti_alpha <= 1.0 or p.anti_lambda < 0:
        raise PydetoxError(f"distill: anti_alpha must lie in [0, 1] and anti_lambda be >= 0, got {p.anti_alpha}, "
                           f"{p.anti_lambda}")
    if p.anti_rule not in ("prob", "ratio") or p.anti_margin < 1:
        raise PydetoxError(f"distill: anti_rule is 'prob' or 'ratio' and anti_margin >= 1, got {p.anti_rule!r}, "
                           f"{p.anti_margin}")
    if p.batching not in ("random", "length"):
        raise PydetoxError(f"distill: batching is 'random' or 'length', got {p.batching!r}")
    if p.rank < 1 or p.steps < 1 or p.batch < 1:
        raise PydetoxError(f"distill: rank, steps and batch must be >= 1, got {p.rank}, {p.steps}, {p.batch}")


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


def _targets(ctx: Context, p: DistillParams, source: Path, prompts: list[str], toxic_texts: list[str],
             clean_texts: list[str]) -> tuple[_Targets, list[list[int]], dict[str, Any]]:
    """The teacher's targets on the toxic contexts and the tokenized clean texts, from `cache` when it holds them
    for these settings; with the anti-expert's decay applied when `anti` is set. Also what came from the cache."""
    cache = Path(p.cache) if p.cache else None
    if cache is not None and cache.suffix != ".npz":
        raise PydetoxError(f"distill: the teacher cache is a .npz file, got {p.cache}")
    key = _cache_key(source, p)
    cached = _load_cache(cache, key) if cache is not None else None
    if cached is None:
        toxic, clean_seqs = _teacher(source, p, prompts, toxic_texts, ctx.progress, clean_texts)
        if cache is not None:
            _save_cache(cache, key, toxic, clean_seqs)
    else:
        toxic, clean_seqs = cached
    anti_cached = None
    if p.anti:
        spare = np.asarray(ctx.fp.tokenizer.all_special_ids, np.int64)  # the anti-expert's data ends every text at EOS
        toxic, anti_cached = _anti_targets(source, p, toxic, key, cache, ctx.progress, spare)
    if p.benign_starts > 0:
        clean_seqs = clean_seqs + _benign_continuations(source, p, ctx.progress)
    if p.chat_starts > 0:
        clean_seqs = clean_seqs + _chat_continuations(source, p, ctx.progress)
    return toxic, clean_seqs, {"teacher_from_cache": cached is not None, **({"anti_from_cache": anti_cached} if p.anti else {})}


@register_method
class Distill(Method):
    name = "distill"
    paper = ("calibration-model fusion (arXiv 2506.01266) distilled into a low-rank weight edit "
             "(knowledge distillation, Hinton et al. 2015; sequence-level, Kim & Rush 2016)")
    Params = DistillParams
    devices = ("cpu", "cuda")

    def edits(self, ctx: Context, params: Any) -> tuple[list[Edit], dict[str, Any]]:
        p: DistillParams = params
        source = Path(str(ctx.fp.source))
        _check(p, source)
        bf16 = autocast(p.precision, "distill", ctx.fp.device)
        torch = ctx.fp.torch
        torch.manual_seed(p.seed)
        prompts, toxic_texts, clean_texts = _contexts(p)
        toxic, clean_seqs, from_cache = _targets(ctx, p, source, prompts, toxic_texts, clean_texts)
        full = p.clean_kl == "full"  # then the unedited model's distributions are computed per step, not stored
        with bf16:
            clean = None if full else _base_targets(ctx, clean_seqs, p.top_k, ctx.progress)

        n = ctx.fp.n_layers
        first = p.first_layer if p.first_layer >= 0 else n // 3
        if not 0 <= first < n:
            raise PydetoxError(f"distill: first_layer must lie in [0, {n}), got {first}")
        gen = np.random.default_rng(p.seed + 1)
        val_t, train_t = _split_by_group(toxic.groups, gen)
        if len(train_t) < p.batch:
            raise PydetoxError(f"distill: {len(train_t)} toxic sequences left to train on after holding out "
                               f"{len(val_t)}; need at least batch = {p.batch} (more prompts or pairs)")
        perm_c = gen.permutation(len(clean_seqs))
        val_c, train_c = perm_c[: max(1, len(clean_seqs) // 10)].tolist(), perm_c[max(1, len(clean_seqs) // 10) :]
        ctx.fp.model.requires_grad_(False)
        if p.train_seed >= 0:
            torch.manual_seed(p.train_seed)
            gen = np.random.default_rng([p.seed + 1, p.train_seed])
        lora = _LoRA(ctx, list(range(first, n)), p.rank, p.seed if p.train_seed < 0 else p.train_seed)

        n_vocab = int(ctx.fp.unembedding().shape[0])
        vocab = None
        if 0 < p.vocab < n_vocab:
            with bf16:
                vocab = _restricted_vocab(ctx, p.vocab, [toxic] + ([clean] if clean is not None else []),
                                          [clean_seqs[i] for i in train_c], p.seed, sample=p.vocab_sample)

        def clean_kl(pick: list[int], v: _Vocab | None = None) -> Any:
            if clean is None:
                return _full_kl(ctx, lora, [clean_seqs[i] for i in pick], v)
            return _batch_kl(ctx, clean, pick, v)

        def chunks(n_items: int, label: str) -> Any:
            return tqdm(range(0, n_items, 16), desc=label, leave=False, disable=not ctx.progress)

        if p.held_out > 0:
            val_t, val_c = val_t[: p.held_out], val_c[: p.held_out]

        def held_out() -> dict[str, float]:
            with torch.no_grad(), bf16:
                kt = torch.cat([_batch_kl(ctx, toxic, val_t[s : s + 16]) for s in chunks(len(val_t), "held out: toxic")])
                kc = torch.cat([clean_kl(val_c[s : s + 16]) for s in chunks(len(val_c), "held out: clean")])
            return {"teacher_kl": round(float(kt.mean()), 4), "clean_kl": round(float(kc.mean()), 5)}

        def coverage(seqs: list[list[int]]) -> float:
            """The unedited model's mean probability mass inside the restricted vocabulary."""
            assert vocab is not None
            keep = torch.from_numpy(vocab.keep).to(ctx.fp.device)
            with torch.no_grad(), bf16:
                lp = torch.cat([_forward(ctx, seqs[s : s + 16]) for s in chunks(len(seqs), "vocab: coverage")])
            return round(float(torch.logsumexp(lp[:, keep], 1).exp().mean()), 5)

        try:
            if vocab is not None:
                restricted = {"tokens": len(vocab.keep), "of": n_vocab,
                              "mass_toxic": coverage([toxic.seqs[i] for i in val_t]),
                              "mass_clean": coverage([clean_seqs[i] for i in val_c])}
            before = held_out()
            opt = torch.optim.Adam(lora.params(), lr=p.lr)
            by_length_t = _length_batches(train_t, [len(q) for q in toxic.seqs], p.batch, gen)
            by_length_c = _length_batches(train_c, [len(q) for q in clean_seqs], p.batch, gen)
            curve = []
            bar = tqdm(range(p.steps), desc="distill: train", leave=False, disable=not ctx.progress)
            for step in bar:
                if p.batching == "length":
                    bt, bc = next(by_length_t), next(by_length_c)
                else:
                    bt = gen.choice(train_t, p.batch, replace=False).tolist()
                    bc = gen.choice(train_c, p.batch, replace=False).tolist()
                with bf16:
                    lt = _batch_kl(ctx, toxic, bt, vocab).mean()
                    lc = clean_kl(bc, vocab).mean()
                    loss = lt + p.clean_weight * lc
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step % 20 == 0 or step == p.steps - 1:
                    curve.append((step, round(lt.item(), 4), round(lc.item(), 5)))
                    bar.set_postfix(teacher_kl=f"{lt.item():.3f}", clean_kl=f"{lc.item():.4f}")
            if p.eog_free:
                eog = _eog_directions(ctx, source)
                with torch.no_grad():
                    for b in lora.B:  # (d, rank): the update's output directions
                        b -= eog @ (eog.T @ b)
            after = held_out()
        finally:
            lora.close()
        edits = []
        for layer, a, b in zip(lora.layers, lora.A, lora.B, strict=True):
            w = ctx.fp.down_proj(layer).weight
            edits.append(Edit(ctx.fp.down_proj_name(layer), EditKind.LOW_RANK, tuple(w.shape),
                              b.detach().T.contiguous().cpu().numpy().astype(np.float32),
                              a.detach().cpu().numpy().astype(np.float32)))
        return edits, {"device": ctx.fp.device, **from_cache,
                       "toxic_sequences": len(toxic), "clean_sequences": len(clean_seqs), "discovery_prompts": len(prompts),
                       "layers": [first, n - 1], "held_out_toxic_sequences": len(val_t),
                       "held_out_contexts": len(np.unique(toxic.groups[val_t])),
                       "held_out_before": before, "held_out_after": after,
                       "curve": curve, **({"vocab": restricted} if vocab is not None else {})}
