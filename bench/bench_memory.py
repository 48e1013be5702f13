"""Discovery's memory: peak RSS of the full-precision model as discovery uses it, float32 weights against the
source's own precision ("auto": float16 for an F16 GGUF, pydetox.discover.model.store_half), on the real models.

Each (model, weights) runs in a fresh process that loads the model from its converted cache and does what discovery
does with it: an activation pass (16 texts x 64 tokens through the decoder, as pydetox.discover.activations.collect)
and one student step (8 x 64 tokens, distill's own KL to top-32 targets over the whole vocabulary, backward into a
rank-8 adapter on one down-projection). The step runs with distill's loss (its gradient in closed form, a block of
positions at a time) and, for the source's precision, once more with autograd through the whole batch's log-softmax
(`autograd`: the vocabulary-wide arrays of every position kept for the backward pass). It reports VmHWM, the peak
RSS of the process (the interpreter with torch and transformers imported included), as a multiple of the F16 file's
size.

    pytest bench/bench_memory.py -s          # the three bundled models; ~8 min once they are fetched
    pytest bench/bench_memory.py -k student -s   # the default student's steps at the recipe's batch shapes
    pytest bench/bench_memory.py -k first_load -s   # a GGUF's first load against transformers' GGUF loader
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = r"""
import json, sys, time, types
import numpy as np
import torch
from pydetox.discover.distill import student
from pydetox.discover.distill.teacher import _Targets
from pydetox.discover.model import FullPrecisionModel

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

path, weights, loss = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
base = hwm()
t0 = time.perf_counter()
fp = FullPrecisionModel(path, progress=False, weights=weights)
load_s = time.perf_counter() - t0
after_load = hwm()
vocab = fp.model.get_output_embeddings().weight.shape[0]
ids = torch.randint(100, min(vocab, 30000), (16, 64))
with torch.no_grad():
    fp.model.base_model(input_ids=ids, output_hidden_states=True)
