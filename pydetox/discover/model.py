"""The full-precision model that discovery works on, and where each of its matrices lives in a GGUF.

Sources: a local Hugging Face folder or a hub id (transformers), or a GGUF file (the bundled models ship only as
GGUF), read through a Hugging Face folder written from it one tensor at a time (`gguf_folder`) and cached. One
registry maps each architecture's torch modules to GGUF tensor names (llama.cpp `convert_hf_to_gguf.py` names). Only
matrices whose edited side is not permuted by the converter are named here: llama.cpp permutes the rows of
q_proj/k_proj, but ffn_down and the output layer line up with the HF weights directly (SmolLM2: the dequantized
blk.L.ffn_down.weight, (576, 1536), equals torch's down_proj weight exactly).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from pydetox import heap
from pydetox.discover.gguf_folder import matrix_modules as _matrix_modules
from pydetox.errors import PydetoxError

# oneDNN (torch's CPU kernels for bfloat16 matmuls) keeps up to 1,024 primitives for the shapes it has seen, with their
# scratch memory; a training step's batch pads to its own length, so the cache grows step after step. Read when oneDNN
# first builds a primitive, which no process does before loading a model here. Qwen2.5's student, 30 steps: the
# resident memory at a step's start rose 1.95 -> 2.66 GB with 1,024, 1.98 -> 2.37 GB with 128, at the same speed
# (6.6-6.9 s a step; with no cache at all 12.1 s); the user's own setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")

T = gguf.MODEL_TENSOR


def _name(kind: gguf.MODEL_TENSOR, bid: int | None = None) -> str:
    base = gguf.TENSOR_NAMES[kind]
    return (base.format(bid=bid) if bid is not None else base) + ".weight"


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture keeps the matrices pydetox edits."""

    gguf_arch: str
    layers: Callable[[Any], Any]  # model -> list of decoder layers
    down_proj: Callable[[Any], Any]  # layer -> the FFN down-projection Linear (d_model x d_ff)
    final_norm: Callable[[Any], Any]  # model -> the norm before the output layer


ARCHS: dict[str, ArchSpec] = {}


def register_arch(hf_model_type: str, spec: ArchSpec) -> None:
    ARCHS[hf_model_type] = spec


for _hf, _gguf in (("llama", "llama"), ("qwen2", "qwen2"), ("gemma3_text", "gemma3"), ("gemma3", "gemma3")):
    register_arch(_hf, ArchSpec(
        gguf_arch=_gguf,
        layers=lambda m: m.model.layers,
        down_proj=lambda layer: layer.mlp.down_proj,
        final_norm=lambda m: m.model.norm,
    ))


