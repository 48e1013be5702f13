"""TRNE-style rank-one edit: take the toxic direction out of the localized neurons' write vectors, within a norm
budget.

The neurons are localized as in `meow2x` (early layers, largest standardized toxic-minus-neutral difference).
Per edited layer, u is the mean toxic-minus-neutral FFN output direction (massive-activation channels zeroed, as
`base.massive_dims` explains); each chosen neuron's column w_j of the down-projection loses its component along u,
w_j <- w_j - (u . w_j) u, which for the layer is the rank-one update W <- W - u (u^T W M) (M selects the chosen
columns), stored as a `low_rank` edit. The update is scaled down when needed so that its Frobenius norm stays within
`max_norm_ratio` of the chosen columns' norm: the "norm-constrained" part, which bounds the damage to fluency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pydetox.discover.base import Context, Method, massive_dims, register_method
from pydetox.discover.meow2x import localize
from pydetox.plan import Edit, EditKind


@dataclass(frozen=True)
class TRNEParams:
    top: int = 64  # neurons edited, localized as meow2x does
    layer_fraction: float = 0.34  # the early layers searched, as a fraction of all layers
    max_norm_ratio: float = 0.3  # the update's Frobenius norm at most this share of the chosen columns' norm


@register_method
class TRNE(Method):
    name = "trne"
    paper = "norm-constrained rank-one edit of localized toxic neurons (this project's TRNE seed method)"
    Params = TRNEParams

    def edits(self, ctx: Context, params: Any) -> tuple[list[Edit], dict[str, Any]]:
        p: TRNEParams = params
        chosen = localize(ctx, p.top, p.layer_fraction)
        skip = massive_dims(ctx)
        edits, scales = [], {}
        for layer in sorted({c[0] for c in chosen}):
            w = ctx.down_weight(layer).astype(np.float64)
            diff = (ctx.toxic.neurons_mean[layer].astype(np.float64) - ctx.neutral.neurons_mean[layer].astype(np.float64)).mean(0) @ w.T
            diff[skip] = 0.0
            u = diff / (np.linalg.norm(diff) + 1e-12)
            mask = np.zeros(w.shape[1])
            mask[[c[1] for c in chosen if c[0] == layer]] = 1.0
            right = (u @ w) * mask  # (ff,) the u-component of each chosen column
            delta_norm = np.linalg.norm(right)  # ||u right^T||_F = ||right|| since ||u|| = 1
            budget = p.max_norm_ratio * np.linalg.norm(w * mask)
            scale = float(min(1.0, float(budget / delta_norm))) if delta_norm > 0 else 0.0
            scales[layer] = round(float(scale), 4)
            edits.append(Edit(ctx.fp.down_proj_name(layer), EditKind.LOW_RANK, w.shape,
                              (-scale * u)[None, :].astype(np.float32), right[None, :].astype(np.float32)))
        return edits, {"neurons": [(c[0], c[1], round(c[2], 3)) for c in chosen], "scale": scales}
