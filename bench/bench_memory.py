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


def _f16(name: str, folder: Path) -> Path:
    """The bundled model `name` (fetched on first use) at F16, made with `pydetox apply`."""
    import gguf

    from pydetox.apply import ApplyOptions, apply_plan
    from pydetox.assets import resolve_model

    out = folder / f"{name}.F16.gguf"
    apply_plan(None, resolve_model(name), out, ApplyOptions(ftype=gguf.LlamaFileType.MOSTLY_F16, progress=False))
    return out


def _run(path: Path, weights: str, loss: str = "closed form") -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), weights, loss], capture_output=True, text=True,
                         cwd=path.parent, check=False)
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
