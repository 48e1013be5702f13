"""`pydetox compare A.gguf B.gguf`: what did the edit change? Both models continue the same prompts (same decoding,
same seeds); the prompts whose continuations the evaluators score most differently are shown side by side with
every evaluator's score, in the terminal and as markdown."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pydetox.evaluate import EvalSettings, evaluate_models, score_all
from pydetox.prompts import PromptSet
from pydetox.scorers import Scorer


@dataclass
class Difference:
    prompt: str
    a: str
    b: str
    scores_a: dict[str, float]
    scores_b: dict[str, float]

    @property
    def gap(self) -> float:
        """The largest change of one evaluator's toxicity score (B - A), by size."""
        return max((self.scores_b[k] - self.scores_a[k] for k in self.scores_a), key=abs)


def compare(a: Path, b: Path, prompts: PromptSet, scorers: list[Scorer], settings: EvalSettings,
            top: int = 10, progress: bool = True) -> list[Difference]:
    """The `top` prompts whose continuations (first sample) differ most in toxicity score between `a` and `b`,
    largest change first; prompts whose continuations are identical are left out."""
    settings = EvalSettings(**{**settings.__dict__, "ppl_tokens": 0, "benign_prompts": 0, "chat_check": False})
    ra, rb = evaluate_models([a, b], settings, prompts, scorers, progress=progress)
    ta = [row[0] for row in ra.continuations]
    tb = [row[0] for row in rb.continuations]
    sa = score_all([[t] for t in ta], scorers)
    sb = score_all([[t] for t in tb], scorers)
    out = []
    for i, p in enumerate(prompts.prompts):
        if ta[i] == tb[i]:
            continue
        out.append(Difference(p, ta[i], tb[i], {k: float(v[i, 0]) for k, v in sa.items()},
                              {k: float(v[i, 0]) for k, v in sb.items()}))
    out.sort(key=lambda d: -abs(d.gap))
    return out[:top]


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def terminal(diffs: list[Difference], a: str, b: str, width: int = 60) -> str:
    lines = []
    for n, d in enumerate(diffs, 1):
        lines.append(f"{n}. {_one_line(d.prompt, 2 * width)!r}")
        lines.append(f"   {a}: {_one_line(d.a, width)!r}")
        lines.append(f"   {'':<{len(a)}}  " + ", ".join(f"{k} {v:.2f}" for k, v in d.scores_a.items()))
        lines.append(f"   {b}: {_one_line(d.b, width)!r}")
        lines.append(f"   {'':<{len(b)}}  " + ", ".join(f"{k} {v:.2f}" for k, v in d.scores_b.items()))
    return "\n".join(lines) if lines else "the two models wrote the same continuation for every prompt"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def markdown(diffs: list[Difference], a: str, b: str, settings_line: str) -> str:
    evaluators = list(diffs[0].scores_a) if diffs else []
    head = ["prompt", a, b, *[f"{e} ({a} → {b})" for e in evaluators]]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in diffs:
        rows.append("| " + " | ".join([_cell(d.prompt), _cell(d.a), _cell(d.b),
                                        *[f"{d.scores_a[e]:.2f} → {d.scores_b[e]:.2f}" for e in evaluators]]) + " |")
    return "\n".join([*rows, "", settings_line, ""])


def mean_gap(diffs: list[Difference]) -> float:
    return float(np.mean([d.gap for d in diffs])) if diffs else 0.0
