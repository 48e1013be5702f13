"""The engine at 7B scale: a synthetic llama-architecture GGUF with Llama-2-7B's shapes (32 layers, d 4096, FFN 11008,
vocab 32000; F16, random weights, ~13.5 GB) gets a rank-32 low-rank edit on every ffn_down with `--type Q4_K_M`,
against llama.cpp's `llama_model_quantize` making Q4_K_M from the same file in the same run. Each runs in a fresh
process that reports its own wall time (the call, not the imports) and peak RSS (VmHWM), so neither inherits the
other's memory. The files are removed afterwards.

Needs ~22 GB of free disk and ~15-25 minutes on 2 cores, so it runs only when asked:
    PYDETOX_BENCH_7B=1 pytest bench/bench_scale.py -s
Set PYDETOX_BENCH_DIR to put the files somewhere else than the system's temporary folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest

from pydetox.plan import EditKind, random_plan

T = gguf.MODEL_TENSOR
LLAMA2_7B = {"layers": 32, "d": 4096, "ff": 11008, "heads": 32, "vocab": 32000}
RANK = 32

pytestmark = pytest.mark.skipif(os.environ.get("PYDETOX_BENCH_7B") != "1",
                                reason="7B-shaped engine bench: ~22 GB of disk, ~20 min; set PYDETOX_BENCH_7B=1")


def _name(kind: gguf.MODEL_TENSOR, bid: int | None = None) -> str:
    name = gguf.TENSOR_NAMES[kind]
    return (name.format(bid=bid) if bid is not None else name) + ".weight"


def shapes(layers: int, d: int, ff: int, vocab: int, **_: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of every tensor, in file order; 1-D tensors are the norms."""
    out: list[tuple[str, tuple[int, ...]]] = [(_name(T.TOKEN_EMBD), (vocab, d))]
    for b in range(layers):
        out += [(_name(T.ATTN_NORM, b), (d,)), (_name(T.ATTN_Q, b), (d, d)), (_name(T.ATTN_K, b), (d, d)),
                (_name(T.ATTN_V, b), (d, d)), (_name(T.ATTN_OUT, b), (d, d)), (_name(T.FFN_NORM, b), (d,)),
                (_name(T.FFN_GATE, b), (ff, d)), (_name(T.FFN_UP, b), (ff, d)), (_name(T.FFN_DOWN, b), (d, ff))]
    return [*out, (_name(T.OUTPUT_NORM), (d,)), (_name(T.OUTPUT), (vocab, d))]


def write_synthetic(path: Path, spec: dict[str, int]) -> Path:
    """An F16 llama GGUF of `spec`'s shapes, streamed tensor by tensor: each matrix is a window of one 512 MB pool of
    N(0, 0.02) halves at a random offset (generating 6.7e9 fresh normals would take longer than the bench)."""
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 28, dtype=np.float32) * 0.02).astype(np.float16)
    d, vocab = spec["d"], spec["vocab"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"▁w{i}" for i in range(vocab - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (vocab - len(types))
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("synthetic-llama-2-7b-shapes")
    w.add_context_length(4096)
    w.add_embedding_length(d)
    w.add_block_count(spec["layers"])
    w.add_feed_forward_length(spec["ff"])
    w.add_head_count(spec["heads"])
    w.add_head_count_kv(spec["heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d // spec["heads"])
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([int(t) for t in types])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    layout = shapes(**spec)
    for name, shape in layout:
        dtype = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, shape in layout:
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, np.float32))
        else:
            n = int(np.prod(shape))
            at = int(rng.integers(0, len(pool) - n))
            w.write_tensor_data(pool[at : at + n].reshape(shape))
    w.close()
    return path


def _child(code: str) -> dict[str, float]:
    """Run `code` (which sets `seconds`) in a fresh interpreter; its wall time and peak RSS as it reports them."""
    tail = ("\nimport json; print(json.dumps({'seconds': seconds, 'peak_rss_bytes': "
            "int([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]) * 1024}))")
    proc = subprocess.run([sys.executable, "-c", code + tail], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    root = Path(os.environ.get("PYDETOX_BENCH_DIR", tempfile.gettempdir()))
    need = 22 << 30
    free = shutil.disk_usage(root).free
    if free < need:
        pytest.skip(f"needs {need >> 30} GB free in {root}, found {free / 2**30:.1f} GB")
    out = Path(tempfile.mkdtemp(prefix="pydetox-bench-7b-", dir=root))
    try:
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_apply_at_7b_scale(folder: Path) -> None:
    t0 = time.perf_counter()
    src = write_synthetic(folder / "llama2-7b-shapes.F16.gguf", LLAMA2_7B)
    written = time.perf_counter() - t0
    downs = [(n, s) for n, s in shapes(**LLAMA2_7B) if n.endswith("ffn_down.weight")]
    plan = random_plan("llama", [(n, (s[0], s[1])) for n, s in downs], EditKind.LOW_RANK, rank=RANK, seed=0)
    plan_path = plan.save(folder / "rank32.plan.gguf")
    theirs = _child(
        "import ctypes, time, llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = {int(gguf.LlamaFileType.MOSTLY_Q4_K_M)}\n"
        "from pydetox.kernels import default_threads\n"
        "p.nthread = default_threads()\n"
        "t0 = time.perf_counter()\n"
        f"assert llama_cpp.llama_model_quantize({str(src)!r}.encode(), {str(folder / 'llama.gguf')!r}.encode(), "
        "ctypes.byref(p)) == 0\n"
        "seconds = time.perf_counter() - t0\n"
    )
    (folder / "llama.gguf").unlink()
    ours = _child(
        "import time, gguf\n"
        "from pydetox.apply import ApplyOptions, apply_plan\n"
        "from pydetox.plan import EditPlan\n"
        f"plan = EditPlan.load({str(plan_path)!r})\n"
        "t0 = time.perf_counter()\n"
        f"apply_plan(plan, {str(src)!r}, {str(folder / 'ours.gguf')!r}, "
        "ApplyOptions(ftype=gguf.LlamaFileType.MOSTLY_Q4_K_M, progress=False))\n"
        "seconds = time.perf_counter() - t0\n"
    )
    result = {"model": "synthetic llama, Llama-2-7B shapes, F16", "f16_bytes": src.stat().st_size,
              "write_s": round(written, 1), "plan": f"rank-{RANK} low_rank on all {len(downs)} ffn_down",
              "pydetox_apply": ours, "llama_model_quantize": theirs,
              "time_ratio": round(ours["seconds"] / theirs["seconds"], 3),
              "out_bytes": (folder / "ours.gguf").stat().st_size}
    print("\n" + json.dumps(result, indent=2))
    assert result["time_ratio"] <= 1.15, result
    assert ours["peak_rss_bytes"] <= 1.5 * 2**30, result
