"""Meow2X-style neuron scaling: find the FFN neurons of the early layers whose activations differ most between
toxic and non-toxic text, and scale them down.

The localization follows the neuron-level toxicity analyses of early MLP layers (the "Meow2X" seed method of this
project's brief): per neuron, the standardized mean difference (Cohen's d) of its pooled activation, toxic vs
paired non-toxic text; the `top` neurons with the largest positive d in the first `layer_fraction` of the layers
are scaled by `gain` (0 silences them). Like AurA, the scaling is a column scaling of the down-projection, folded
into the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pydetox.discover.base import Context, Method, register_method
from pydetox.plan import Edit, EditKind


@dataclass(frozen=True)
class Meow2XParams:
    top: int = 64  # neurons scaled: the largest positive Cohen's d, toxic vs paired neutral text
    layer_fraction: float = 0.34  # the early layers searched, as a fraction of all layers
    gain: float = 0.0  # the chosen neurons' scale (0 silences them)


def cohens_d(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    pooled = np.sqrt(0.5 * (pos.var(0) + neg.var(0))) + 1e-9
    out: np.ndarray = (pos.mean(0) - neg.mean(0)) / pooled
    return out


def localize(ctx: Context, top: int, layer_fraction: float) -> list[tuple[int, int, float]]:
    """(layer, neuron, d) of the `top` most toxic-leaning neurons in the early layers."""
    n_early = max(1, round(ctx.fp.n_layers * layer_fraction))
    cands = []
    for layer in range(n_early):
        d = cohens_d(ctx.toxic.neurons_mean[layer].astype(np.float64), ctx.neutral.neurons_mean[layer].astype(np.float64))
        cands += [(layer, int(j), float(d[j])) for j in np.argsort(d)[::-1][:top]]
    return sorted(cands, key=lambda c: -c[2])[:top]


@register_method
class Meow2X(Method):
    name = "meow2x"
    paper = "neuron-level localization in early MLP layers, scaled down (this project's Meow2X seed method)"
    Params = Meow2XParams

    def edits(self, ctx: Context, params: Any) -> tuple[list[Edit], dict[str, Any]]:
        p: Meow2XParams = params
        chosen = localize(ctx, p.top, p.layer_fraction)
        edits = []
        for layer in sorted({c[0] for c in chosen}):
            w = ctx.fp.down_proj(layer).weight
            gains = np.ones(w.shape[1], np.float32)
            for _, j, _ in (c for c in chosen if c[0] == layer):
                gains[j] = p.gain
            edits.append(Edit(ctx.fp.down_proj_name(layer), EditKind.SCALE_COLS, (w.shape[0], w.shape[1]), gains))
        return edits, {"neurons": [(c[0], c[1], round(c[2], 3)) for c in chosen]}
