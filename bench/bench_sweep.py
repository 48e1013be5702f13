"""`pydetox sweep` on Ray against the same trials run one after another in this process: 4 settings x 2 seeds of
ProFS on a small random llama model (discovery on 300 pairs, apply, evaluation on 256 prompts x 16 tokens each),
two 1-CPU tasks at a time on Ray; and Ray's own cost per task (a task that does nothing, submitted and collected).
Both sides start from an empty output folder and pay their imports and model loads; Ray's side also pays starting
its local instance.
Run: pytest bench/bench_sweep.py -s"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("optuna")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny import write_tiny_llama

from pydetox.sweep import Param, SweepConfig, baseline, run_sweep, run_trial


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> SweepConfig:
    folder = tmp_path_factory.mktemp("sweep")
    model = write_tiny_llama(folder / "m.gguf", d=256, ff=1024, layers=8, heads=4, kv_heads=2)
    words = ["the cat", "a dog", "in the", "of a", "the", "was the", "and a", "to the", "is a", "cat was",
             "dog and", "a", "the dog", "of the", "in a", "to a"]
    (folder / "p.txt").write_text("\n".join(f"{a} {b}" for a in words for b in words) + "\n")
    base = SweepConfig(str(model), "profs", folder / "ray", (Param("k", 1, 3, integer=True), Param("strength", 0.3, 1.0)),
                       seeds=(0, 1), trials=4, pairs=300, final_eval=None)
    return replace(base, trial_eval=replace(base.trial_eval, prompts=str(folder / "p.txt"), n_prompts=256, max_tokens=16,
                                            evaluators=("profanity-check",), ppl_tokens=256))


def test_ray_sweep_against_the_same_trials_one_after_another(config: SweepConfig) -> None:
    import ray

    t0 = time.perf_counter()
    report = run_sweep(config, progress=False)
    ray_s = time.perf_counter() - t0
    settings = [(row["params"], int(seed)) for row in report["settings"] for seed in row["per_seed"]]
    assert len(settings) == 8

    # the same settings and seeds, one after another in this process (which pays its imports once, where each Ray
    # worker pays its own)
    serial = replace(config, out=config.out.parent / "serial")
    t0 = time.perf_counter()
    base = baseline(serial, Path(config.model), serial.trial_eval, "trial_eval")
    for params, seed in settings:
        run_trial(serial, params, seed, base)
    serial_s = time.perf_counter() - t0

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        noop = ray.remote(num_cpus=1)(lambda: None)
        ray.get([noop.remote() for _ in range(4)])  # workers started
        t0 = time.perf_counter()
        ray.get([noop.remote() for _ in range(200)])
        per_task_ms = (time.perf_counter() - t0) / 200 * 1e3
    finally:
        ray.shutdown()
    result = {"tasks": len(settings), "ray_wall_s": round(ray_s, 1), "serial_wall_s": round(serial_s, 1),
              "speed_up": round(serial_s / ray_s, 2), "ray_overhead_per_task_ms": round(per_task_ms, 2),
              "trial_task_s_sum": report["task_seconds_sum"]}
    print("\n" + json.dumps(result, indent=1))
    shutil.rmtree(config.out.parent / "serial", ignore_errors=True)
    assert serial_s / ray_s >= 1.0, result  # on 2 cores, two 1-CPU trials at a time must not be slower
