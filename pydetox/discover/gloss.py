"""GloSS: one global toxic subspace, removed from what the FFNs write.

"Detoxifying LLMs via Global Toxic Subspace Suppression" (GloSS, 2025). Per layer, the FFN outputs of paired
toxic and non-toxic texts are differenced and decomposed (SVD); each candidate direction is read through the
unembedding, and kept when enough of its top tokens are bad words (an LDNOOBW list). The kept directions of all
layers, weighted by their singular values, are decomposed again (PCA); the top `rank` components are the global
toxic subspace, projected out of the down-projections of the chosen layers (`project_out` of ffn_down).

Deviation from a naive implementation (see `base.massive_dims`): residual channels with massive activations are
zeroed in the differences before any decomposition, so the subspace never contains them (removing them breaks the
model), and the first token of each text (the attention sink) is left out of the pooling.

Parameters: `candidates` per layer, `top_tokens` read per direction, `min_bad` bad-word tokens among them to keep
a direction, `rank` of the global subspace, `layers` to edit (empty: every layer), `gain` (0 removes the subspace,
0 < g < 1 only damps it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pydetox.discover.base import Context, Method, badword_token_mask, logit_lens, massive_dims, register_method, token_strings
from pydetox.errors import PydetoxError
from pydetox.plan import Edit, EditKind


@dataclass(frozen=True)
class GloSSParams:
    candidates: int = 8  # candidate directions per layer (top singular vectors of the paired differences)
    top_tokens: int = 50  # tokens read off each direction through the unembedding
    min_bad: int = 3  # bad-word tokens among them for a direction to be kept
    rank: int = 4  # dimension of the global toxic subspace
    layers: tuple[int, ...] = ()  # layers whose ffn_down loses the subspace, comma-separated (empty: all)
    gain: float = 0.0  # what is kept of the subspace: 0 removes it, 0 < g < 1 damps it


def ffn_outputs(ctx: Context, layer: int, which: str) -> np.ndarray:
    """Pooled FFN output of each text: W_down applied to the pooled neurons (exact: the pooling is linear)."""
    acts = (ctx.toxic if which == "toxic" else ctx.neutral).neurons_mean[layer].astype(np.float64)
    return acts @ ctx.down_weight(layer).astype(np.float64).T


@register_method
class GloSS(Method):
    name = "gloss"
    paper = "Detoxifying LLMs via Global Toxic Subspace Suppression (GloSS), 2025"
    Params = GloSSParams

    def edits(self, ctx: Context, params: Any) -> tuple[list[Edit], dict[str, Any]]:
        p: GloSSParams = params
        unembed = logit_lens(ctx)
        bad = badword_token_mask(ctx, token_strings(ctx), unembed.shape[0])
        skip = massive_dims(ctx)
        kept, info = [], []
        for layer in range(ctx.fp.n_layers):
            diff = ffn_outputs(ctx, layer, "toxic") - ffn_outputs(ctx, layer, "neutral")
            diff[:, skip] = 0.0
            mean = diff.mean(axis=0)
            _, s, vt = np.linalg.svd(diff, full_matrices=False)
            for j in range(min(p.candidates, len(s))):
                v = vt[j] * (1.0 if float(vt[j] @ mean) >= 0 else -1.0)  # orient toward the toxic side
                top = np.argsort(unembed @ v)[::-1][: p.top_tokens]
                n_bad = int(bad[top].sum())
                if n_bad >= p.min_bad:
                    kept.append(s[j] * v)
                    info.append({"layer": layer, "component": j, "bad_tokens": n_bad, "singular_value": float(s[j])})
        if not kept:
            raise PydetoxError(f"GloSS kept no direction: none of the top {p.top_tokens} tokens of any candidate held "
                               f"{p.min_bad} bad words; lower min_bad or raise candidates")
        _, s2, basis = np.linalg.svd(np.stack(kept), full_matrices=False)
        basis = basis[: min(p.rank, len(s2))]
        basis[:, skip] = 0.0
        basis, _ = np.linalg.qr(basis.T)
        basis = basis.T.astype(np.float32)
        layers = p.layers or tuple(range(ctx.fp.n_layers))
        gain = None if p.gain == 0 else np.full(basis.shape[0], p.gain, np.float32)
        edits = []
        for layer in layers:
            w = ctx.fp.down_proj(layer).weight
            edits.append(Edit(ctx.fp.down_proj_name(layer), EditKind.PROJECT_OUT, (w.shape[0], w.shape[1]), basis, gain=gain))
        return edits, {"kept_directions": info, "massive_dims": skip.tolist(), "global_singular_values": s2[: p.rank].tolist()}
