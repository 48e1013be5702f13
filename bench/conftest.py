from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest


def best_of(fn: Callable[[], Any], rounds: int, setup: Callable[[], Any] | None = None) -> float:
    best = float("inf")
    for _ in range(rounds):
        arg = setup() if setup else None
        t0 = time.perf_counter()
        fn() if setup is None else fn(arg)  # type: ignore[call-arg]
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.fixture
def compare(benchmark: Any) -> Callable[..., float]:
    """Time `ours` with pytest-benchmark and `baseline` by hand in the same run; record and print the speed ratio."""

    def run(name: str, ours: Callable[..., Any], baseline: Callable[..., Any], rounds: int = 5,
            setup: Callable[[], Any] | None = None) -> float:
        base = best_of(baseline, rounds, setup)
        if setup is None:
            benchmark.pedantic(ours, rounds=rounds, iterations=1, warmup_rounds=1)
        else:
            benchmark.pedantic(ours, setup=lambda: ((setup(),), {}), rounds=rounds, iterations=1, warmup_rounds=1)
        mine = benchmark.stats.stats.min
        ratio = base / mine
        benchmark.extra_info.update({"baseline": name, "baseline_min_s": base, "ratio_vs_baseline": ratio})
        print(f"\n{benchmark.name}: pydetox {mine * 1e3:.1f} ms, {name} {base * 1e3:.1f} ms, speed-up x{ratio:.2f}")
        return ratio

    return run
