"""One exception hierarchy for everything pydetox refuses. Messages say what was expected, what was found, and
what to do. Failures of the native core arrive as `pydetox._core.NativeError`, a subclass of `PydetoxError`."""

from __future__ import annotations


class PydetoxError(Exception):
    """Base of every error pydetox raises on purpose."""


class GGUFFileError(PydetoxError):
    """A GGUF file is missing, truncated, corrupt, or not what the operation needs."""


class PlanError(PydetoxError):
    """An edit plan is malformed: wrong version, bad shapes, NaN or inf values, non-orthonormal bases."""


class PlanMismatchError(PlanError):
    """An edit plan was made for another model (architecture, tensor names or shapes differ)."""


class UnsupportedTypeError(PydetoxError):
    """A quantization type is unknown, cannot be written, or needs an importance matrix that was not given."""


class OutputError(PydetoxError):
    """The output cannot be written (unwritable folder, full disk, would overwrite the input)."""


class AssetError(PydetoxError):
    """A named asset is unknown, cannot be fetched, or fails its checksum."""


class NothingToBanError(PydetoxError):
    """The word filter found no token of the model's vocabulary to ban (no word of its list is spelled there)."""


class RuntimeUnavailableError(PydetoxError):
    """llama-cpp-python (and with it libggml) is not installed or cannot be loaded."""