_DONE = "pydetox-converted"


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    """The torch device discovery and calibrator training run on: "cpu", "cuda", or "auto" (CUDA when torch sees a
    GPU, else the CPU). "cuda" without a GPU torch can use is refused rather than silently run on the CPU."""
    import torch

    if device not in DEVICES:
        raise PydetoxError(f"device is one of {', '.join(DEVICES)}; got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        built = "with" if torch.backends.cuda.is_built() else "without"
        raise PydetoxError(f"device cuda: torch {torch.__version__} (built {built} CUDA) sees no usable GPU; "
                           "use --device cpu or auto")
    return device


def autocast(precision: str, owner: str, device: str = "cpu") -> Any:
    """torch's autocast on `device` for `precision` "bfloat16" (a no-op context for "float32"); any other value is
    refused, naming `owner`'s setting. The context can be entered any number of times."""
    import torch

    if precision not in ("float32", "bfloat16"):
        raise PydetoxError(f"{owner}: precision is 'float32' or 'bfloat16', got {precision!r}")
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bfloat16")


def _converted_folder(gguf_path: Path) -> Path:
    """Where the Hugging Face form of a GGUF is kept once converted: transformers' GGUF loader spends ~20 s on
    SmolLM2 parsing metadata and the tokenizer (three GGUF reads), a saved folder loads in ~2 s. Keyed by the
    file's path, size and modification time, so an edited or replaced file is converted afresh. The folder keeps
    the matrices in the source's precision (`source_precision`): an F16 GGUF's folder is half the size of float32,
    and a half-precision load maps it without a float32 copy."""
    import hashlib

    from pydetox.paths import cache_dir

    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|v4".encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{gguf_path.stem}-{key}"


def _prune_converted(keep: Path, source: Path) -> list[Path]:
    """Bound the converted-model cache, which otherwise grows by a model's size with every new GGUF that discovery
    reads (each training seed's, each test's temporary file). Removed, besides `keep` (the folder just written for
    `source`): folders converted from a file that no longer exists or from an earlier version of `source` (its
    key changed: they can never be read again), folders without a readable marker (an older cache layout), and then
    the least recently used ones while the cache holds more than $PYDETOX_CONVERTED_CACHE_GB (default 20). A folder
    used in the last 10 minutes is never removed, so a concurrent run's model stays put. Returns what was removed."""
    import os
    import shutil
    import time

    def size(folder: Path) -> int:
        return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())

    budget = float(os.environ.get("PYDETOX_CONVERTED_CACHE_GB", "20")) * 1e9
    now, own, removed = time.time(), source.resolve(), []
    entries = []  # (last use, bytes, folder) of the folders that stay after the first pass
    for folder in keep.parent.iterdir():
        if folder == keep or not folder.is_dir() or folder.name.endswith(".tmp"):
            continue
        marker = folder / _DONE
        used = marker.stat().st_mtime if marker.is_file() else None
        if used is not None and now - used < 600:
            continue
        origin = marker.read_text().partition("source: ")[2].strip() if used is not None else ""
        if not origin or not Path(origin).is_file() or Path(origin) == own:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
            continue
        entries.append((used, size(folder), folder))
    total = size(keep) + sum(e[1] for e in entries)
    for _, size, folder in sorted(entries):
        if total <= budget:
            break
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        total -= size
    return removed


def _convert(source: Path, precision: str, progress: bool) -> Path:
    """The converted folder of the GGUF `source` (`_converted_folder`), written now unless it exists: by
    `gguf_folder.write_folder` (one tensor at a time, matrices in `precision`) into a temporary folder beside it,
    renamed when complete, so an interrupted conversion leaves nothing a later load would read."""
    import shutil
    import tempfile

    from pydetox.discover.gguf_folder import write_folder

    folder = _converted_folder(source)
    if (folder / _DONE).is_file():
        (folder / _DONE).touch()  # its last use, for the cache's eviction order
        return folder
    tmp: Path | None = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".tmp", dir=folder.parent))
        write_folder(source, tmp, precision, progress=progress)
        (tmp / _DONE).write_text(f"converted by pydetox from a GGUF; safe to delete\nsource: {source.resolve()}\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except OSError as exc:
        raise PydetoxError(f"cannot write the Hugging Face form of {source} under {folder.parent} ({exc}); discovery "
                           "reads the model from there: free space or point $PYDETOX_CACHE at a writable folder") from exc
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _prune_converted(folder, source)
    return folder


WEIGHTS = ("auto", "float32", "float16", "bfloat16")


# Output rows upcast at a time from a half-stored layer (the HalfLinear here, distill's streamed loss): bounds the
# float32 copy of a 262,144-token output layer (Gemma-3: 671 MB whole) to ~16k rows.
OUTPUT_ROWS = 16384


def source_precision(source: str | Path) -> str:
    """The precision the source's weight matrices are stored in: "float16"/"bfloat16" when every 2-D weight of a
    GGUF is F16/BF16 (the recipe's `f16` stage), or a Hugging Face folder's `torch_dtype` says so; else "float32"
    (quantized GGUFs dequantize to values a half type may not hold exactly)."""
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        from pydetox.gguf_io import ModelFile

        with ModelFile(path) as m:
            kinds = {t.qtype.name for t in m.tensors.values() if len(t.ne) == 2}
        return {"F16": "float16", "BF16": "bfloat16"}.get(kinds.pop(), "float32") if len(kinds) == 1 else "float32"
    config = path / "config.json"
    if config.is_file():
        import json

        dtype = str(json.loads(config.read_text()).get("torch_dtype", "float32"))
        return dtype if dtype in ("float16", "bfloat16") else "float32"
    return "float32"


def _half_linear() -> Any:
    """A Linear product whose frozen weight stays in its half type: float32 compute from an upcast made per block of
    output rows, and a backward that upcasts again instead of keeping the float32 copy for the whole graph."""
    import torch

    class HalfLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, bias: Any) -> Any:
            ctx.save_for_backward(weight)
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            xc = x.to(dtype)
            parts = [xc @ weight[i : i + OUTPUT_ROWS].to(dtype).T for i in range(0, weight.shape[0], OUTPUT_ROWS)]
            out = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
            return out if bias is None else out + bias.to(dtype)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            (weight,) = ctx.saved_tensors
            gx = None
            for i in range(0, weight.shape[0], OUTPUT_ROWS):
                part = grad[..., i : i + OUTPUT_ROWS] @ weight[i : i + OUTPUT_ROWS].to(grad.dtype)
                gx = part if gx is None else gx + part
            return gx, None, None

    return HalfLinear


