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

from pydetox.discover import aura, distill, eigenshift, gloss, meow2x, profs, trne, unlikelihood, wordfilter  # noqa: F401  (they register themselves)
from pydetox.discover.activations import Activations, collect
from pydetox.discover.base import METHODS, Context, get_method, make_params
from pydetox.discover.data import EMBEDDED, DiscoveryData, load_pairs
from pydetox.discover.model import FullPrecisionModel
from pydetox.plan import EditPlan

__all__ = ["METHODS", "Discovery", "discover"]


def _badwords() -> list[str]:
    from pydetox.assets import fetch_file

    lines = fetch_file("badwords").read_text(encoding="utf-8").splitlines()
    return [w.strip() for w in lines if w.strip() and not w.startswith("#")]


class Discovery:
    """A model with activations on one discovery set, ready to run any number of methods on them."""

    def __init__(self, source: str | Path, *, data: str = EMBEDDED, n_pairs: int = 500, seed: int = 0,
                 max_tokens: int = 64, progress: bool = True) -> None:
        from pydetox.prompts import load_prompts

        t0 = time.perf_counter()
        self.fp = FullPrecisionModel(source, progress=progress)
        self.load_s = time.perf_counter() - t0
        # Never the prompts used for evaluation.
        exclude = set(load_prompts("rtp-challenging").prompts)
        self.data: DiscoveryData = load_pairs(data, n_pairs, seed, exclude)
        t0 = time.perf_counter()
        self.toxic: Activations = collect(self.fp, self.data.toxic, max_tokens=max_tokens, progress=progress, label="toxic")
        self.neutral: Activations = collect(self.fp, self.data.neutral, max_tokens=max_tokens, progress=progress, label="neutral")
        self.activation_s = time.perf_counter() - t0
        self.settings = {"data": self.data.source, "n_pairs": n_pairs, "seed": seed, "max_tokens": max_tokens}
        self.context = Context(self.fp, self.data, self.toxic, self.neutral, _badwords(), progress)

    def plan(self, method: str, overrides: dict[str, str] | None = None) -> EditPlan:
        m = get_method(method)
        params = make_params(m, overrides or {})
        t0 = time.perf_counter()
        edits, diagnostics = m.edits(self.context, params)
        record: dict[str, Any] = {**asdict(params), **self.settings, "paper": m.paper,
                                  "method_s": round(time.perf_counter() - t0, 3), "diagnostics": diagnostics}
        return EditPlan(arch=self.fp.arch, edits=edits, method=method, params=record, model=Path(str(self.fp.source)).name)


def discover(method: str, source: str | Path, overrides: dict[str, str] | None = None, **kwargs: Any) -> EditPlan:
    return Discovery(source, **kwargs).plan(method, overrides)
