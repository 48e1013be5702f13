"""Discovery time on SmolLM2-135M-Instruct from 500 ParaDetox pairs (target: <= 120 s on 2 cores), and the
activation pass against the baseline a user would write: one text at a time through the same model.
Run: pytest bench/bench_discover.py -s"""

from __future__ import annotations

import time

from pydetox.assets import fetch
from pydetox.discover import Discovery
from pydetox.discover.activations import collect


def test_discovery_500_pairs_under_120_s() -> None:
    t0 = time.perf_counter()
    d = Discovery(fetch("smollm2-135m-instruct", quiet=True), n_pairs=500, progress=False)
    timings = {"load_s": d.load_s}
    for method in ("aura", "profs", "eigenshift", "meow2x", "trne"):
        # the first one collects the activations, timed on their own
        timings[f"{method}_s"] = d.plan(method).params["method_s"]
    timings["activations_s"] = d.activation_s
    total = time.perf_counter() - t0
    print("\n" + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + f"; total {total:.1f} s for five methods")
    # batched activations against one text at a time, on 64 texts of the same data
    texts = d.data.toxic[:64]
    t = time.perf_counter()
    collect(d.fp, texts, batch=16, progress=False)
    batched = time.perf_counter() - t
    t = time.perf_counter()
    collect(d.fp, texts, batch=1, progress=False)
    single = time.perf_counter() - t
    print(f"activations of 64 texts: batched {batched:.2f} s, one at a time {single:.2f} s, x{single / batched:.2f}")
    assert total > 0
