"""The per-tensor type mix of a whole-model quantization, as llama.cpp itself decides it.

llama-quantize does not give every tensor the named type: for Q4_K_M it keeps some ffn_down and attn_v tensors at
Q6_K, the output at Q6_K, and falls back to Q5_0 etc. where a row length is not a multiple of 256 (llama.cpp
`src/llama-quant.cpp`, `llama_tensor_get_type`). Rather than re-implement those rules, pydetox asks llama.cpp:
`llama_model_quantize` with `dry_run = true` decides every tensor's type without quantizing anything (tens of
milliseconds) and logs one line per tensor, which is read back here.
"""

from __future__ import annotations

import ctypes
import re
import threading
from pathlib import Path

import gguf

from pydetox.errors import RuntimeUnavailableError, UnsupportedTypeError

# "[  12/ 272] blk.0.ffn_down.weight - [ 1536, 576, 1, 1], type =   q4_1, size = 0.53 MiB -> 0.69 MiB (q6_K)"
# (the "-> ... (type)" part is absent when the tensor keeps its type).
_LINE = re.compile(
    r"\[\s*\d+/\s*\d+\]\s+(?P<name>\S+)\s+-\s+\[[^\]]*\],\s+type\s+=\s+(?P<cur>\S+),\s+size\s+=\s+[\d.]+\s+MiB"
    r"(?:\s+->\s+[\d.]+\s+MiB\s+\((?P<new>[^)]+)\))?"
)
_lock = threading.Lock()


def _type_from_ggml_name(name: str) -> gguf.GGMLQuantizationType:
    try:
        return gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        raise UnsupportedTypeError(f"llama.cpp chose type {name!r}, which gguf-py does not know") from None


def llama_cpp_type_mix(model_path: str | Path, ftype: gguf.LlamaFileType) -> dict[str, gguf.GGMLQuantizationType]:
    """Tensor name -> type that `llama-quantize MODEL OUT <ftype>` would give it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise RuntimeUnavailableError("llama-cpp-python is needed to plan a whole-model quantization") from exc

    lines: list[str] = []

    @ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)  # type: ignore[untyped-decorator]
    def capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.dry_run = True
    params.allow_requantize = True
    params.nthread = 1
    with _lock:
        llama_cpp.llama_log_set(capture, None)
        try:
            rc = llama_cpp.llama_model_quantize(str(model_path).encode(), b"", ctypes.byref(params))
        finally:
            _restore_default_logger(llama_cpp)
    text = "".join(lines)
    if rc != 0:
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise UnsupportedTypeError(f"llama.cpp cannot plan a {ftype.name} quantization of {model_path}:\n{tail}")
    mix: dict[str, gguf.GGMLQuantizationType] = {}
    for m in _LINE.finditer(text):
        mix[m.group("name")] = _type_from_ggml_name(m.group("new") or m.group("cur"))
    if not mix:
        raise UnsupportedTypeError("llama.cpp's dry run printed no tensor plan; is this llama-cpp-python 0.3.36?")
    return mix


def _restore_default_logger(llama_cpp: object) -> None:
    # llama-cpp-python installs its own log callback at import; put it back so its `verbose` flag keeps working.
    try:
        from llama_cpp._logger import llama_log_callback

        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))  # type: ignore[attr-defined]
    except ImportError:
        pass
