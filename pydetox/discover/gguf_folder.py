"""A GGUF model as a Hugging Face folder (config, tokenizer, one safetensors file), written one tensor at a time.

transformers' own GGUF loader dequantizes every tensor to a float32 numpy array, copies it, and keeps the whole
model twice in float32 (its state dict and the model), next to the parsed metadata: 2.8 GB for the 0.54 GB F16
Gemma-3-270m, 4.8 GB for the 1.27 GB F16 Qwen2.5-0.5B. Here the tensor data goes straight from the GGUF into a
safetensors file one tensor at a time (an F16 or BF16 matrix is written as stored, without a float32 copy), and
the model is then loaded from that folder in its own precision: the first load of a model costs what every later
load does. Only the config and the tokenizer come from transformers' GGUF reader (metadata, no tensors), and each
tensor is given transformers' name and layout by transformers' own tables (`get_gguf_hf_weights_map`, the
architecture's `TensorProcessor`: the llama q/k row order, Gemma's norm offset), so the folder holds exactly what
`from_pretrained(gguf_file=...)` would have built.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tqdm import tqdm

from pydetox.errors import PydetoxError

GQ = gguf.GGMLQuantizationType

# safetensors' names for the torch types written here (https://github.com/huggingface/safetensors, format.md)
_SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# A GGUF tensor type that holds the values of a torch type exactly, read without a float32 detour.
_STORED_AS = {GQ.F32: "float32", GQ.F16: "float16", GQ.BF16: "bfloat16"}


def matrix_modules(modules: Any) -> list[Any]:
    """Those of `modules` whose weight is kept in a half type, both in a converted folder and by `model.store_half`:
    every Linear and Embedding."""
    import torch

    return [m for m in modules if isinstance(m, torch.nn.Linear | torch.nn.Embedding)]


def matrix_names(model: Any) -> set[str]:
    """The parameter names of the weights `matrix_modules` keeps in a half type: the tensors written in the source's
    precision; every other parameter (norms, biases) is written in float32."""
    kept = {id(m) for m in matrix_modules(model.modules())}
    return {f"{name}.weight" if name else "weight" for name, m in model.named_modules() if id(m) in kept}


def _tensor(raw: np.ndarray, qtype: GQ, shape: tuple[int, ...], dtype: str) -> Any:
    """One tensor's raw GGUF bytes as a torch tensor of `shape` in `dtype` (a fresh copy, not a view of `raw`)."""
    import torch

    from pydetox import kernels

    stored = _STORED_AS.get(qtype)
    if stored is not None:
        t = torch.from_numpy(raw.copy()).view(getattr(torch, stored)).reshape(shape)
    else:
        rows = math.prod(shape[:-1])
        t = torch.from_numpy(kernels.dequantize(raw, qtype, rows, shape[-1])).reshape(shape)
    return t.to(getattr(torch, dtype))


def write_folder(source: Path, folder: Path, precision: str, progress: bool = True) -> None:
    """Write the Hugging Face form of the GGUF `source` into the existing, empty `folder`: config.json, the tokenizer
    files and model.safetensors, the Linear and Embedding weights in `precision` (the source's own, see
    `model.source_precision`: exact), every other tensor in float32. Memory holds one tensor at a time besides the
    metadata. Raises PydetoxError when transformers cannot read the file's metadata or a tensor does not map onto
    the model transformers builds for it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    from pydetox.gguf_io import ModelFile

    if precision not in _SAFETENSORS_DTYPE:
        raise PydetoxError(f"precision is one of {', '.join(_SAFETENSORS_DTYPE)}; got {precision!r}")
    parent, name = str(source.parent), source.name
    try:
        config = AutoConfig.from_pretrained(parent, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name)
        with torch.device("meta"):  # names and shapes only: no memory, no initialisation
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise PydetoxError(f"transformers could not read {source}: {exc}") from exc
    matrices = matrix_names(skeleton)
    expected = dict(skeleton.state_dict())
    with ModelFile(source) as mf:
        processor = TENSOR_PROCESSORS.get(mf.arch, TensorProcessor)(config=config.to_dict())
        mapping = get_gguf_hf_weights_map(skeleton, processor)
        work = []  # (GGUF entry, transformers name, torch shape, dtype)
        for entry in mf.tensors.values():
            hf = mapping.get(entry.name)
            if hf is None:
                continue  # as transformers: a tensor the model has no place for (e.g. rope frequencies) is left out
            shape = tuple(reversed(entry.ne))
            want = tuple(expected[hf].shape)
            if math.prod(shape) != math.prod(want):
                raise PydetoxError(f"{source}: tensor {entry.name!r} has {shape}, transformers' {hf} expects {want}")
            work.append((entry, hf, want, precision if hf in matrices else "float32"))
        written = {w[1] for w in work}
        missing = {n for n, _ in skeleton.named_parameters()} - written  # tied parameters are named once
        if missing:
            raise PydetoxError(f"{source}: no tensor for {', '.join(sorted(missing)[:3])} of transformers' "
                               f"{type(skeleton).__name__}")
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for _, hf, shape, dtype in work:
            size = math.prod(shape) * getattr(torch, dtype).itemsize
            header[hf] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with (folder / "model.safetensors").open("wb") as out:
            out.write(len(encoded).to_bytes(8, "little"))
            out.write(encoded)
            for entry, hf, shape, dtype in tqdm(work, desc="convert GGUF", unit="tensor", disable=not progress,
                                                leave=False):
                t = _tensor(mf.read(entry), entry.qtype, shape, dtype)
                t = processor.process(weights=t, name=entry.name).weights
                t = t.to(getattr(torch, dtype)).contiguous()
                if tuple(t.shape) != shape:
                    raise PydetoxError(f"{source}: tensor {entry.name!r} came out as {tuple(t.shape)}, {hf} is {shape}")
                out.write(t.view(torch.uint8).numpy().data)
    config.dtype = getattr(torch, precision)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
