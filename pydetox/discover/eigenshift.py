"""EigenShift: damp the singular components of the output layer that toxic generations lean on.

"EigenShift: Eigen-based Intervention for Toxicity Reduction in LLMs", 2025. The output layer W (vocab x d) is
decomposed, W = U S V^T; each right singular vector v_j (a direction of the final hidden state) is scored by how
much more toxic than non-toxic texts' final hidden states project on it, times how toxic the tokens it promotes
are (the bad-word share among the top tokens of its left singular vector). The top-k components are damped,
s_j <- alpha s_j, which is the input-side edit W <- W (I - V_k^T (1 - alpha) V_k): stored as k x d numbers
(`project_in` with gain alpha), not a vocab x d matrix. On a model with tied embeddings the edit goes to a new
output tensor and the input embedding stays as it was.

Parameters: `alpha` (kept share of each damped component; 0.9 in the paper), `k_fraction` (k = fraction of d; the
paper's k = 1024 of d = 4096 is 0.25), `top_tokens` for the bad-word share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pydetox.discover.base import Context, Method, badword_token_mask, register_method, token_strings
from pydetox.plan import Edit, EditKind


@dataclass(frozen=True)
class EigenShiftParams:
    alpha: float = 0.9  # share kept of each damped singular component (the paper: 0.9)
    k_fraction: float = 0.25  # components damped, as a fraction of d (the paper's 1024 of 4096)
    top_tokens: int = 100  # tokens read off each component for its bad-word share


@register_method
class EigenShift(Method):
    name = "eigenshift"
    paper = "EigenShift: Eigen-based Intervention for Toxicity Reduction in LLMs, 2025"
    Params = EigenShiftParams

    def edits(self, ctx: Context, params: Any) -> tuple[list[Edit], dict[str, Any]]:
        p: EigenShiftParams = params
        w = ctx.fp.unembedding().numpy().astype(np.float64)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        bad = badword_token_mask(ctx, token_strings(ctx), w.shape[0])
        ht = ctx.toxic.final_mean.astype(np.float64) @ vt.T  # (n, d) coordinates
        hn = ctx.neutral.final_mean.astype(np.float64) @ vt.T
        shift = (ht.mean(0) - hn.mean(0)) / (np.sqrt(0.5 * (ht.var(0) + hn.var(0))) + 1e-9)
        # A component promotes the tokens at the top of u_j when the shift is positive, at the bottom when negative.
        bad_share = np.empty(len(s))
        for j in range(len(s)):
            col = u[:, j] * np.sign(shift[j] or 1.0)
            bad_share[j] = bad[np.argpartition(-col, p.top_tokens)[: p.top_tokens]].mean()
        score = np.abs(shift) * s * (bad_share + 1.0 / p.top_tokens)
        k = max(1, round(p.k_fraction * w.shape[1]))
        top = np.argsort(score)[::-1][:k]
        basis = vt[top].astype(np.float32)
        edit = Edit(ctx.fp.output_name, EditKind.PROJECT_IN, (w.shape[0], w.shape[1]), basis,
                    gain=np.full(k, p.alpha, np.float32), source=ctx.fp.output_source)
        return [edit], {"k": k, "components": top[:32].tolist(), "bad_share_top": bad_share[top[:32]].round(3).tolist()}
