"""The full-precision model that discovery works on, and where each of its matrices lives in a GGUF.

Sources: a local Hugging Face folder or a hub id (transformers), or a GGUF file dequantized to float32 by
transformers' GGUF loader (the bundled models ship only as GGUF). One registry maps each architecture's torch
modules to GGUF tensor names (llama.cpp `convert_hf_to_gguf.py` names). Only matrices whose edited side is not
permuted by the converter are named here: llama.cpp permutes the rows of q_proj/k_proj, but ffn_down and the output
layer line up with the HF weights directly (measured in shared/FINDINGS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from pydetox.errors import PydetoxError

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
    file's path, size and modification time, so an edited or replaced file is converted afresh."""
    import hashlib

    from pydetox.paths import cache_dir

    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "converted" / f"{gguf_path.stem}-{key}"


def _save_converted(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save under a temporary name and rename when complete; a failure only costs the next load its speed."""
    import shutil
    import tempfile

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".tmp", dir=folder.parent))
        # transformers marks a GGUF-loaded model as "quantized with gguf" and refuses to save it; its weights are
        # plain float32 tensors, so the mark is dropped for the save and put back.
        quantizer, qconfig = getattr(model, "hf_quantizer", None), getattr(model.config, "quantization_config", None)
        model.hf_quantizer = None
        if qconfig is not None:
            del model.config.quantization_config
        try:
            model.save_pretrained(tmp)
        finally:
            model.hf_quantizer = quantizer
            if qconfig is not None:
                model.config.quantization_config = qconfig
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE).write_text("converted by pydetox from a GGUF; safe to delete\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except (OSError, ValueError):
        shutil.rmtree(tmp, ignore_errors=True)


class FullPrecisionModel:
    """A causal LM in float32 torch, its tokenizer, and the GGUF names of its matrices."""

    def __init__(self, source: str | Path, progress: bool = True, device: str = "cpu") -> None:
        from pydetox.extras import require

        torch = require("torch", "discovery")
        transformers = require("transformers", "discovery")
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.torch = torch
        if not progress:
            transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        path = Path(source)
        kwargs: dict[str, Any] = {}
        converted = None
        if path.is_file() and path.suffix == ".gguf":
            converted = _converted_folder(path)
            if (converted / _DONE).is_file():
                folder = str(converted)
            else:
                folder, kwargs["gguf_file"] = str(path.parent), path.name
        else:
            folder = str(source)  # a local HF folder, or a hub id for online users
        try:
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
            self.model.eval()  # type: ignore[no-untyped-call]
            self.tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        except Exception as exc:
            raise PydetoxError(f"transformers could not load {source}: {exc}") from exc
        if converted is not None and "gguf_file" in kwargs:
            _save_converted(self.model, self.tokenizer, converted)
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

    def unembedding(self) -> Any:
        """(vocab, d) float32 tensor of the output layer."""
        return self.model.get_output_embeddings().weight.detach()  # type: ignore[no-untyped-call]
