"""The student: a low-rank update of the down-projections through forward hooks, its log-probabilities, the KLs
it is trained on, a restricted vocabulary, and the end-of-generation directions `eog_free` takes out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pydetox import heap
from pydetox.discover.base import Context
from pydetox.discover.distill.data import _length_batches
from pydetox.discover.distill.params import DistillParams
from pydetox.discover.distill.teacher import _Targets
from pydetox.discover.model import OUTPUT_ROWS
from pydetox.errors import PydetoxError
from pydetox.plan import Edit, EditKind

HEAD_BLOCK = 1 << 21  # logits (positions x output rows) the streamed KL computes at once


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


class _Recompute:
    """Activation checkpointing of decoder layers (`recompute`): while grad is enabled, each wrapped layer keeps
    only its inputs for the backward pass and runs again there (torch.utils.checkpoint, non-reentrant: the update's
    hooks run again too, and the gradients are the same). Without grad the layers run as they are."""

    def __init__(self, torch: Any, layers: list[Any]) -> None:
        from torch.utils.checkpoint import checkpoint

        self.layers = layers
        for layer in layers:
            plain = layer.forward

            def forward(*args: Any, _plain: Any = plain, **kwargs: Any) -> Any:
                if not torch.is_grad_enabled():
                    return _plain(*args, **kwargs)
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

            layer.forward = forward

    def close(self) -> None:
        for layer in self.layers:
            layer.__dict__.pop("forward", None)


def _hidden(ctx: Context, seqs: list[list[int]]) -> Any:
    """The final (normalised) hidden states at every position but the last of each sequence, (n_positions, d), in
    the order of `seqs`; padded positions never reach the output layer."""
    inp, att = ctx.fp.padded(seqs)
    # use_cache=False: no key-value cache is built (nothing generates here), and none is appended to twice where a
    # checkpointed layer runs again in the backward pass
    hidden = ctx.fp.model.model(input_ids=inp, attention_mask=att, use_cache=False).last_hidden_state  # final norm
    return ctx.fp.torch.cat([hidden[k, : len(s) - 1] for k, s in enumerate(seqs)])


def _log_softmax(ctx: Context, rows: Any, head: Any = None) -> Any:
    """log-softmax of the logits of hidden states `rows`. `head` (n, d): output-layer rows to compute the logits
    with, the log-softmax then being over those n tokens only (a restricted vocabulary, see `vocab`); None: the
    whole output layer, through its module (a weight kept in a half type is upcast a block of rows at a time)."""
    torch = ctx.fp.torch
    model = ctx.fp.model
    logits = model.get_output_embeddings()(rows) if head is None else rows @ head.T
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits.float(), dim=-1)


def _forward(ctx: Context, seqs: list[list[int]], head: Any = None) -> Any:
    """`_log_softmax` at every position but the last of each sequence, (n_positions, vocab)."""
    return _log_softmax(ctx, _hidden(ctx, seqs), head)


def _head_kl_stream(x: Any, weight: Any, bias: Any, cap: float | None, ids: Any, lp: Any, rest: Any,
                    with_grad: bool) -> tuple[Any, Any]:
    """`_kl` of the output layer's log-softmax at hidden states `x` (n, d) and, with `with_grad`, its gradient with
    respect to `x` (n, d), in one pass over the output layer a chunk of rows at a time (each chunk upcast once),
    never holding more than about HEAD_BLOCK logits: the normaliser is a running log-sum-exp, and the gradient's
    softmax-weighted sum of output rows is accumulated with the same running rescaling (as flash attention does).

    For logits z, q = softmax(z), the top-k set T with target p_i, the rest r = p_rest, S = sum_T q_i and
    c = r / (1 - S): dKL/dz_j = q_j (sum_T p_i - c S) + [j in T] (c q_j - p_j); a softcap z = cap tanh(y / cap)
    multiplies it by 1 - (z / cap)^2. So dKL/dx = (sum_T p_i - c S) sum_j q_j z'_j w_j + sum_T (c q_j - p_j) z'_j w_j."""
    import torch

    n, dim = x.shape
    vocab = weight.shape[0]
    # rows of the output layer per chunk: ~HEAD_BLOCK logits, so a chunk's float32 arrays (logits, their
    # exponentials, a softcap's tanh) stay ~8 MB each whatever the number of positions (at 16,384 rows a 1,000-position
    # held-out chunk of Qwen2.5 held 0.4 GB of them)
    rows = max(1, min(OUTPUT_ROWS, HEAD_BLOCK // max(n, 1)))
    mm = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        xm = x.to(mm)
        w_top = weight[ids].to(mm)  # (n, k, d): the target tokens' output rows
        y_top = torch.einsum("nd,nkd->nk", xm, w_top).float()
        if bias is not None:
            y_top += bias.float()[ids]
        m = torch.full((n,), -torch.inf, device=x.device)  # running max of the logits
        total = torch.zeros(n, device=x.device)  # sum_j exp(z_j - m)
        acc = torch.zeros(n, dim, device=x.device) if with_grad else None  # sum_j exp(z_j - m) z'_j w_j
        for i in range(0, vocab, rows):
            w = weight[i : i + rows].to(mm)
            z = (xm @ w.T).float()
            if bias is not None:
                z += bias[i : i + rows].float()
            t = None
            if cap:
                t = torch.tanh(z / cap)
                z = t * cap
            m_new = torch.maximum(m, z.max(1).values)
            scale = torch.exp(m - m_new)
            e = torch.exp(z - m_new[:, None])
            total = total * scale + e.sum(1)
            if acc is not None:
                if t is not None:
                    e *= 1 - t * t
                acc = acc * scale[:, None] + (e.to(mm) @ w).float()
            m = m_new
        lse = m + torch.log(total)
        t_top = torch.tanh(y_top / cap) if cap else None
        lq_top = (t_top * cap if t_top is not None else y_top) - lse[:, None]
        q_top = lq_top.exp()
        top_mass = q_top.sum(1)
        clamped = top_mass.clamp(max=1 - 1e-6)
        p_top, p_rest = lp.exp(), rest.exp()
        kl = (p_top * (lp - lq_top)).sum(1) + p_rest * (rest - torch.log1p(-clamped))
        if acc is None:
            return kl, None
        c = torch.where(top_mass < 1 - 1e-6, p_rest / (1 - clamped), torch.zeros_like(p_rest))
        coef_top = c[:, None] * q_top - p_top
        if t_top is not None:
            coef_top = coef_top * (1 - t_top * t_top)
        grad = ((p_top.sum(1) - c * top_mass) / total)[:, None] * acc
        grad += torch.einsum("nk,nkd->nd", coef_top.to(mm), w_top).float()
    return kl, grad


def _head_kl(ctx: Context, rows: Any, head: Any, ids: Any, lp: Any, rest: Any) -> Any:
    """KL(target || model) per position from the final hidden states `rows`, through the output layer (or the
    restricted `head`), its softcap and log-softmax, without keeping any vocabulary-wide array for the backward
    pass: the gradient with respect to `rows` is computed with the loss (`_head_kl_stream`) and scaled by the
    incoming gradient in the backward pass. The same values and gradients as `_kl(_log_softmax(...))`."""
    torch = ctx.fp.torch
    module = ctx.fp.model.get_output_embeddings()
    weight = module.weight.detach() if head is None else head
    bias = None if head is not None or module.bias is None else module.bias.detach()
    cap = getattr(ctx.fp.model.config, "final_logit_softcapping", None)
    if not (torch.is_grad_enabled() and rows.requires_grad):
        return _head_kl_stream(rows, weight, bias, cap, ids, lp, rest, with_grad=False)[0]

    class HeadKL(torch.autograd.Function):
        @staticmethod
        def forward(fctx: Any, x: Any) -> Any:
            kl, grad = _head_kl_stream(x, weight, bias, cap, ids, lp, rest, with_grad=True)
            fctx.save_for_backward(grad)
            return kl

        @staticmethod
        def backward(fctx: Any, grad_kl: Any) -> Any:
            (grad,) = fctx.saved_tensors
            return (grad_kl[:, None] * grad).to(rows.dtype)

    return HeadKL.apply(rows)


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
    mass = np.zeros(ctx.fp.output_shape[0])
    with torch.no_grad():
        for s in tqdm(range(0, len(seqs), batch), desc="vocab: unedited mass", leave=False, disable=not ctx.progress):
            mass += _forward(ctx, seqs[s : s + batch]).exp().sum(0).double().cpu().numpy()
    mass[keep] = np.inf
    return _Vocab(ctx, np.argsort(-mass, kind="stable")[: max(size, len(keep))])


def _batch_kl(ctx: Context, t: _Targets, pick: list[int], vocab: _Vocab | None = None) -> Any:
    """KL(target || model) per position of the picked sequences (`_head_kl`: no vocabulary-wide array for the
    whole batch, whatever the vocabulary)."""
    torch = ctx.fp.torch
    rows = _hidden(ctx, [t.seqs[i] for i in pick])
    full = np.concatenate([t.ids[i] for i in pick])
    ids = torch.from_numpy(full if vocab is None else vocab.ids(full)).to(rows.device)
    lp = torch.from_numpy(np.concatenate([t.logp[i] for i in pick])).to(rows.device)
    rest = torch.from_numpy(np.concatenate([t.rest[i] for i in pick])).to(rows.device)
    return _head_kl(ctx, rows, None if vocab is None else vocab.head, ids, lp, rest)


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


TARGET_ROWS = 128  # positions whose vocabulary-wide log-softmax `_base_targets` holds at once


def _base_targets(ctx: Context, seqs: list[list[int]], k: int, progress: bool, batch: int = 16) -> _Targets:
    """The unedited model's top-k distributions (as `_top` gives them, in order of probability) on `seqs`."""
    torch = ctx.fp.torch
    ids, logp, rest = [], [], []
    with torch.no_grad():
        for s in tqdm(range(0, len(seqs), batch), desc="unedited: distributions", leave=False, disable=not progress):
            chunk = seqs[s : s + batch]
            # The log-softmax a block of positions at a time: never the batch's (positions, vocabulary) arrays,
            # ~1 GB each on Gemma-3's 262,144 tokens, several alive at once (docs/speed-distill.md). torch's top-k,
            # not numpy's argpartition: a sixth of this loop's time on SmolLM2.
            hidden = _hidden(ctx, chunk)
            blocks = [_log_softmax(ctx, hidden[r : r + TARGET_ROWS]).topk(k, dim=1)
                      for r in range(0, hidden.shape[0], TARGET_ROWS)]
            top, idx = torch.cat([b.values for b in blocks]), torch.cat([b.indices for b in blocks])
            top = top.clamp(min=-1e4).cpu().numpy()
            idx = idx.cpu().numpy()
            mass = np.exp(top.astype(np.float64)).sum(1)
            r = np.log(np.clip(1.0 - mass, 1e-12, None)).astype(np.float32)
            at = 0
            for c in chunk:
                ids.append(idx[at : at + len(c) - 1])
                logp.append(top[at : at + len(c) - 1])
                rest.append(r[at : at + len(c) - 1])
                at += len(c) - 1
    return _Targets(seqs, ids, logp, rest, np.arange(len(seqs)))