def store_half(model: Any, dtype: str) -> None:
    """Keep every Linear and Embedding weight of `model` in `dtype` ("float16" or "bfloat16") and compute in
    float32 (or the autocast type): each module upcasts its weight when it runs, so float32 weights never exist
    for more than one module (one block of rows) at a time. The outputs equal float32 storage's when the weights
    are exactly representable in `dtype` (an F16 GGUF in float16)."""
    import types

    import torch
    import torch.nn.functional as F

    half = getattr(torch, dtype)
    fn = _half_linear()

    def linear(self: Any, x: Any) -> Any:
        return fn.apply(x, self.weight, self.bias)

    def embedding(self: Any, ids: Any) -> Any:
        out = F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                          self.sparse).float()
        scale = getattr(self, "embed_scale", None)  # Gemma's scaled embedding multiplies after the lookup
        return out if scale is None else out * scale.float()

    for module in _matrix_modules(model.modules()):
        module.weight.data = module.weight.data.to(half)  # a no-op for a tied output layer's shared Parameter
        scalar = getattr(module, "scalar_embed_scale", None)
        if scalar is not None:  # Gemma's sqrt(d): a model built in a half type holds it rounded (25.30 for 25.298)
            module.embed_scale = torch.tensor(float(scalar), dtype=torch.float32, device=module.weight.device)
        module.forward = types.MethodType(linear if isinstance(module, torch.nn.Linear) else embedding, module)


def store_compute_type(modules: Any, dtype: str) -> list[Any]:
    """Keep the half-stored Linear weights of `modules` in `dtype`, the type an autocast region computes in: such a
    module casts its weight to the autocast type at every call (forward and backward; a fifth of a bfloat16 student
    step on SmolLM2), and this makes that cast once. Outputs under autocast to `dtype` do not change (the cast is the
    same rounding, made earlier); outside autocast they do, so a caller that computes in float32 again restores the
    stored values first (`FullPrecisionModel.computing_in`). Returns the modules changed."""
    import torch

    target, changed = getattr(torch, dtype), []
    for module in _matrix_modules(modules):
        w = module.weight
        if isinstance(module, torch.nn.Linear) and "forward" in module.__dict__ and w.dtype != target:
            w.data = w.data.to(target)  # one module's copy at a time: no second model in memory
            heap.trim()  # the old copy, under glibc's mmap threshold, back to the system
            changed.append(module)
    return changed


def store_float32(modules: Any) -> None:
    """Undo `store_half` for `modules` (those about to be trained): float32 weights and torch's own forward."""
    for module in _matrix_modules(modules):
        module.weight.data = module.weight.data.float()
        module.__dict__.pop("forward", None)


