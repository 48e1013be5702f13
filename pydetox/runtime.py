"""Loading GGUF models into the llama.cpp runtime (llama-cpp-python) the way pydetox needs them.

On CPUs that report AMX (Intel Sapphire Rapids and later, e.g. these 2-core build machines), llama.cpp 0c1e57098bba
built with -march=native routes Q4_0/Q4_1/Q8_0 matrix products through its AMX "extra buffer type", and that kernel
crashes with SIGSEGV (ggml_backend_amx_mul_mat) on SmolLM2's 576-wide tensors here. `use_extra_bufts = false`
(llama.cpp's `--no-repack`) keeps the weights in the plain CPU buffer, which runs the regular AVX-512 kernels.
llama-cpp-python's `Llama` does not expose that field, so it is set on the default parameters it starts from.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from pydetox.errors import RuntimeUnavailableError

_lock = threading.Lock()


def load_llama(path: str | Path, *, repack: bool = False, **kwargs: Any) -> Any:
    """A `llama_cpp.Llama` for `path`; `repack=False` disables llama.cpp's extra (AMX / repacked) buffer types."""
    try:
        import llama_cpp
        import llama_cpp.llama as llama_mod
    except ImportError as exc:
        raise RuntimeUnavailableError("llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36") from exc
    kwargs.setdefault("verbose", False)
    with _lock:
        original = llama_cpp.llama_cpp.llama_model_default_params

        def params() -> Any:
            p = original()
            p.use_extra_bufts = repack
            return p

        llama_mod.llama_cpp.llama_model_default_params = params  # type: ignore[attr-defined]
        try:
            return llama_cpp.Llama(model_path=str(path), **kwargs)
        finally:
            llama_mod.llama_cpp.llama_model_default_params = original  # type: ignore[attr-defined]
