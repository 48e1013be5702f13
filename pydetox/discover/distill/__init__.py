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
model finds plausible (see `_teacher`); with `one_sided` they are the unedited model's own distribution, each token
lowered by what the fused model takes from it and raised by nothing (the fused model at a strong weight is a broken
language model, and a student of it learned to write padding and loops in toxic contexts). Clean text:
`clean_texts` Wikipedia paragraphs from the ones the calibrator trains on (after the held-out ones of
`pydetox.splits`; never `news`, where perplexity is measured) and the neutral side of the pairs.
The teacher runs in llama.cpp (the fused runtime of `pydetox eval --calibrator`) on the GGUF the discovery loaded;
the student in torch, on that GGUF's weights dequantized. Given a Q4_K_M, the update is learned on top of the
rounded weights it will be added to, the teacher is that Q4_K_M fused, and the clean anchor is its own output (on
SmolLM2 such an edit cut more at Q4_K_M for less KL than the F16-discovered one, and did as well at F16:
docs/results/detox-runs.md).

Parameters: `calibrator` (path to a `pydetox calibrate train` GGUF; required), `alpha` (teacher's mixing weight),
`rank`, `first_layer` (-1: a third of the way up), `steps`, `batch` (sequences of each kind per step), `lr`,
`clean_weight`, `clean_kl` (top | full), `top_k`, `vocab` (0: the whole vocabulary), `plausible` (0: no
restriction), `one_sided` (0: the fused distribution), `one_sided_center`, `pairs`, `pair_prompts`, `clean_texts`,
`prompts`, `max_prompts`, `max_new_tokens`, `max_tokens`,
`seed`, `train_seed`, `recompute` (edited layers' activations recomputed in the backward pass: less memory,
more time), `cache` (a .npz to keep the teacher's targets in between runs), `anti`, `anti_alpha`,
`anti_lambda`, `expert`, `anti_rule`, `anti_margin` (an anti-expert the teacher moves away from, measured against
an expert; see DistillParams).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pydetox.discover.base import Context, Method, register_method
from pydetox.discover.distill.data import _contexts, _split_by_group
from pydetox.discover.distill.params import DistillParams, _check
from pydetox.discover.distill.student import _base_targets, _eog_directions, _schedule, _Student
from pydetox.discover.distill.teacher import _targets
from pydetox.discover.model import autocast
from pydetox.errors import PydetoxError
from pydetox.plan import Edit

__all__ = ["Distill", "DistillParams", "prepare_targets", "teacher_targets"]


@register_method
class Distill(Method):
    name = "distill"
    paper = ("calibration-model fusion (arXiv 2506.01266) distilled into a low-rank weight edit "
             "(knowledge distillation, Hinton et al. 2015; sequence-level, Kim & Rush 2016)")
    Params = DistillParams
    devices = ("cpu", "cuda")
    # The student's learning rate (DistillParams' 0.003 is SmolLM2's): the rank-32 update adds to the residual stream
    # in units of the down-projection's input, and Qwen2.5's residual stream is ~4x that input (rms, layers 8-23)
    # against SmolLM2's ~30x, so each step moves its hidden states ~8x more. At 0.003 its student drifted on clean
    # text (held-out clean KL 0.50, teacher KL 2.41 -> 1.77), the recipe's fit scaled it to 0.13 and nothing was cut;
    # at 0.0004 (0.003 x 4 / 30): clean KL 0.028, teacher KL -> 1.57, a cut (docs/results/qwen2.5-coder-0.5b.md).
    # Gemma-3 normalises each FFN's output (post-feedforward RMSNorm) before adding it, so what counts is the update
    # against the down-projection itself: its weights' rms is 0.016 (layers 6-17) against SmolLM2's 0.194 (10-29),
    # and 0.003 x 0.016 / 0.194 ~ 0.00025. At 0.003 the one-sided student drifted (held-out clean KL 0.16, fitted
    # strength 0.37), at 0.001 too (0.10; no cut, 19 chat answers lost); at 0.00025 clean KL 0.017 at a lower
    # teacher KL (1.16 -> 0.55), strength 1.40, and a cut (docs/results/default-recipe-gemma3.md).
    arch_defaults: ClassVar[dict[str, dict[str, str]]] = {"qwen2": {"lr": "0.0004"}, "gemma3": {"lr": "0.00025"}}

    def edits(self, ctx: Context, params: Any) -> tuple[list[Edit], dict[str, Any]]:
        p: DistillParams = params
        source = Path(str(ctx.fp.source))
        _check(p, source)
        bf16 = autocast(p.precision, "distill", ctx.fp.device)
        torch = ctx.fp.torch
        torch.manual_seed(p.seed)
        prompts, toxic_texts, clean_texts = _contexts(p)
        toxic, clean_seqs, from_cache = _targets(p, source, prompts, toxic_texts, clean_texts, ctx.progress,
                                                 lambda: ctx.fp.tokenizer.all_special_ids)
        full = p.clean_kl == "full"  # then the unedited model's distributions are computed per step, not stored
        n = ctx.fp.n_layers
        first = p.first_layer if p.first_layer >= 0 else n // 3
        if not 0 <= first < n:
            raise PydetoxError(f"distill: first_layer must lie in [0, {n}), got {first}")
        # Held out: whole contexts of the toxic sequences, a tenth of the clean ones (the seed's draw, whatever the
        # training seed, so that runs of several training seeds are measured on the same sequences).
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
        if p.held_out > 0:
            val_t, val_c = val_t[: p.held_out], val_c[: p.held_out]
        schedule = _schedule(p, gen, [len(q) for q in toxic.seqs], [len(q) for q in clean_seqs], train_t, train_c)
        # The unedited model's targets for the clean sequences the steps draw and the held-out ones (every one where
        # a restricted vocabulary is picked from all of them).
        need = None if p.vocab > 0 else {i for _, bc in schedule for i in bc} | set(val_c)
        # Everything below runs the decoder under `bf16` (the teacher ran in llama.cpp): its weights are kept in the
        # compute type meanwhile instead of cast at every call, and read back after.
        with ctx.fp.computing_in(p.precision):
            clean, clean_hit = (None, False) if full else _clean_targets(ctx, p, source, clean_seqs, bf16, need)
            student = _Student(ctx, p, bf16, toxic, clean_seqs, clean, list(range(first, n)), train_c)
            try:
                restricted = student.coverage(val_t, val_c)
                before = student.held_out(val_t, val_c)
                curve = student.train(schedule)
                if p.eog_free:
                    student.remove(_eog_directions(ctx, source))
                after = student.held_out(val_t, val_c)
            finally:
                student.close()
        return student.edits(), {
            "device": ctx.fp.device, **from_cache, "clean_targets_from_cache": clean_hit,
            "toxic_sequences": len(toxic), "clean_sequences": len(clean_seqs),
            "discovery_prompts": len(prompts), "layers": [first, n - 1], "held_out_toxic_sequences": len(val_t),
            "held_out_contexts": len(np.unique(toxic.groups[val_t])), "held_out_before": before,
            "held_out_after": after, "curve": curve, **({"vocab": restricted} if restricted is not None else {})}


def prepare_targets(ctx: Context, overrides: dict[str, str]) -> dict[str, Any]:
    """Compute and cache (`cache` is required) what every student of these settings trains against, the teacher's
    targets, the benign continuations and the unedited model's clean targets, without training one: runs of several
    training seeds started side by side then read them instead of each computing them. Returns what came from the
    cache and how many sequences there are."""
    from pydetox.discover.base import get_method, make_params

    p: DistillParams = make_params(get_method("distill"), overrides)
    if not p.cache:
        raise PydetoxError("distill: preparing the targets needs a `cache` (.npz) to keep them in")
    source = Path(str(ctx.fp.source))
    _check(p, source)
    bf16 = autocast(p.precision, "distill", ctx.fp.device)
    prompts, toxic_texts, clean_texts = _contexts(p)
    toxic, clean_seqs, from_cache = _targets(p, source, prompts, toxic_texts, clean_texts, ctx.progress,
                                             lambda: ctx.fp.tokenizer.all_special_ids)
    clean_hit = False
    if p.clean_kl != "full":
        with ctx.fp.computing_in(p.precision):
            _, clean_hit = _clean_targets(ctx, p, source, clean_seqs, bf16)
    return {**from_cache, "clean_targets_from_cache": clean_hit, "toxic_sequences": len(toxic),
            "clean_sequences": len(clean_seqs)}


def teacher_targets(source: Path, overrides: dict[str, str], progress: bool = True) -> dict[str, Any]:
    """Compute and cache (`cache` is required) the teacher's targets, the benign and the chat continuations, all of
    them llama.cpp's work, without loading the model in torch: a process that runs only this holds the GGUF in
    llama.cpp and nothing besides (the student's process, later, then holds only the torch model). Returns what came
    from the cache and how many sequences there are."""
    from pydetox.discover.base import get_method, make_params
    from pydetox.runtime import special_tokens

    p: DistillParams = make_params(get_method("distill"), overrides)
    if not p.cache:
        raise PydetoxError("distill: computing the teacher's targets apart needs a `cache` (.npz) to keep them in")
    _check(p, source)
    prompts, toxic_texts, clean_texts = _contexts(p)
    toxic, clean_seqs, from_cache = _targets(p, source, prompts, toxic_texts, clean_texts, progress,
                                             lambda: special_tokens(source))
    return {**from_cache, "toxic_sequences": len(toxic), "clean_sequences": len(clean_seqs)}


def _clean_targets(ctx: Context, p: DistillParams, source: Path, seqs: list[list[int]], bf16: Any,
                   need: Any = None) -> tuple[Any, bool]:
    """The unedited model's top-k distributions on the clean sequences `need` (None: all), read from or written to
    `cache`'s sibling CACHE.clean.npz (keyed by the model file, the sequences, top_k and precision: the training seed
    changes none of them, so the runs of several seeds share what they computed; each computes only the sequences
    its own steps draw that are not there yet), and whether nothing had to be computed."""
    import hashlib
    import json

    from pydetox.discover.distill.teacher import _read_npz, _save_npz, _sibling, _Targets, file_stamp

    digest = hashlib.sha256(np.concatenate([np.asarray(q, np.int64) for q in seqs]).tobytes()
                            + np.array([len(q) for q in seqs], np.int64).tobytes()).hexdigest()
    key = json.dumps({"format": 2, "model": file_stamp(source), "sequences": digest, "top_k": p.top_k,
                      "precision": p.precision}, sort_keys=True)
    path = _sibling(Path(p.cache) if p.cache else None, "clean")
    n = len(seqs)
    cached = _read_npz(path, key, lambda z: _Targets.from_arrays(z, "c_"))
    if cached is None:
        cached = _Targets(seqs, [np.zeros((0, p.top_k), np.int64)] * n, [np.zeros((0, p.top_k), np.float32)] * n,
                          [np.zeros(0, np.float32)] * n, np.arange(n), np.zeros(n, bool))
    have = np.ones(n, bool) if cached.have is None else cached.have.copy()
    want = np.ones(n, bool) if need is None else np.isin(np.arange(n), np.fromiter(need, np.int64))
    todo = np.flatnonzero(want & ~have)
    if not len(todo):
        return cached, True
    with bf16:
        new = _base_targets(ctx, [seqs[i] for i in todo], p.top_k, ctx.progress)
    for j, i in enumerate(todo):
        cached.ids[i], cached.logp[i], cached.rest[i] = new.ids[j], new.logp[j], new.rest[j]
    have[todo] = True
    clean = _Targets(seqs, cached.ids, cached.logp, cached.rest, np.arange(n), None if have.all() else have)
    if path is not None:
        _save_npz(path, key, clean.arrays("c_"))
    return clean, False
