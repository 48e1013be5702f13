"""Access to llama.cpp's ggml: locating the libggml that llama-cpp-python installs, and the quantization types.

pydetox does not ship a quantizer of its own: every dequantize and quantize goes through `ggml_get_type_traits` and
`ggml_quantize_chunk` of the libggml-base that llama-cpp-python builds, so the bytes written are the bytes
llama-quantize would write.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import gguf

from pydetox.errors import RuntimeUnavailableError, UnsupportedTypeError

Q = gguf.GGMLQuantizationType  # an alias for brevity

# Whole-model targets of `--type`, as llama-quantize names them. They map onto llama.cpp's `llama_ftype`, which
# gguf-py mirrors as LlamaFileType (MOSTLY_Q4_K_M, ...); ALL_F32 is llama-quantize's "F32".
_FTYPE_ALIASES = {"F32": "ALL_F32"}


@dataclass(frozen=True)
class TypeInfo:
    """What libggml says about one tensor type."""

    type: gguf.GGMLQuantizationType
    name: str
    block_size: int
    type_size: int
    quantized: bool
    can_dequantize: bool


def libggml_path() -> Path:
    """Path of llama-cpp-python's libggml-base shared library (override with PYDETOX_LIBGGML)."""
    env = os.environ.get("PYDETOX_LIBGGML")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeUnavailableError(
            "llama-cpp-python is not installed; pydetox uses its libggml for (de)quantization. "
            "Install it with `pip install llama-cpp-python==0.3.36`."
        )
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (lib_dir / name).exists():
            return lib_dir / name
    raise RuntimeUnavailableError(f"expected libggml-base in {lib_dir}, found none; reinstall llama-cpp-python")


@cache
def load() -> None:
    """Load libggml into the native core once and check that its type table matches gguf-py's."""
    from pydetox import _core

    _core.load_ggml(str(libggml_path()))
    # The native core reads libggml's `struct ggml_type_traits` directly; a layout change in a newer libggml would
    # show up here as block sizes that disagree with gguf-py's table.
    for qtype in (Q.F32, Q.F16, Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.IQ4_XS):
        _name, block, size, _quantized, _deq = _core.type_info(int(qtype))
        if (block, size) != gguf.GGML_QUANT_SIZES[qtype]:
            raise RuntimeUnavailableError(
                f"libggml at {libggml_path()} reports {qtype.name} blocks of ({block}, {size}) but gguf says "
                f"{gguf.GGML_QUANT_SIZES[qtype]}; pydetox expects llama-cpp-python 0.3.36"
            )


def type_info(qtype: gguf.GGMLQuantizationType) -> TypeInfo:
    """Traits of a tensor type as libggml reports them."""
    from pydetox import _core

    load()
    name, block, size, quantized, deq = _core.type_info(int(qtype))
    return TypeInfo(qtype, name, block, size, quantized, deq)


def parse_type(name: str) -> gguf.GGMLQuantizationType:
    """A tensor type from its name (case-insensitive), e.g. 'q4_k' -> Q4_K."""
    try:
        return gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        known = ", ".join(t.name for t in Q)
        raise UnsupportedTypeError(f"unknown tensor type {name!r}; expected one of: {known}") from None


def parse_ftype(name: str) -> gguf.LlamaFileType:
    """A whole-model target as llama-quantize names it (Q4_K_M, Q8_0, F16, ...)."""
    key = name.upper()
    key = _FTYPE_ALIASES.get(key, f"MOSTLY_{key}")
    try:
        return gguf.LlamaFileType[key]
    except KeyError:
        known = ", ".join(
            "F32" if t.name == "ALL_F32" else t.name.removeprefix("MOSTLY_")
            for t in gguf.LlamaFileType
            if t.name.startswith("MOSTLY_") or t.name == "ALL_F32"
        )
        raise UnsupportedTypeError(f"unknown model type {name!r}; expected one of: {known}") from None


def ftype_name(ftype: gguf.LlamaFileType) -> str:
    return "F32" if ftype == gguf.LlamaFileType.ALL_F32 else ftype.name.removeprefix("MOSTLY_")


def least_precise(names: Sequence[str]) -> str:
    """The model type of `names` (as llama-quantize names them) with the fewest bits per weight in its main tensor
    type (Q4_K_M -> Q4_K, 4.5); of two with the same main type, the smaller mix (_XS, _S, _M, _L)."""
    if not names:
        raise UnsupportedTypeError("expected at least one model type, found none")

    def rank(name: str) -> tuple[float, int]:
        parse_ftype(name)  # unknown names are refused with the list of known ones
        key, mix = name.upper(), 1
        if key not in Q.__members__:  # a mix named after its main type: Q4_K_M -> Q4_K, IQ3_M -> IQ3_S, MXFP4_MOE
            stem, _, size = key.rpartition("_")
            mix = {"XS": -1, "S": 0, "M": 1, "L": 2}.get(size, 1)
            key = stem if stem in Q.__members__ else f"{stem}_S"
        block, size_bytes = gguf.GGML_QUANT_SIZES[Q[key]]
        return 8 * size_bytes / block, mix

    return min(names, key=rank).upper()


def requires_imatrix(qtype: gguf.GGMLQuantizationType) -> bool:
    """True when libggml refuses to quantize to `qtype` without an importance matrix."""
    from pydetox import _core

    load()
    return bool(_core.requires_imatrix(int(qtype)))