def _eog_directions(ctx: Context, source: Path) -> Any:
    """(d, n) orthonormal basis of the residual directions that raise an end-of-generation token's logit against
    the vocabulary's mean: gamma * (w_k - mean_j w_j) for every token k llama.cpp ends a generation at (gamma: the
    final norm's gain, Gemma's 1 + weight)."""
    from pydetox.discover.base import final_gain
    from pydetox.runtime import special_tokens

    torch = ctx.fp.torch
    special = sorted(set(ctx.fp.tokenizer.all_special_ids) | {ctx.fp.tokenizer.eos_token_id} - {None})
    eog = special_tokens(source, special, eog_only=True)
    if not eog:
        raise PydetoxError(f"distill: eog_free, but no special token of {source.name} ends a generation in llama.cpp")
    w = ctx.fp.model.get_output_embeddings().weight.detach()  # as stored
    gamma = torch.from_numpy(final_gain(ctx)).to(w.device)
    # the column sums a block of rows at a time: `w.sum(0, dtype=float64)` converts the whole layer first (1.1 GB
    # for Qwen2.5's 151,936 x 896)
    total = sum(w[i : i + OUTPUT_ROWS].sum(0, dtype=torch.float64) for i in range(0, w.shape[0], OUTPUT_ROWS))
    rows = (w[eog].double() - total / w.shape[0]) * gamma
    q, _ = torch.linalg.qr(rows.T)
    return q.to(torch.float32)


