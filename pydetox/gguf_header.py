"""GGUF header parsing and writing at the byte level, for copying a model's metadata verbatim and fast.

gguf-py's `GGUFReader` builds numpy views for every element of every metadata array; a tokenizer of ~100,000
strings made opening a small model take 0.4-1.6 s and re-encoding it through `GGUFWriter` another 0.2 s, which is
as long as requantizing the whole model. Here each key/value entry is parsed once (strings are decoded, so damaged
metadata is refused on open) and remembered as a byte span, and the output header copies those spans unchanged:
what the input said is what the output says, byte for byte, for every key that is not replaced. Layout from the
GGUF specification (ggml `docs/gguf.md`); value type ids and constants from gguf-py.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from pydetox.errors import GGUFFileError

VT = gguf.GGUFValueType
_SCALAR = {
    VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
    VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d",
}
_NUMPY = {
    VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4", VT.INT32: "<i4",
    VT.FLOAT32: "<f4", VT.BOOL: "?", VT.UINT64: "<u8", VT.INT64: "<i8", VT.FLOAT64: "<f8",
}
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NAME = 64  # GGML_MAX_NAME


@dataclass(frozen=True)
class KeyValue:
    key: str
    vtype: gguf.GGUFValueType
    value: Any
    raw: bytes  # the whole entry as stored: key, type, value


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]
    qtype_id: int
    offset: int  # relative to the start of the data section


@dataclass(frozen=True)
class Header:
    version: int
    kvs: dict[str, KeyValue]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int


class _Cursor:
    def __init__(self, buf: memoryview, what: str) -> None:
        self.buf = buf
        self.pos = 0
        self.what = what

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFFileError(f"{self.what} ends inside its header (needed {n} bytes at offset {self.pos}, "
                                f"file has {len(self.buf)})")
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFFileError(f"{self.what}: a string at offset {self.pos - n} is not UTF-8 ({exc.reason})") from None

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype == VT.STRING:
            return self.string()
        if vtype == VT.ARRAY:
            if depth > 2:
                raise GGUFFileError(f"{self.what}: arrays nested deeper than 2 levels at offset {self.pos}")
            etype = self.unpack("<I")
            count = self.unpack("<Q")
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[VT(etype)])
                if count > len(self.buf):
                    raise GGUFFileError(f"{self.what}: array of {count} values at offset {self.pos} exceeds the file")
                return np.frombuffer(self.take(count * dt.itemsize), dtype=dt).tolist()
            if etype in (VT.STRING, VT.ARRAY):
                if count > len(self.buf) // 8:
                    raise GGUFFileError(f"{self.what}: array of {count} values at offset {self.pos} exceeds the file")
                return [self.value(etype, depth + 1) for _ in range(count)]
            raise GGUFFileError(f"{self.what}: unknown array element type {etype} at offset {self.pos}")
        fmt = _SCALAR.get(vtype)  # type: ignore[call-overload]
        if fmt is None:
            raise GGUFFileError(f"{self.what}: unknown metadata value type {vtype} at offset {self.pos}")
        return self.unpack(fmt)


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse the header, metadata and tensor infos of a GGUF file; raise GGUFFileError on anything malformed."""
    what = str(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise GGUFFileError(f"{what} has {size} bytes; a GGUF header alone needs 24")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                return _parse(_Cursor(view, what), what)
            finally:
                view.release()


def _parse(c: _Cursor, what: str) -> Header:
    if bytes(c.take(4)) != b"GGUF":
        raise GGUFFileError(f"{what} is not a GGUF file (no GGUF magic)")
    version = c.unpack("<I")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise GGUFFileError(f"{what} is GGUF version {version}{hint}; pydetox reads little-endian versions 2 and 3")
    n_tensors = c.unpack("<Q")
    n_kv = c.unpack("<Q")
    if n_tensors > len(c.buf) // 24 or n_kv > len(c.buf) // 12:
        raise GGUFFileError(f"{what} claims {n_tensors} tensors and {n_kv} metadata keys, more than its size allows")
    kvs: dict[str, KeyValue] = {}
    for _ in range(n_kv):
        start = c.pos
        key = c.string()
        vtype = c.unpack("<I")
        try:
            vt = VT(vtype)
        except ValueError:
            raise GGUFFileError(f"{what}: metadata key {key!r} has unknown type {vtype}") from None
        value = c.value(vt)
        if key in kvs:
            raise GGUFFileError(f"{what}: metadata key {key!r} appears twice")
        kvs[key] = KeyValue(key, vt, value, bytes(c.buf[start : c.pos]))
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    if gguf.Keys.General.ALIGNMENT in kvs:
        kv = kvs[gguf.Keys.General.ALIGNMENT]
        alignment = kv.value
        if kv.vtype != VT.UINT32 or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFileError(f"{what}: general.alignment must be a power of two (u32), got {alignment!r}")
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = c.string()
        # as llama.cpp's loader: names are C strings of fewer than GGML_MAX_NAME bytes
        if not name or len(name.encode()) >= _MAX_NAME or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
            raise GGUFFileError(f"{what}: tensor name {name[:80]!r} is not a valid name (1..{_MAX_NAME - 1} bytes, "
                                "no control characters)")
        n_dims = c.unpack("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise GGUFFileError(f"{what}: tensor {name!r} has {n_dims} dimensions (1..{_MAX_DIMS} allowed)")
        ne = tuple(int(c.unpack("<Q")) for _ in range(n_dims))
        if any(n <= 0 or n > 1 << 40 for n in ne):
            raise GGUFFileError(f"{what}: tensor {name!r} has implausible shape {ne}")
        qtype_id = c.unpack("<I")
        offset = c.unpack("<Q")
        if offset % alignment:
            raise GGUFFileError(f"{what}: tensor {name!r} data offset {offset} is not aligned to {alignment}")
        if name in names:
            raise GGUFFileError(f"{what}: tensor {name!r} appears twice")
        names.add(name)
        tensors.append(TensorInfo(name, ne, qtype_id, offset))
    data_offset = -(-c.pos // alignment) * alignment
    return Header(version, kvs, tensors, alignment, data_offset)


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def encode_kv(key: str, value: Any, vtype: gguf.GGUFValueType) -> bytes:
    """One metadata entry (scalars and strings; pydetox adds nothing else)."""
    out = _string(key) + struct.pack("<I", int(vtype))
    if vtype == VT.STRING:
        return out + _string(value)
    fmt = _SCALAR.get(vtype)
    if fmt is None:
        raise ValueError(f"encode_kv writes scalars and strings, not {vtype.name}")
    return out + struct.pack(fmt, value)


def encode_header(kv_entries: list[bytes], tensors: list[TensorInfo], alignment: int) -> bytes:
    """The bytes before the data section: magic, version 3, counts, metadata, tensor infos, padding."""
    parts = [b"GGUF", struct.pack("<IQQ", gguf.GGUF_VERSION, len(tensors), len(kv_entries)), *kv_entries]
    for t in tensors:
        parts.append(_string(t.name) + struct.pack("<I", len(t.ne)) + struct.pack(f"<{len(t.ne)}Q", *t.ne)
                     + struct.pack("<IQ", t.qtype_id, t.offset))
    head = b"".join(parts)
    return head + b"\0" * (-len(head) % alignment)
