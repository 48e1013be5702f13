"""Activations of a full-precision model on lists of texts: per layer, the input of each FFN down-projection
(the "neurons" AurA, Meow2X and TRNE act on) and the residual stream after each layer (the space GloSS, ProFS
and EigenShift work in). Batched, no gradients, pooled per text over its real (non-padding) tokens; sums are
accumulated in float64."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from pydetox.discover.model import FullPrecisionModel


@dataclass
class Activations:
    """Per text: neurons[layer] is (n_texts, d_ff) and residual[layer] (n_texts, d_model), pooled over tokens."""

    neurons_mean: list[npt.NDArray[np.float32]]
    neurons_max: list[npt.NDArray[np.float32]]
    residual_mean: list[npt.NDArray[np.float32]]
    final_mean: npt.NDArray[np.float32]  # after the final norm: what the output layer reads


def collect(fp: FullPrecisionModel, texts: list[str], *, max_tokens: int = 64, batch: int = 16,
            skip_first: bool = True, progress: bool = True, label: str = "") -> Activations:
    torch = fp.torch
    n_layers = fp.n_layers
    captured: dict[int, object] = {}
    hooks = []
    for i in range(n_layers):
        def hook(_module: object, args: tuple[object, ...], i: int = i) -> None:
            captured[i] = args[0]
        hooks.append(fp.down_proj(i).register_forward_pre_hook(hook))
    neurons_mean: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
    neurons_max: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
    residual: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
    final: list[np.ndarray] = []
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(texts), batch), desc=f"activations {label}".strip(), disable=not progress, leave=False):
                enc = fp.tokenizer(texts[start : start + batch], return_tensors="pt", padding=True, truncation=True,
                                   max_length=max_tokens)
                out = fp.model.base_model(**enc, output_hidden_states=True)  # no output layer: no logits
                mask = enc["attention_mask"].to(torch.float64)
                if skip_first:
                    # The first position carries the "attention sink" and its massive activations;
                    # it says nothing about the text's toxicity.
                    mask[:, 0] = 0
                    mask[mask.sum(1) == 0, 0] = 1
                denom = mask.sum(1, keepdim=True)
                m3 = mask.unsqueeze(-1)

                def pool_mean(x: Any, m3: Any = m3, denom: Any = denom) -> np.ndarray:
                    out: np.ndarray = ((x.to(torch.float64) * m3).sum(1) / denom).to(torch.float32).numpy()
                    return out

                for i in range(n_layers):
                    a = captured[i]
                    neurons_mean[i].append(pool_mean(a))
                    neg = torch.finfo(torch.float32).min
                    neurons_max[i].append(a.masked_fill(m3 == 0, neg).amax(1).numpy())  # type: ignore[attr-defined]
                    residual[i].append(pool_mean(out.hidden_states[i + 1]))
                final.append(pool_mean(out.hidden_states[-1]))  # transformers applies the final norm to the last one
    finally:
        for h in hooks:
            h.remove()
    cat = np.concatenate
    return Activations([cat(x) for x in neurons_mean], [cat(x) for x in neurons_max], [cat(x) for x in residual], cat(final))