def _schedule(p: DistillParams, gen: np.random.Generator, toxic_lengths: list[int], clean_lengths: list[int],
              train_t: Any, train_c: Any) -> list[tuple[list[int], list[int]]]:
    """The (toxic, clean) batch of every training step, drawn before training (the same draws in the same order as
    drawing them step by step): only the clean sequences some step draws need the unedited model's targets."""
    if p.batching == "length":
        by_length_t = _length_batches(train_t, toxic_lengths, p.batch, gen)
        by_length_c = _length_batches(train_c, clean_lengths, p.batch, gen)
        return [(next(by_length_t), next(by_length_c)) for _ in range(p.steps)]
    return [(gen.choice(train_t, p.batch, replace=False).tolist(), gen.choice(train_c, p.batch, replace=False).tolist())
            for _ in range(p.steps)]


class _Student:
    """The update being trained, with what it is trained against: the teacher's targets on the toxic sequences,
    the unedited model's on the clean ones (`clean`; None: computed at each step, `clean_kl=full`), and the
    restricted vocabulary when `vocab` asks for one."""

    def __init__(self, ctx: Context, p: DistillParams, bf16: Any, toxic: _Targets, clean_seqs: list[list[int]],
                 clean: _Targets | None, layers: list[int], train_c: Any) -> None:
        self.ctx, self.p, self.bf16, self.toxic, self.clean_seqs, self.clean = ctx, p, bf16, toxic, clean_seqs, clean
        self.torch = ctx.fp.torch
        self.lora = _LoRA(ctx, layers, p.rank, p.seed if p.train_seed < 0 else p.train_seed)
        decoder = ctx.fp.spec.layers(ctx.fp.model)
        self.recompute = _Recompute(self.torch, [decoder[i] for i in layers]) if p.recompute else None
        self.n_vocab = ctx.fp.output_shape[0]
        self.vocab: _Vocab | None = None
        if 0 < p.vocab < self.n_vocab:
            with bf16:
                self.vocab = _restricted_vocab(ctx, p.vocab, [toxic] + ([clean] if clean is not None else []),
                                               [clean_seqs[i] for i in train_c], p.seed, sample=p.vocab_sample)

    def _chunks(self, n_items: int, label: str) -> Any:
        return tqdm(range(0, n_items, 16), desc=label, leave=False, disable=not self.ctx.progress)

    def clean_kl(self, pick: list[int], v: _Vocab | None = None) -> Any:
        if self.clean is None:
            return _full_kl(self.ctx, self.lora, [self.clean_seqs[i] for i in pick], v)
        if missing := self.clean.missing(pick):
            raise PydetoxError(f"distill: no unedited targets for clean sequences {missing[:5]} (not in the schedule)")
        return _batch_kl(self.ctx, self.clean, pick, v)

    def held_out(self, val_t: list[int], val_c: list[int]) -> dict[str, float]:
        """Mean KL to the teacher on the held-out toxic sequences and to the unedited model on the held-out clean
        ones, over the whole vocabulary."""
        torch, ctx = self.torch, self.ctx
        def trimmed(kl: Any) -> Any:
            heap.trim()  # each chunk pads to its own length: its freed arrays back to the system, as after a step
            return kl

        with torch.no_grad(), self.bf16:
            kt = torch.cat([trimmed(_batch_kl(ctx, self.toxic, val_t[s : s + 16]))
                            for s in self._chunks(len(val_t), "held out: toxic")])
            kc = torch.cat([trimmed(self.clean_kl(val_c[s : s + 16])) for s in self._chunks(len(val_c), "held out: clean")])
        return {"teacher_kl": round(float(kt.mean()), 4), "clean_kl": round(float(kc.mean()), 5)}

    def coverage(self, val_t: list[int], val_c: list[int]) -> dict[str, Any] | None:
        """The unedited model's mean probability mass inside the restricted vocabulary (None: no restriction)."""
        if self.vocab is None:
            return None
        torch, ctx = self.torch, self.ctx
        keep = torch.from_numpy(self.vocab.keep).to(ctx.fp.device)

        def mass(seqs: list[list[int]]) -> float:
            with torch.no_grad(), self.bf16:
                lp = torch.cat([_forward(ctx, seqs[s : s + 16]) for s in self._chunks(len(seqs), "vocab: coverage")])
            return round(float(torch.logsumexp(lp[:, keep], 1).exp().mean()), 5)

        return {"tokens": len(self.vocab.keep), "of": self.n_vocab,
                "mass_toxic": mass([self.toxic.seqs[i] for i in val_t]),
                "mass_clean": mass([self.clean_seqs[i] for i in val_c])}

    def train(self, schedule: list[tuple[list[int], list[int]]]) -> list[tuple[int, float, float]]:
        """Adam steps of teacher KL + clean_weight x clean KL over the batches of `schedule`; returns the loss curve
        every 20 steps."""
        p, ctx = self.p, self.ctx
        opt = self.torch.optim.Adam(self.lora.params(), lr=p.lr)
        curve = []
        bar = tqdm(schedule, desc="distill: train", leave=False, disable=not ctx.progress)
        for step, (bt, bc) in enumerate(bar):
            opt.zero_grad()
            # The two terms' gradients are accumulated one after the other, so that only one batch's activations
            # are held for a backward pass at a time (the same gradient as one backward of their sum).
            with self.bf16:
                lt = _batch_kl(ctx, self.toxic, bt, self.vocab).mean()
            lt.backward()
            with self.bf16:
                lc = self.clean_kl(bc, self.vocab).mean()
            (p.clean_weight * lc).backward()
            opt.step()
            heap.trim()  # this step's activations, freed, back to the system: the next batch pads to another length
            if step % 20 == 0 or step == len(schedule) - 1:
                curve.append((step, round(lt.item(), 4), round(lc.item(), 5)))
                bar.set_postfix(teacher_kl=f"{lt.item():.3f}", clean_kl=f"{lc.item():.4f}")
        return curve

    def remove(self, basis: Any) -> None:
        """Take the span of the orthonormal columns of `basis` (d, n) out of the update's output directions."""
        with self.torch.no_grad():
            for b in self.lora.B:  # (d, rank)
                b -= basis @ (basis.T @ b)

    def close(self) -> None:
        """The model as it was: the update's hooks and any recomputation wrappers removed."""
        self.lora.close()
        if self.recompute is not None:
            self.recompute.close()

    def edits(self) -> list[Edit]:
        """The update as `low_rank` edits of the down-projections (W <- W + L^T R, L = B^T, R = A)."""
        out = []
        for layer, a, b in zip(self.lora.layers, self.lora.A, self.lora.B, strict=True):
            w = self.ctx.fp.down_proj(layer).weight
            out.append(Edit(self.ctx.fp.down_proj_name(layer), EditKind.LOW_RANK, tuple(w.shape),
                            b.detach().T.contiguous().cpu().numpy().astype(np.float32),
                            a.detach().cpu().numpy().astype(np.float32)))
        return out
