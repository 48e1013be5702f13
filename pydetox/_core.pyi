"""pydetox's native core (csrc/). Call it through pydetox.kernels and pydetox.apply, not directly."""

from enum import Enum

import numpy as np
import numpy.typing as npt

from pydetox.errors import OutputError, PydetoxError

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

class NativeError(PydetoxError): ...
class NativeIOError(OutputError): ...

class OpKind(Enum):
    """An edit kind of the tensor pipeline (pydetox.plan.EditKind, by name)."""

    PROJECT_OUT = 0
    PROJECT_IN = 1
    LOW_RANK = 2
    SCALE_ROWS = 3
    SCALE_COLS = 4
    ADD_ROWS = 5

class OpStats:
    """For a projection: removed = ||(1 - g) P W0||; survived_f32 / survived = ||P W' - g P W0|| before / after
    requantization. Zeros for other kinds."""

    @property
    def removed(self) -> float: ...
    @property
    def survived_f32(self) -> float: ...
    @property
    def survived(self) -> float: ...

class TensorStats:
    """One tensor through process_tensor: stage times in seconds and norms."""

    @property
    def dequantize_s(self) -> float: ...
    @property
    def edit_s(self) -> float: ...
    @property
    def quantize_s(self) -> float: ...
    @property
    def verify_s(self) -> float: ...
    @property
    def write_s(self) -> float: ...
    @property
    def norm_orig(self) -> float: ...
    @property
    def norm_delta(self) -> float: ...
    @property
    def norm_edited(self) -> float: ...
    @property
    def norm_quant_err(self) -> float: ...
    @property
    def ops(self) -> list[OpStats]: ...

def release_workspace() -> None: ...

def load_ggml(path: str) -> None: ...
def ggml_loaded() -> bool: ...
def type_info(type: int) -> tuple[str, int, int, bool, bool]:
    """(name, block size, bytes per block, is quantized, can dequantize) as libggml reports them."""
def requires_imatrix(type: int) -> bool: ...
def check_quantizable(type: int, cols: int) -> None: ...
def validate_row_data(data: U8, type: int) -> bool:
    """ggml_validate_row_data: False where the bytes hold NaN/inf values or corrupt block scales."""
def project_out(W: F32, basis: npt.ArrayLike, gain: npt.ArrayLike | None = None, threads: int = 1) -> None: ...
def project_in(W: F32, basis: npt.ArrayLike, gain: npt.ArrayLike | None = None, threads: int = 1) -> None: ...
def low_rank(W: F32, left: npt.ArrayLike, right: npt.ArrayLike, threads: int = 1) -> None: ...
def scale_rows(W: F32, scales: npt.ArrayLike, threads: int = 1) -> None: ...
def scale_cols(W: F32, scales: npt.ArrayLike, threads: int = 1) -> None: ...
def dequantize(src: U8, type: int, rows: int, cols: int, threads: int = 1) -> F32: ...
def quantize(W: npt.ArrayLike, type: int, imatrix: npt.ArrayLike | None = None, threads: int = 1) -> U8: ...
def process_tensor(
    src: U8,
    src_type: int,
    rows: int,
    cols: int,
    ops: list[tuple[OpKind, F32, F32 | None, F32 | None]],
    dst_type: int,
    imatrix: F32 | None = None,
    threads: int = 1,
    verify: bool = True,
    out_fd: int = -1,
    out_offset: int = 0,
) -> tuple[U8 | None, TensorStats]:
    """Dequantize, apply ops, requantize, measure; returns (bytes, stats). With out_fd
    the bytes are written at out_offset of that file instead, and None is returned in their place."""
