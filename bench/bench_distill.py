"""One `distill` training step on Gemma-3-270m (262,144-token vocabulary): the output layer restricted to 32,768
tokens (`--param vocab=32768`) against the whole vocabulary, the same step otherwise (8 toxic + 8 clean sequences,
rank-32 update of ffn_down from layer 6 on, teacher KL over top-32 targets plus the exact clean KL with the unedited
model computed alongside). Run: pytest bench/bench_distill.py -s"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import numpy as np

from pydetox.assets import fetch
from pydetox.discover.data import EMBEDDED, usable_pairs
from pydetox.discover.distill.student import _base_targets, _batch_kl, _full_kl, _LoRA, _Vocab
from pydetox.discover.model import FullPrecisionModel


def test_restricted_vocabulary_training_step(compare: Callable[..., float]) -> None:
    fp = FullPrecisionModel(fetch("gemma3-270m", quiet=True), progress=False)
    fp.model.requires_grad_(False)
    ctx: Any = types.SimpleNamespace(fp=fp)
    rows, _ = usable_pairs(EMBEDDED, set())
    tok = fp.tokenizer
    toxic = [tok(r["toxic"]).input_ids[:64] for r in rows[:8]]
    clean = [tok(r["neutral"]).input_ids[:64] for r in rows[8:16]]
    targets = _base_targets(ctx, toxic, 32, progress=False)  # stand-in teacher targets: the model's own top-32
    ids = targets.ids
    named = np.unique(np.concatenate(ids))
    vocab = _Vocab(ctx, np.union1d(named, np.setdiff1d(np.arange(32768), named)[: 32768 - len(named)]))
    lora = _LoRA(ctx, list(range(6, fp.n_layers)), 32, 0)
    pick = list(range(8))

    def step(v: _Vocab | None) -> None:
        loss = _batch_kl(ctx, targets, pick, v).mean() + 24 * _full_kl(ctx, lora, clean, v).mean()
        loss.backward()
        for p in lora.params():
            p.grad = None

    ratio = compare("whole vocabulary", lambda: step(vocab), lambda: step(None), rounds=3)
    lora.close()
    print(f"restricted to {len(vocab.keep)} of {fp.unembedding().shape[0]} tokens")
    assert ratio > 0


def test_plausible_top_k(compare: Callable[..., float]) -> None:
    """The teacher's targets at each position of one 64-token toxic ParaDetox sentence on Gemma-3-270m: the top-32
    of the distribution restricted to the plausible tokens (>= 1e-3 of the top token's probability), computed on the
    masked tokens only against numpy over all 262,144 logits of each row."""
    from pydetox.discover.distill.teacher import _top_dense, _top_plausible
    from pydetox.runtime import LlamaRuntime

    rows, _ = usable_pairs(EMBEDDED, set())
    with LlamaRuntime(fetch("gemma3-270m", quiet=True), n_ctx=512, n_batch=512) as rt:
        text = " ".join(r["toxic"] for r in rows[:6])
        lp = rt.logprobs(rt.tokenize(text)[:64])
    mask = lp >= lp.max(axis=1, keepdims=True) + np.log(1e-3)
    ratio = compare("numpy over whole rows", lambda: _top_plausible(lp, 32, mask), lambda: _top_dense(lp, 32, mask))
    print(f"plausible tokens per position: median {np.median(mask.sum(1)):.0f} of {lp.shape[1]}")
    assert ratio > 0


def test_streamed_student_loss(compare: Callable[..., float]) -> None:
    """distill's teacher KL with its gradient on Gemma-3-270m (8 sequences of up to 64 tokens, top-32 targets, a
    rank-32 update of ffn_down from layer 6 on): streamed over the output layer in closed form (`_batch_kl`) against
    torch autograd through the whole batch's log-softmax (what distill computed before), forward and backward."""
    import torch

    from pydetox.discover.distill.student import _forward, _kl

    fp = FullPrecisionModel(fetch("gemma3-270m", quiet=True), progress=False)
    fp.model.requires_grad_(False)
    ctx: Any = types.SimpleNamespace(fp=fp)
    rows, _ = usable_pairs(EMBEDDED, set())
    toxic = [fp.tokenizer(r["toxic"]).input_ids[:64] for r in rows[:8]]
    targets = _base_targets(ctx, toxic, 32, progress=False)  # stand-in teacher targets: the model's own top-32
    lora = _LoRA(ctx, list(range(6, fp.n_layers)), 32, 0)
    flat = [torch.from_numpy(np.concatenate(a)) for a in (targets.ids, targets.logp, targets.rest)]

    def step(loss: Callable[[], Any]) -> None:
        loss().mean().backward()
        for p in lora.params():
            p.grad = None

    ratio = compare("autograd through the log-softmax",
                    lambda: step(lambda: _batch_kl(ctx, targets, list(range(8)))),
                    lambda: step(lambda: _kl(_forward(ctx, toxic), *flat)), rounds=3)
    lora.close()
    assert ratio > 0
