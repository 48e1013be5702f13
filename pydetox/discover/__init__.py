"""Discovery: from a full-precision model and toxic vs non-toxic text, compute an edit plan.

Methods (one registry, `pydetox.discover.base.METHODS`): aura, gloss, eigenshift, profs, meow2x, trne, wordfilter,
unlikelihood, distill. Each is a module with its paper and parameters documented; each turns activations and weights
into `Edit`s that the engine applies to any GGUF of the model.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydetox.badwords import load_badwords
from pydetox.discover import aura, distill, eigenshift, gloss, meow2x, profs, trne, unlikelihood, wordfilter  # noqa: F401  (they register themselves)
from pydetox.discover.activations import Activations, collect
from pydetox.discover.base import METHODS, Context, get_method, make_params
from pydetox.discover.data import EMBEDDED, DiscoveryData, load_pairs
from pydetox.discover.model import FullPrecisionModel
from pydetox.plan import EditPlan

__all__ = ["METHODS", "Discovery", "discover"]


class Discovery:
    """A model and one discovery set, ready to run any number of methods; the activations on the set are collected
    once, when the first method that looks at them asks."""

    def __init__(self, source: str | Path, *, data: str = EMBEDDED, n_pairs: int = 500, seed: int = 0,
                 max_tokens: int = 64, progress: bool = True, device: str = "auto") -> None:
        from pydetox.splits import evaluation_prompts

        t0 = time.perf_counter()
        self.fp = FullPrecisionModel(source, progress=progress, device=device)
        self.load_s = time.perf_counter() - t0
        # Never the prompts used for evaluation.
        exclude = set(evaluation_prompts())
        self.data: DiscoveryData = load_pairs(data, n_pairs, seed, exclude)
        self.max_tokens, self.progress = max_tokens, progress
        self.activation_s = 0.0  # time spent collecting activations, once a method has asked for them
        self.settings = {"data": self.data.source, "n_pairs": n_pairs, "seed": seed, "max_tokens": max_tokens}
        self.context = Context(self.fp, self.data, lambda: self._collect(self.data.toxic, "toxic"),
                               lambda: self._collect(self.data.neutral, "neutral"), load_badwords(), progress)

    def _collect(self, texts: list[str], label: str) -> Activations:
        t0 = time.perf_counter()
        out = collect(self.fp, texts, max_tokens=self.max_tokens, progress=self.progress, label=label)
        self.activation_s += time.perf_counter() - t0
        return out

    @property
    def toxic(self) -> Activations:
        return self.context.toxic

    @property
    def neutral(self) -> Activations:
        return self.context.neutral

    def plan(self, method: str, overrides: dict[str, str] | None = None) -> EditPlan:
        m = get_method(method)
        params = make_params(m, {**m.arch_defaults.get(self.fp.arch, {}), **(overrides or {})})
        if self.fp.device not in m.devices:
            if self.progress:
                print(f"{method} runs on the CPU only: moving the model from {self.fp.device}", flush=True)
            self.fp.to("cpu")
        t0, acts0 = time.perf_counter(), self.activation_s
        edits, diagnostics = m.edits(self.context, params)
        method_s = time.perf_counter() - t0 - (self.activation_s - acts0)  # activations are timed on their own
        record: dict[str, Any] = {**asdict(params), **self.settings, "paper": m.paper,
                                  "method_s": round(method_s, 3), "diagnostics": diagnostics}
        return EditPlan(arch=self.fp.arch, edits=edits, method=method, params=record, model=Path(str(self.fp.source)).name)


def discover(method: str, source: str | Path, overrides: dict[str, str] | None = None, **kwargs: Any) -> EditPlan:
    return Discovery(source, **kwargs).plan(method, overrides)
