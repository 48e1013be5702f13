"""Fused generation speed on SmolLM2-135M-Instruct (the shipped Q4_1): target + 3-layer calibrator at alpha 0.4
against the target alone, same prompts (64 RTP challenging), greedy, 20 tokens, 16 sequences per batch, same run.
The calibrator is trained for 2 steps only: its speed does not depend on its weights. Run: pytest bench/bench_fusion.py -s
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pydetox.assets import fetch
from pydetox.calibrate import CalibrateSettings, train
from pydetox.evaluate import EvalSettings, generate
from pydetox.fusion import FusedRuntime
from pydetox.prompts import load_prompts
from pydetox.runtime import LlamaRuntime

N_PROMPTS = 64


@pytest.fixture(scope="module")
def calibrator(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    target = fetch("smollm2-135m-instruct", quiet=True)
    cal = tmp_path_factory.mktemp("cal") / "cal.gguf"
    train(target, cal, CalibrateSettings(steps=2, align_steps=2, clean_tokens=0, eval_every=1), progress=False)
    return target, cal


def test_fused_generation_speed(calibrator: tuple[Path, Path], compare: Callable[..., float]) -> None:
    target, cal = calibrator
    prompts = load_prompts("rtp-challenging").subset(N_PROMPTS, seed=0).prompts
    settings = EvalSettings(max_tokens=20, batch=16)
    kwargs = {"n_ctx": settings.batch * 128, "n_seq": settings.batch, "n_batch": 512}
    plain = LlamaRuntime(target, **kwargs)
    fused = FusedRuntime(target, cal, 0.4, **kwargs)
    counts: dict[str, int] = {}

    def alone() -> None:
        counts["alone"] = generate(plain, prompts, settings, progress=False)[1]

    def with_calibrator() -> None:
        counts["fused"] = generate(fused, prompts, settings, progress=False)[1]

    time_ratio = compare("the target alone (LlamaRuntime)", with_calibrator, alone, rounds=3)
    speed = time_ratio * counts["fused"] / counts["alone"]
    print(f"tokens: alone {counts['alone']}, fused {counts['fused']}; fused tokens/s = {speed:.1%} of the target alone")
    assert counts["fused"] > 0
