"""A plan's strength fitted to a KL budget on held-out clean text, without looking at toxicity.

`pydetox plan scale` trades detox for capability at a strength the user picks; read off the evaluation prompts,
that pick is tuned on the test set. `fit_strength` picks it from the other side: the largest strength whose edited
model stays within `budget` nats/token of KL(unedited || edited) on clean text that neither discovery nor the
evaluation uses (`plan fit`'s default: the first tokens of `wiki`, as `pydetox eval --clean-text wiki` reads them,
in the paragraphs `pydetox.splits` holds out from training; the recipe's: `news-held-out`, the news documents
evaluation never reads, whose KL tracks the report's across models where wiki's does not). Each
trial applies the scaled plan to the given GGUF exactly as `pydetox apply` would (same `edited_floor`) and measures
KL in llama.cpp against that GGUF.

KL grows about quadratically with strength (the edited logits move linearly), so each step proposes
s * sqrt(budget / KL(s)) and falls back to bisection when that leaves the bracket. The search starts at strength 1
(the edit as discovered) and goes above it up to `max_strength` when the budget allows: a plan whose KL at strength 1
is far under the budget leaves effect unused (Plan.scaled extrapolates the same edit linearly).

A `fixed` plan rides along at strength 1 in every trial (merged after the scaled plan): an edit that is all or
nothing, such as the word filter's rows scaled to 0 (scaled by 1.2 they would turn negative), whose KL the budget
must still hold.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf

from pydetox.apply import ApplyOptions, apply_plan
from pydetox.capability import capability
from pydetox.errors import PydetoxError
from pydetox.plan import EditPlan
from pydetox.runtime import LlamaRuntime


@dataclass(frozen=True)
class Trial:
    strength: float
    kl: float
    perplexity: float


@dataclass(frozen=True)
class Fit:
    strength: float  # the largest strength tried whose KL is within the budget (0 when none is)
    budget: float
    trials: list[Trial]

    @property
    def best(self) -> Trial | None:
        return next((t for t in self.trials if t.strength == self.strength), None)


def fit_strength(plan: EditPlan, model: str | Path, budget: float, documents: list[str], *, max_tokens: int = 4096,
                 window: int = 512, edited_floor: gguf.GGMLQuantizationType | None = None, steps: int = 6,
                 tol: float = 0.05, max_strength: float = 1.0, threads: int | None = None,
                 ftype: gguf.LlamaFileType | None = None, fixed: EditPlan | None = None, progress: bool = True) -> Fit:
    """`ftype` None: each trial edits `model` keeping its types and KL is measured against `model` itself. Given, the
    KL is measured at that model type: each trial applies the plan with `ftype` (as `pydetox apply --type` does) and
    the reference is `model` converted to `ftype` unedited, so the budget holds for the quantized model a user runs
    (at Q4_K_M the same edit costs more KL than at F16)."""
    if not budget > 0:
        raise PydetoxError(f"the KL budget must be > 0 nats/token, got {budget}")
    if not 1.0 <= max_strength <= 10.0:
        raise PydetoxError(f"max_strength must be in [1, 10], got {max_strength}")
    if steps < 1:
        raise PydetoxError(f"steps must be >= 1, got {steps}")
    with tempfile.TemporaryDirectory(prefix="pydetox-fit-") as tmp:
        base = Path(model)
        if ftype is not None:
            base = Path(tmp) / "reference.gguf"
            apply_plan(None, model, base, ApplyOptions(ftype=ftype, threads=threads, verify=False, progress=False))
        with LlamaRuntime(base, n_ctx=window, n_batch=window, threads=threads) as ref:
            return _search(plan, model, budget, documents, ref, Path(tmp), max_tokens=max_tokens, window=window,
                           options=ApplyOptions(ftype=ftype, edited_floor=edited_floor, threads=threads, verify=False,
                                                progress=False),
                           steps=steps, tol=tol, max_strength=max_strength, fixed=fixed, progress=progress)


def with_fixed(scaled: EditPlan, fixed: EditPlan | None) -> EditPlan:
    """`scaled` with the edits of `fixed` after it (`EditPlan.merged`), or `scaled` alone."""
    return scaled if fixed is None else EditPlan.merged([("scaled", scaled), ("fixed", fixed)])


def _search(plan: EditPlan, model: str | Path, budget: float, documents: list[str], ref: LlamaRuntime, tmp: Path, *,
            max_tokens: int, window: int, options: ApplyOptions, steps: int, tol: float, max_strength: float,
            fixed: EditPlan | None, progress: bool) -> Fit:
    trials: list[Trial] = []

    def measure(strength: float) -> Trial:
        out = tmp / f"s{strength:.4f}.gguf"
        apply_plan(with_fixed(plan.scaled(strength), fixed), model, out, options)
        with LlamaRuntime(out, n_ctx=window, n_batch=window, threads=options.threads) as rt:
            cap = capability(rt, documents, reference=ref, max_tokens=max_tokens, window=window, progress=False)
        out.unlink()
        assert cap.kl is not None
        trial = Trial(strength, cap.kl, cap.perplexity)
        trials.append(trial)
        if progress:
            print(f"fit: strength {trial.strength:.4f}  KL {trial.kl:.4f}  perplexity {trial.perplexity:.2f}")
        return trial

    lo, hi, s = 0.0, max_strength, 1.0
    tried: set[float] = set()
    for _ in range(steps):
        t = measure(s)
        tried.add(s)
        if t.kl <= budget:
            lo = s
        else:
            hi = s
        if (t.kl <= budget and (s == max_strength or t.kl >= (1 - tol) * budget)) or hi - lo < 0.005:
            break
        # aim inside the band [(1 - tol) budget, budget], not at its edge: a guess aimed at the budget itself
        # lands on either side of it by the curve's noise, and the steps can run out above it
        guess = s * math.sqrt((1 - tol / 2) * budget / max(t.kl, 1e-12))
        # the ceiling itself is allowed: tried before bisecting below it
        s = hi if guess >= hi and hi not in tried else round(guess if lo < guess < hi else (lo + hi) / 2, 4)
    within = [t.strength for t in trials if t.kl <= budget]
    return Fit(max(within, default=0.0), budget, trials)
