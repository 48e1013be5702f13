"""Discovery's memory: peak RSS of the full-precision model as discovery uses it, float32 weights against the
source's own precision ("auto": float16 for an F16 GGUF, pydetox.discover.model.store_half), on the real models.

Each (model, weights) runs in a fresh process that loads the model from its converted cache and does what discovery
does with it: an activation pass (16 texts x 64 tokens through the decoder, as pydetox.discover.activations.collect)
and one student step (8 x 64 tokens, log-softmax over the whole vocabulary, backward into a rank-8 adapter on one
down-projection, as distill). It reports VmHWM, the peak RSS of the process (the interpreter with torch and
transformers imported included), as a multiple of the F16 file's size.

    pytest bench/bench_memory.py -s          # the three bundled models; ~5 min once they are fetched
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = r"""
import json, sys, time
import torch
from pydetox.discover.model import FullPrecisionModel

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

path, weights = sys.argv[1], sys.argv[2]
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
lin = fp.down_proj(fp.n_layers // 2)
a = torch.nn.Parameter(torch.randn(8, lin.in_features) * 0.01)
b = torch.nn.Parameter(torch.zeros(lin.out_features, 8))
hook = lin.register_forward_hook(lambda m, args, out: out + (args[0] @ a.T) @ b.T)
fp.model.requires_grad_(False)
hidden = fp.model.base_model(input_ids=ids[:8]).last_hidden_state
logp = torch.log_softmax(fp.model.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])).float(), -1)
logp[:, 0].mean().backward()
hook.remove()
print(json.dumps({"weights": fp.weights, "load_s": load_s, "import_rss": base, "after_load": after_load,
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


def _run(path: Path, weights: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), weights], capture_output=True, text=True,
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
    rows = {w: _run(path, w) for w in ("float32", "auto")}
    gb = 1e9
    print(f"\n{name}: {rows['auto']['params'] / 1e6:.1f}M parameters, F16 {size / gb:.2f} GB")
    for w, r in rows.items():
        print(f"  weights {w:8} ({r['weights']:8}): load {r['load_s']:5.1f} s, RSS after imports {r['import_rss'] / gb:.2f} GB, "
              f"after load {r['after_load'] / gb:.2f}, after the activation pass {r['after_pass'] / gb:.2f}, "
              f"peak (student step) {r['peak'] / gb:.2f} GB = {r['peak'] / size:.1f}x F16")
    print(f"  peak, auto / float32: {rows['auto']['peak'] / rows['float32']['peak']:.2f}")
    assert rows["auto"]["weights"] == "float16"
    assert rows["auto"]["peak"] < rows["float32"]["peak"]