after_pass = hwm()
fp.model.requires_grad_(False)
ctx = types.SimpleNamespace(fp=fp)
lora = student._LoRA(ctx, [fp.n_layers // 2], 8, seed=0)
seqs = ids[:8].tolist()
k, n = 32, 63
targets = _Targets(seqs, [np.tile(np.arange(k), (n, 1)) for _ in seqs], [np.full((n, k), np.log(0.5 / k), np.float32)
                   for _ in seqs], [np.full(n, np.log(0.5), np.float32) for _ in seqs], np.arange(len(seqs)))
t0 = time.perf_counter()
if loss == "autograd":
    flat = [torch.from_numpy(np.concatenate(a)) for a in (targets.ids, targets.logp, targets.rest)]
    student._kl(student._forward(ctx, seqs), *flat).mean().backward()
else:
    student._batch_kl(ctx, targets, list(range(len(seqs)))).mean().backward()
step_s = time.perf_counter() - t0
lora.close()
print(json.dumps({"weights": fp.weights, "loss": loss, "step_s": step_s, "load_s": load_s, "import_rss": base, "after_load": after_load,
                  "after_pass": after_pass, "peak": hwm(), "params": sum(p.numel() for p in fp.model.parameters())}))
"""

# The default student's steps at the recipe's batch shapes, with synthetic targets (no teacher needed): 8 toxic
# sequences of 84 tokens (a 64-token prompt and 20 continued) and 8 clean of 64 per step, rank 32 on ffn_down of
# the upper two thirds of the layers, bfloat16 autocast, `_Student.train` itself (per-step heap trim included).
STUDENT = r"""
import json, sys, time, types
import numpy as np
from pydetox.apply import peak_rss_bytes as peak_rss
from pydetox.discover.distill.params import DistillParams
from pydetox.discover.distill.student import _Student
from pydetox.discover.distill.teacher import _Targets
from pydetox.discover.model import FullPrecisionModel, autocast

path, steps, recompute = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fp = FullPrecisionModel(path, progress=False)
after_load = peak_rss()
fp.model.requires_grad_(False)
p = DistillParams(calibrator="-", steps=steps, rank=32, lr=0.003, clean_weight=4, precision="bfloat16",
                  recompute=recompute)
vocab, rng = fp.output_shape[0], np.random.default_rng(0)

def targets(n, length, k=32):
    seqs = [rng.integers(100, min(vocab, 30000), length).tolist() for _ in range(n)]
    return _Targets(seqs, [rng.integers(0, vocab, (length - 1, k)) for _ in seqs],
                    [np.full((length - 1, k), np.log(0.9 / k), np.float32) for _ in seqs],
                    [np.full(length - 1, np.log(0.1), np.float32) for _ in seqs], np.arange(n))

toxic, clean = targets(64, 84), targets(64, 64)
n = fp.n_layers
t0 = time.perf_counter()
with fp.computing_in("bfloat16"):
    student = _Student(types.SimpleNamespace(fp=fp, progress=False), p, autocast("bfloat16", "distill", fp.device),
                       toxic, clean.seqs, clean, list(range(n // 3, n)), np.arange(64))
    student.train([(rng.choice(64, 8, replace=False).tolist(), rng.choice(64, 8, replace=False).tolist())
                   for _ in range(steps)])
    student.close()
print(json.dumps({"after_load": after_load, "peak": peak_rss(), "step_s": (time.perf_counter() - t0) / steps}))
"""


# A GGUF's first load, from an empty converted-model cache: pydetox's (the folder written one tensor at a time,
# then loaded in the source's precision) or transformers' own GGUF loader, the baseline (float32, as it dequantizes).
FIRST_LOAD = r"""
import json, os, sys, tempfile, time
from pathlib import Path
from pydetox.apply import peak_rss_bytes as peak_rss
path, how = Path(sys.argv[1]), sys.argv[2]
os.environ["PYDETOX_CACHE"] = tempfile.mkdtemp(dir=path.parent)
import torch
from transformers import AutoModelForCausalLM
from pydetox.discover.model import FullPrecisionModel
base = peak_rss()
t0 = time.perf_counter()
if how == "pydetox":
    FullPrecisionModel(path, progress=False)
else:
    AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
print(json.dumps({"import_rss": base, "peak": peak_rss(), "load_s": time.perf_counter() - t0}))
"""


def _f16(name: str, folder: Path) -> Path:
    """The bundled model `name` (fetched on first use) at F16, made with `pydetox apply`."""
    import gguf

    from pydetox.apply import ApplyOptions, apply_plan
    from pydetox.assets import resolve_model

    out = folder / f"{name}.F16.gguf"
    apply_plan(None, resolve_model(name), out, ApplyOptions(ftype=gguf.LlamaFileType.MOSTLY_F16, progress=False))
    return out


def _python(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`code` run by a fresh interpreter that imports this checkout's pydetox (not an installed one)."""
    import os

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          check=False)


def _run(path: Path, weights: str, loss: str = "closed form") -> dict[str, float]:
    out = _python(CHILD, str(path), weights, loss, cwd=path.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"])
def test_discovery_memory(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    from pydetox.assets import ASSETS

    if name not in ASSETS:
        pytest.skip(f"no asset {name}")
    folder = tmp_path_factory.mktemp("mem")
    path = _f16(name, folder)
    size = path.stat().st_size
    _run(path, "float32")  # the first load converts the GGUF for transformers and fills the cache: not measured
    rows = {"float32": _run(path, "float32"), "auto": _run(path, "auto"), "auto, autograd": _run(path, "auto", "autograd")}
    gb = 1e9
    print(f"\n{name}: {rows['auto']['params'] / 1e6:.1f}M parameters, F16 {size / gb:.2f} GB")
    for w, r in rows.items():
        print(f"  weights {w:14} ({r['weights']:8}): load {r['load_s']:5.1f} s, RSS after imports {r['import_rss'] / gb:.2f} GB, "
              f"after load {r['after_load'] / gb:.2f}, after the activation pass {r['after_pass'] / gb:.2f}, "
              f"peak (student step, loss {r['loss']}, {r['step_s']:.1f} s) {r['peak'] / gb:.2f} GB = {r['peak'] / size:.1f}x F16")
    print(f"  peak, auto / float32: {rows['auto']['peak'] / rows['float32']['peak']:.2f}; "
          f"closed form / autograd: {rows['auto']['peak'] / rows['auto, autograd']['peak']:.2f}")
    assert rows["auto"]["weights"] == "float16"
    assert rows["auto"]["peak"] < rows["float32"]["peak"]
    assert rows["auto"]["peak"] < rows["auto, autograd"]["peak"]


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"])
def test_student_memory_at_the_recipe_shapes(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Peak RSS of 4 default student steps (STUDENT) in a fresh process, as a multiple of the F16 file, with the
    edited layers' activations kept for the backward pass (the default) and recomputed there (`recompute=1`)."""
    from pydetox.assets import ASSETS

    if name not in ASSETS:
        pytest.skip(f"no asset {name}")
    path = _f16(name, tmp_path_factory.mktemp("student"))
    _run(path, "float32")  # the first load converts the GGUF for transformers and fills the cache: not measured
    size, rows = path.stat().st_size, {}
    for recompute in ("0", "1"):
        out = _python(STUDENT, str(path), "4", recompute, cwd=path.parent)
        assert out.returncode == 0, out.stderr[-3000:]
        rows[recompute] = r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"\n{name}: F16 {size / 1e9:.2f} GB; after load {r['after_load'] / 1e9:.2f} GB; 4 student steps, "
              f"recompute={recompute} ({r['step_s']:.1f} s each): peak {r['peak'] / 1e9:.2f} GB = {r['peak'] / size:.1f}x F16")
    print(f"  recompute=1 / 0: peak {rows['1']['peak'] / rows['0']['peak']:.2f}, step time "
          f"{rows['1']['step_s'] / rows['0']['step_s']:.2f}")
    assert all(r["peak"] > r["after_load"] for r in rows.values())
    assert rows["1"]["peak"] < rows["0"]["peak"]


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"])
def test_first_load_memory(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Peak RSS of a GGUF's first load for discovery (FIRST_LOAD, fresh process, empty cache) against transformers'
    own GGUF loader in the same run, as multiples of the F16 file."""
    from pydetox.assets import ASSETS

    if name not in ASSETS:
        pytest.skip(f"no asset {name}")
    path = _f16(name, tmp_path_factory.mktemp("first"))
    size, rows = path.stat().st_size, {}
    for how in ("pydetox", "transformers"):
        out = _python(FIRST_LOAD, str(path), how, cwd=path.parent)
        assert out.returncode == 0, out.stderr[-3000:]
        rows[how] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n{name}: F16 {size / 1e9:.2f} GB")
    for how, r in rows.items():
        print(f"  first load by {how:12}: {r['load_s']:5.1f} s, peak {r['peak'] / 1e9:.2f} GB = {r['peak'] / size:.1f}x F16 "
              f"(imports {r['import_rss'] / 1e9:.2f} GB)")
    print(f"  peak, pydetox / transformers: {rows['pydetox']['peak'] / rows['transformers']['peak']:.2f}; "
          f"time {rows['pydetox']['load_s'] / rows['transformers']['load_s']:.2f}")
    assert rows["pydetox"]["peak"] < rows["transformers"]["peak"]