_SAFETENSORS_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _safetensors_index(file: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """The offset of a .safetensors file's data and its header's entries (dtype, shape, data_offsets) by name."""
    import json
    import struct

    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def _checkpoint_names(folder: Path) -> set[str]:
    """Every tensor name the *.safetensors files of `folder` hold."""
    names: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        names.update(_safetensors_index(file)[1])
    return names


def _checkpoint_tensors(folder: Path, keys: set[str]) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of each of `keys` the *.safetensors files of `folder` hold, each read into memory of its own
    with plain reads. Not through a memory map (safetensors' safe_open, transformers' loader): tensors that view a
    mapped file keep all of it that was ever read resident, counted in the process's memory, for as long as any of
    them lives (a Qwen2.5-0.5B student held its 1.15 GB of float16 beside the bfloat16 copy it computed with)."""
    import torch

    for file in sorted(folder.glob("*.safetensors")):
        start, header = _safetensors_index(file)
        with open(file, "rb", buffering=0) as f:
            for key in sorted(set(header) & keys, key=lambda k: header[k]["data_offsets"][0]):
                entry = header[key]
                dtype = _SAFETENSORS_TORCH.get(entry["dtype"])
                if dtype is None:
                    raise PydetoxError(f"{file}: tensor {key} has dtype {entry['dtype']}; expected one of "
                                       f"{', '.join(_SAFETENSORS_TORCH)}")
                begin, end = entry["data_offsets"]
                tensor = torch.empty(entry["shape"], dtype=getattr(torch, dtype))
                view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                if view.nbytes != end - begin:
                    raise PydetoxError(f"{file}: tensor {key} holds {end - begin} bytes; its dtype and shape "
                                       f"{entry['dtype']} {entry['shape']} make {view.nbytes}")
                f.seek(start + begin)
                got = 0
                while got < view.nbytes:
                    n = f.readinto(view[got:])
                    if not n:
                        raise PydetoxError(f"{file}: ends inside tensor {key} (truncated file)")
                    got += n
                yield key, tensor


def _own_weights(model: Any, folder: Path) -> None:
    """Give every parameter of `model` that the checkpoint in `folder` holds (in the parameter's dtype) memory of its
    own, read with `_checkpoint_tensors`: transformers loads a checkpoint of the model's dtype as views of its
    memory-mapped file, so every page any computation reads stays resident as well as every copy made from it."""
    params = dict(model.named_parameters())  # a tied Parameter under its first name only
    for key, tensor in _checkpoint_tensors(folder, set(params)):
        param = params[key]
        param.data = tensor.to(dtype=param.dtype, device=param.device)


def _small_tensors_float32(model: Any, folder: Path) -> None:
    """Give every parameter that `store_half` leaves in float32 (norms, biases) its checkpoint value in float32:
    a model loaded in a half type has them rounded. Raises when the checkpoint lacks one."""
    halves = {id(m.weight) for m in _matrix_modules(model.modules())}
    wanted = {n: p for n, p in model.named_parameters(remove_duplicate=False) if id(p) not in halves}
    for key, tensor in _checkpoint_tensors(folder, set(wanted)):
        wanted.pop(key).data = tensor.float()
    if wanted:
        raise PydetoxError(f"{folder}: no float32 value for {', '.join(sorted(wanted)[:3])} in its *.safetensors")


class FullPrecisionModel:
    """A causal LM computed in float32 torch, its tokenizer, and the GGUF names of its matrices.

    `weights` is how its matrices are kept in memory: "float32", a half type ("float16", "bfloat16": half the
    memory; each module upcasts when it runs, see `store_half`), or "auto": the source's own precision
    (`source_precision`), which changes nothing in the results and halves the memory of an F16 or bf16 source."""

    def __init__(self, source: str | Path, progress: bool = True, device: str = "cpu", weights: str = "auto") -> None:
        from pydetox.extras import require

        torch = require("torch", "discovery")
        transformers = require("transformers", "discovery")
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.torch = torch
        if not progress:
            transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        path = Path(source)
        if weights not in WEIGHTS:
            raise PydetoxError(f"weights is one of {', '.join(WEIGHTS)}; got {weights!r}")
        native = source_precision(source)
        self.weights = native if weights == "auto" else weights
        # A GGUF is read from its converted folder (written on first use one tensor at a time, `_convert`); a local
        # folder in the half type directly (no float32 copy of the whole model on the way), then the small tensors
        # (norms, biases) read again in float32; a hub id loads in float32 and converts after.
        converted = _convert(path, native, progress) if path.is_file() and path.suffix == ".gguf" else None
        folder = str(converted if converted is not None else source)
        direct = self.weights != "float32" and Path(folder).is_dir()
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=getattr(torch, self.weights) if direct else torch.float32)
            self.model.eval()  # type: ignore[no-untyped-call]
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as exc:
            raise PydetoxError(f"transformers could not load {source}: {exc}") from exc
        if direct:
            _own_weights(self.model, Path(folder))
        if self.weights != "float32":
            store_half(self.model, self.weights)
            if direct:
                _small_tensors_float32(self.model, Path(folder))
        # where `computing_in` reads the stored matrices back from: a local checkpoint of the weights as kept
        self.checkpoint = (converted if converted is not None else Path(folder)) if self.weights == native else None
        if self.checkpoint is not None and not any(self.checkpoint.glob("*.safetensors")):
            self.checkpoint = None
        self.source = str(source)
        self.device = "cpu"
        self.to(resolve_device(device))
        model_type = self.model.config.model_type
        if model_type not in ARCHS:
            raise PydetoxError(f"architecture {model_type!r} is not supported yet; supported: {', '.join(sorted(ARCHS))}")
        self.spec = ARCHS[model_type]
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"

    @contextlib.contextmanager
    def computing_in(self, precision: str) -> Iterator[None]:
        """For a stage that runs the decoder layers only under autocast to `precision`: their half-stored Linear
        weights kept in that type for the duration (`store_compute_type`: no cast at each call, the same outputs),
        and read back from the checkpoint on exit, so that later float32 computations see the stored values. A
        no-op for float32, for weights already in that type, or where no local checkpoint holds them all to restore
        from (a hub id, a float32 load)."""
        modules = list(self.spec.layers(self.model).modules())
        by_id = {id(m.weight): m for m in _matrix_modules(modules) if isinstance(m, self.torch.nn.Linear)}
        names = {n: by_id[id(p)] for n, p in self.model.named_parameters() if id(p) in by_id}
        # nothing changes unless the checkpoint holds every weight to restore
        if (precision == "float32" or self.weights == precision or self.checkpoint is None
                or not set(names) <= _checkpoint_names(self.checkpoint)):
            yield
            return
        changed = {id(m) for m in store_compute_type(modules, precision)}
        try:
            yield
        finally:
            stored = getattr(self.torch, self.weights)
            restore = {n: m for n, m in names.items() if id(m) in changed}
            for key, tensor in _checkpoint_tensors(self.checkpoint, set(restore)):
                w = restore[key].weight
                w.data = tensor.to(device=w.device, dtype=stored)
                heap.trim()  # the compute-type copy just freed: no second model builds up in the heap meanwhile

    def to(self, device: str) -> None:
        """Move the model to the torch device `device` ("cpu" or "cuda")."""
        if device != self.device:
            self.model.to(device)
            self.device = device

    @property
    def arch(self) -> str:
        return self.spec.gguf_arch

    @property
    def n_layers(self) -> int:
        return len(self.spec.layers(self.model))

    @property
    def tied(self) -> bool:
        return bool(getattr(self.model.config, "tie_word_embeddings", False))

    def down_proj(self, layer: int) -> Any:
        return self.spec.down_proj(self.spec.layers(self.model)[layer])

    def down_proj_name(self, layer: int) -> str:
        return _name(T.FFN_DOWN, layer)

    @property
    def output_name(self) -> str:
        return _name(T.OUTPUT)

    @property
    def output_source(self) -> str | None:
        """Where llama.cpp finds the output layer of a tied model: the token embedding."""
        return _name(T.TOKEN_EMBD) if self.tied else None

    @property
    def output_shape(self) -> tuple[int, int]:
        """(vocab, d) of the output layer, without the float32 copy `unembedding` makes of a half-stored one."""
        rows, cols = self.model.get_output_embeddings().weight.shape  # type: ignore[no-untyped-call]
        return int(rows), int(cols)

    def padded(self, seqs: list[list[int]]) -> tuple[Any, Any]:
        """Token sequences as (input_ids, attention_mask) on the model's device, right-padded with the pad token."""
        torch = self.torch
        n = max(len(s) for s in seqs)
        inp = torch.full((len(seqs), n), self.tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(seqs), n), dtype=torch.long)
        for k, s in enumerate(seqs):
            inp[k, : len(s)] = torch.tensor(s)
            att[k, : len(s)] = 1
        return inp.to(self.device), att.to(self.device)

    def unembedding(self) -> Any:
        """(vocab, d) float32 tensor of the output layer (a copy when the weights are kept in a half type)."""
        return self.model.get_output_embeddings().weight.detach().float()  # type: ignore[no-untyped-call]
