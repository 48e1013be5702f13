"""ProFS: per-layer projection of a toxic subspace out of the FFN down-projections.

Uppaal et al., "DeTox: Toxic Subspace Projection for Model Editing" (ProFS), 2024/2025. Per layer, the preference
matrix of paired hidden states P = (toxic - non-toxic) / 2 is centred by removing its projection on the normalised
non-toxic mean, decomposed (SVD), and its top-k right singular vectors are projected out of that layer's
down-projection (`project_out`). Layers from `first_layer` on (the paper edits the upper half).

Defaults measured on SmolLM2-135M-Instruct (700 RTP challenging prompts, greedy, F16): k = 1 on the last third of
the layers cut the toxic rate 1.21-1.29x (three evaluators) for +4.7% perplexity and KL 0.046; k = 2 on the upper
half cut it 1.28-1.41x for +14.8% perplexity and KL 0.146.

The naive version breaks SmolLM2: from layer ~12 the leading direction of the preference matrix is dominated by
a few massive-activation channels (dims 247, 507, 17), and projecting it out makes the model repeat tokens
(perplexity x3.3 at k = 2 on 15 layers). Here those channels are zeroed before the decomposition
and in the basis, and the first token is left out of the pooling; `k` and `first_layer` are parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pydetox.discover.base import Context, Method, massive_dims, register_method
from pydetox.plan import Edit, EditKind


@dataclass(frozen=True)
class ProFSParams:
    k: int = 1  # toxic directions projected out per layer (top singular vectors of the centred preference matrix)
    first_layer: int = -1  # -1: the last third of the layers
    gain: float = 0.0  # what is kept of them: 0 removes, 0 < g < 1 damps


@register_method
class ProFS(Method):
    name = "profs"
    paper = "Uppaal et al., DeTox / ProFS: toxic subspace projection, 2024"
    Params = ProFSParams

    def edits(self, ctx: Context, params: Any) -> tuple[list[Edit], dict[str, Any]]:
        p: ProFSParams = params
        n = ctx.fp.n_layers
        first = n - max(1, n // 3) if p.first_layer < 0 else p.first_layer
        skip = massive_dims(ctx)
        edits, svals = [], {}
        for layer in range(first, n):
            t = ctx.toxic.residual_mean[layer].astype(np.float64)
            nt = ctx.neutral.residual_mean[layer].astype(np.float64)
            pref = (t - nt) / 2
            pref[:, skip] = 0.0
            mu = nt.mean(0)
            mu[skip] = 0.0
            mu /= np.linalg.norm(mu) + 1e-12
            pref -= np.outer(pref @ mu, mu)
            _, s, vt = np.linalg.svd(pref, full_matrices=False)
            basis = vt[: p.k].copy()
            basis[:, skip] = 0.0
            q, _ = np.linalg.qr(basis.T)
            w = ctx.fp.down_proj(layer).weight
            gain = None if p.gain == 0 else np.full(p.k, p.gain, np.float32)
            edits.append(Edit(ctx.fp.down_proj_name(layer), EditKind.PROJECT_OUT, (w.shape[0], w.shape[1]),
                              q.T.astype(np.float32), gain=gain))
            svals[layer] = s[: p.k].round(4).tolist()
        return edits, {"first_layer": first, "massive_dims": skip.tolist(), "singular_values": svals}
