"""`pydetox apply --type Q4_K_M` of a random rank-8 plan on every ffn_down and attn_output of SmolLM2-135M-Instruct
against llama.cpp's own `llama_model_quantize` producing Q4_K_M from the same F16 input, both on all cores, in the
same run; and peak memory of apply against the model size, each measured in a fresh process.
Run: pytest bench/bench_apply.py -s"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import pytest

from pydetox.apply import ApplyOptions, apply_plan
from pydetox.assets import fetch
from pydetox.gguf_io import ModelFile
from pydetox.kernels import default_threads
from pydetox.plan import EditKind, random_plan

Q4_K_M = gguf.LlamaFileType.MOSTLY_Q4_K_M


@pytest.fixture(scope="module")
def f16_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 at F16: the full-precision input both quantizers start from."""
    out = tmp_path_factory.mktemp("bench") / "smollm2-f16.gguf"
    apply_plan(None, fetch("smollm2-135m-instruct", quiet=True), out, ApplyOptions(ftype=gguf.LlamaFileType.MOSTLY_F16, progress=False))
    return out


@pytest.fixture(scope="module")
def plan_file(f16_model: Path) -> Path:
    with ModelFile(f16_model) as m:
        shapes = [(n, t.shape) for n, t in m.tensors.items() if n.endswith(("ffn_down.weight", "attn_output.weight"))]
        plan = random_plan(m.arch, shapes, EditKind.PROJECT_OUT, rank=8, seed=0)
    return plan.save(f16_model.parent / "rank8.plan.gguf")


def llama_quantize(src: Path, dst: Path, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(Q4_K_M)
    params.nthread = threads
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


def test_apply_q4_k_m_vs_llama_quantize(f16_model: Path, plan_file: Path, compare: Callable[..., float]) -> None:
    from pydetox.plan import EditPlan

    threads = default_threads()
    plan = EditPlan.load(plan_file)
    out, ref = f16_model.parent / "ours.gguf", f16_model.parent / "llama.gguf"
    opts = ApplyOptions(ftype=Q4_K_M, threads=threads, overwrite=True, progress=False)
    compare(
        f"llama_model_quantize Q4_K_M, {threads} threads",
        lambda: apply_plan(plan, f16_model, out, opts, plan_path=plan_file),
        lambda: llama_quantize(f16_model, ref, threads),
        rounds=3,
    )
    with ModelFile(out) as a, ModelFile(ref) as b:
        assert {n: t.qtype for n, t in a.tensors.items()} == {n: t.qtype for n, t in b.tensors.items()}
        edited = set(plan.tensors)
        for name, t in a.tensors.items():
            if name not in edited:  # same quantizer, same input: same bytes
                assert a.read(t).tobytes() == b.read(b.tensors[name]).tobytes(), name


@pytest.mark.parametrize("asset", ["smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"])
def test_default_edit_per_model(asset: str, tmp_path: Path, compare: Callable[..., float]) -> None:
    """What `pydetox detox` applies at Q4_K_M on each bundled model: a rank-32 update of the upper two thirds of
    the ffn_down tensors (random here, the default recipe's shape), edited tensors floored at Q8_0, from the F16
    model; against llama.cpp producing Q4_K_M from the same F16 file."""
    src = tmp_path / "f16.gguf"
    apply_plan(None, fetch(asset, quiet=True), src, ApplyOptions(ftype=gguf.LlamaFileType.MOSTLY_F16, progress=False))
    with ModelFile(src) as m:
        downs = [(n, t.shape) for n, t in m.tensors.items() if n.endswith("ffn_down.weight")]
        plan = random_plan(m.arch, downs[len(downs) // 3:], EditKind.LOW_RANK, rank=32, seed=0)
    threads = default_threads()
    opts = ApplyOptions(ftype=Q4_K_M, threads=threads, overwrite=True, progress=False,
                        edited_floor=gguf.GGMLQuantizationType.Q8_0)
    compare(f"{asset}: llama_model_quantize Q4_K_M, {threads} threads",
            lambda: apply_plan(plan, src, tmp_path / "ours.gguf", opts),
            lambda: llama_quantize(src, tmp_path / "llama.gguf", threads), rounds=2)
    assert (tmp_path / "ours.gguf").stat().st_size > (tmp_path / "llama.gguf").stat().st_size  # the Q8_0 floor


def _child_peak_rss(code: str) -> int:
    """Peak RSS of a fresh interpreter running `code`, as that process reports it at exit."""
    # VmHWM, not getrusage: Linux carries ru_maxrss over fork + exec, so a child started from a big pytest process
    # would report the parent's peak.
    tail = "; print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    proc = subprocess.run([sys.executable, "-c", code + tail], check=True, capture_output=True, text=True, cwd="/")
    return int(proc.stdout.strip().splitlines()[-1]) * 1024


def test_peak_memory(f16_model: Path, plan_file: Path) -> None:
    out = f16_model.parent / "mem.gguf"
    baseline = _child_peak_rss("import pydetox.apply, llama_cpp")  # interpreter + numpy + libraries
    peak = _child_peak_rss(
        "from pydetox.apply import ApplyOptions, apply_plan; from pydetox.plan import EditPlan; import gguf; "
        f"apply_plan(EditPlan.load({str(plan_file)!r}), {str(f16_model)!r}, {str(out)!r}, "
        "ApplyOptions(ftype=gguf.LlamaFileType.MOSTLY_Q4_K_M, overwrite=True, progress=False))"
    )
    with ModelFile(f16_model) as m:
        largest = max(t.rows * t.cols * 4 for t in m.tensors.values())
    model_bytes = f16_model.stat().st_size
    result = {"model_bytes": model_bytes, "peak_rss_bytes": peak, "import_rss_bytes": baseline,
              "apply_extra_bytes": peak - baseline, "largest_tensor_f32_bytes": largest}
    print("\n" + json.dumps(result, indent=2))
    # bounded by a few float32 copies of the largest tensor, not by the model
    assert peak - baseline < 6 * largest + (64 << 20)
