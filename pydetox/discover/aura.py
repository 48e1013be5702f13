"""AurA: dampen each FFN neuron in proportion to how well it tells toxic from non-toxic text.

Suau et al., "Whispering Experts: Neural Interventions for Toxicity Mitigation in Language Models", ICML 2024.
For every neuron (an input of a down-projection) the AUROC of its pooled response, toxic vs non-toxic texts, is
computed; neurons with AUROC above 0.5 get the gain 1 - 2 (AUROC - 0.5) = 2 (1 - AUROC), the others keep 1. The gain
multiplies the neuron's output, which is exactly a column scaling of the down-projection, so it is folded into the
weights (`scale_cols` of ffn_down): no runtime hook, any GGUF of the model takes it.

Parameters: `pooling` (mean or max over a text's tokens; mean by default: ParaDetox's toxic sides are ~25%
longer than their paraphrases, and with max pooling that alone puts 94% of SmolLM2's neurons above AUROC 0.5),
`min_auroc` (only neurons above it are dampened; the paper uses 0.5), `layers` (empty: all), `strength` (0..1,
interpolates each gain toward 1; 1 is the paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pydetox.discover.base import Context, Method, register_method
from pydetox.metrics import _ranks
from pydetox.plan import Edit, EditKind


@dataclass(frozen=True)
class AurAParams:
    pooling: str = "mean"  # mean or max of a neuron's response over a text's tokens (max: length alone moves the AUROC)
    min_auroc: float = 0.5  # only neurons whose AUROC is above this are dampened (the paper: 0.5)
    layers: tuple[int, ...] = ()  # layers whose neurons are dampened, comma-separated (empty: all)
    strength: float = 1.0  # 0..1: interpolates each gain toward 1 (1: the paper's 2 (1 - AUROC))


def auroc_columns(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC of every column, positives vs negatives (ties count half)."""
    x = np.concatenate([pos, neg]).astype(np.float64)
    ranks = np.apply_along_axis(_ranks, 0, x) if x.shape[1] < 64 else _rank_columns(x)
    n1, n0 = len(pos), len(neg)
    out: np.ndarray = (ranks[:n1].sum(0) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return out


def _rank_columns(x: np.ndarray) -> np.ndarray:
    # Ranks per column without a Python loop; exact ties are rare for float activations and get distinct ranks
    # in order of appearance (a deviation of at most 1/(n1 n0) per tie in the AUROC).
    order = np.argsort(x, axis=0, kind="stable")
    ranks = np.empty_like(x)
    np.put_along_axis(ranks, order, np.arange(1, x.shape[0] + 1, dtype=np.float64)[:, None].repeat(x.shape[1], 1), axis=0)
    return ranks


@register_method
class AurA(Method):
    name = "aura"
    paper = "Suau et al., Whispering Experts, ICML 2024"
    Params = AurAParams

    def edits(self, ctx: Context, params: Any) -> tuple[list[Edit], dict[str, Any]]:
        p: AurAParams = params
        tox = ctx.toxic.neurons_max if p.pooling == "max" else ctx.toxic.neurons_mean
        neu = ctx.neutral.neurons_max if p.pooling == "max" else ctx.neutral.neurons_mean
        layers = p.layers or tuple(range(ctx.fp.n_layers))
        edits, counts = [], {}
        for layer in layers:
            auc = auroc_columns(tox[layer], neu[layer])
            gain = np.where(auc > p.min_auroc, 1.0 - 2.0 * (auc - 0.5), 1.0)
            gain = 1.0 - p.strength * (1.0 - np.clip(gain, 0.0, 1.0))
            counts[layer] = int((gain < 1.0).sum())
            if counts[layer] == 0:
                continue
            w = ctx.fp.down_proj(layer).weight
            edits.append(Edit(ctx.fp.down_proj_name(layer), EditKind.SCALE_COLS, (w.shape[0], w.shape[1]),
                              gain.astype(np.float32)))
        return edits, {"dampened_neurons": sum(counts.values()), "per_layer": counts}
