"""Reading GGUF models tensor by tensor, and writing a new GGUF without ever leaving a half-written file.

Reading: the header with `gguf_header.read_header`; tensor bytes with `os.preadv`, one tensor at a time, so memory
holds what is being edited, not the model. Writing: the source's metadata entries copied as stored plus the new
ones, tensor data with `pwrite` and `copy_file_range` (untouched tensors are copied byte for byte inside the
kernel), all into a temporary file in the destination folder that is renamed over the destination only when
complete (`os.replace` is atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt

from pydetox import keys
from pydetox.errors import GGUFFileError, OutputError
from pydetox.gguf_header import TensorInfo, encode_header, encode_kv, read_header
from pydetox.output import atomic, temporary_name

# Provenance keys pydetox adds to every file it writes (GGUF's own keys come from gguf.Keys).
KEY_TOOL = keys.TOOL
KEY_PLAN_SHA256 = keys.PLAN_SHA256
KEY_PLAN_METHOD = keys.PLAN_METHOD
KEY_PLAN_PARAMS = keys.PLAN_PARAMS
KEY_SOURCE_SHA256 = keys.SOURCE_SHA256
KEY_SOURCE_NAME = keys.SOURCE_NAME
KEY_TARGET_TYPE = keys.TARGET_TYPE
_SHA_PLACEHOLDER = "0" * 64


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a GGUF file: where its bytes are and what they hold."""

    name: str
    qtype: gguf.GGMLQuantizationType
    ne: tuple[int, ...]  # GGUF order: ne[0] is the row length
    n_bytes: int
    offset: int  # absolute offset of the data in the file

    @property
    def rows(self) -> int:
        return math.prod(self.ne[1:])

    @property
    def cols(self) -> int:
        return self.ne[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) as a 2-D matrix, i.e. torch's (out, in) for a Linear weight."""
        return (self.rows, self.cols)


class ModelFile:
    """A GGUF file opened read-only: its metadata, its tensor table, and tensor bytes on demand."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFFileError(f"expected a GGUF file at {self.path}, found {'a folder' if self.path.exists() else 'nothing'}")
        self.size = self.path.stat().st_size
        try:
            self.header = read_header(self.path)
        except GGUFFileError:
            raise
        except Exception as exc:  # an OSError or an mmap failure on a strange file
            raise GGUFFileError(f"{self.path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
        self.metadata: dict[str, Any] = {k: kv.value for k, kv in self.header.kvs.items()}
        self.tensors: dict[str, TensorEntry] = {}
        expected = 0  # as llama.cpp's loader: each tensor's data follows the one before, padded to the alignment
        for t in self.header.tensors:
            try:
                qtype = gguf.GGMLQuantizationType(t.qtype_id)
            except ValueError:
                raise GGUFFileError(f"{self.path}: tensor {t.name!r} has unknown type id {t.qtype_id}") from None
            entry = TensorEntry(t.name, qtype, t.ne, nbytes(qtype, t.ne), self.header.data_offset + t.offset)
            block, _size = gguf.GGML_QUANT_SIZES[qtype]
            if entry.cols % block:
                raise GGUFFileError(f"{self.path}: tensor {t.name!r} rows of {entry.cols} do not fit {qtype.name} blocks of {block}")
            if t.offset != expected:
                raise GGUFFileError(f"{self.path}: tensor {t.name!r} data starts at offset {t.offset} of the data "
                                    f"section, expected {expected} (tensor data must follow in order without gaps or "
                                    "overlaps, as llama.cpp requires); the file is damaged")
            alignment = self.header.alignment
            expected += -(-entry.n_bytes // alignment) * alignment
            if entry.offset + entry.n_bytes > self.size:
                raise GGUFFileError(
                    f"{self.path} is truncated: tensor {t.name!r} ends at byte {entry.offset + entry.n_bytes} "
                    f"but the file has {self.size} bytes"
                )
            self.tensors[t.name] = entry
        arch = self.get_str(gguf.Keys.General.ARCHITECTURE)
        if arch is None:
            raise GGUFFileError(f"{self.path} has no {gguf.Keys.General.ARCHITECTURE} key; not a model GGUF")
        self.arch: str = arch
        self._fd: int | None = None
        self._buf: npt.NDArray[np.uint8] | None = None

    def get_field(self, key: str) -> Any:
        return self.metadata.get(key)

    def get_str(self, key: str) -> str | None:
        value = self.get_field(key)
        return value if isinstance(value, str) else None

    def read(self, entry: TensorEntry) -> npt.NDArray[np.uint8]:
        """The raw bytes of one tensor, read from disk (not mapped, so memory holds one tensor, not the model)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        # One buffer, grown to the largest tensor read so far and reused: fresh pages for every tensor would
        # cost a page fault per 4 KiB. The returned array is valid until the next read.
        if self._buf is None or self._buf.size < entry.n_bytes:
            self._buf = np.empty(entry.n_bytes, dtype=np.uint8)
        buf = self._buf[: entry.n_bytes]
        view = memoryview(buf.data)
        done = 0
        while done < entry.n_bytes:
            n = os.preadv(self._fd, [view[done:]], entry.offset + done)
            if n <= 0:
                raise GGUFFileError(f"{self.path}: unexpected end of file inside tensor {entry.name!r}")
            done += n
        return buf

    def fileno(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._buf = None

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def nbytes(qtype: gguf.GGMLQuantizationType, ne: tuple[int, ...]) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(ne) // block * size


def sha256_file(path: str | os.PathLike[str], chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)  # hashlib releases the GIL on large buffers
    return digest.hexdigest()


def _hash_cache_path() -> Path:
    from pydetox.paths import cache_dir

    return cache_dir() / "sha256-cache.json"


def _stat_key(path: Path) -> tuple[str, dict[str, int]]:
    st = path.stat()
    return str(path.resolve()), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "dev": st.st_dev}


def cached_sha256(path: Path) -> str | None:
    """A file's sha256 remembered from an earlier run, if size, mtime, inode and device are unchanged (the same
    check git's index makes before trusting a cached hash)."""
    try:
        table = json.loads(_hash_cache_path().read_text())
        key, stat = _stat_key(path)
        entry = table.get(key)
        if entry and all(entry.get(k) == v for k, v in stat.items()):
            digest = entry.get("sha256")
            return digest if isinstance(digest, str) and len(digest) == 64 else None
    except (OSError, ValueError, AttributeError):
        pass
    return None


def remember_sha256(path: Path, digest: str) -> None:
    cache = _hash_cache_path()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        try:
            table = json.loads(cache.read_text())
            if not isinstance(table, dict):
                table = {}
            table = {k: v for k, v in table.items() if os.path.exists(k)}  # forget deleted files
        except (OSError, ValueError):
            table = {}
        key, stat = _stat_key(path)
        table[key] = {**stat, "sha256": digest}
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache only costs the next run a re-hash


class BackgroundHash:
    """sha256 of a file computed in a thread while the main work goes on; remembered across runs for an unchanged
    file (hashing costs ~0.2 s per 270 MB of CPU that the quantizers would otherwise use)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._result: str | BaseException | None = cached_sha256(self.path)
        self._thread: threading.Thread | None = None
        if self._result is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._result = sha256_file(self.path)
            remember_sha256(self.path, self._result)
        except BaseException as exc:
            self._result = exc

    def result(self) -> str:
        if self._thread is not None:
            self._thread.join()
        if isinstance(self._result, BaseException):
            raise GGUFFileError(f"cannot hash the input file: {self._result}") from self._result
        assert self._result is not None
        return self._result


@dataclass(frozen=True)
class OutTensor:
    """A tensor of the file being written."""

    name: str
    qtype: gguf.GGMLQuantizationType
    ne: tuple[int, ...]
    n_bytes: int


class AtomicGGUFWriter:
    """Writes a GGUF to `<dest folder>/.<name>.<pid>-<random>.tmp` (pydetox.output's naming, so that a later run
    removes it if this process is killed) and renames it to `dest` on `commit()`.

    Tensor data is written in the order of `tensors`, each at its aligned offset. Any failure (or leaving the
    `with` block without commit) removes the temporary file; the destination is either the complete new file or
    whatever was there before.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        source: ModelFile,
        tensors: Sequence[OutTensor],
        metadata: dict[str, tuple[Any, gguf.GGUFValueType]],
    ) -> None:
        self.dest = Path(dest)
        folder = self.dest.parent
        if not folder.is_dir():
            raise OutputError(f"output folder {folder} does not exist")
        # Not tempfile.mkstemp: it creates files with mode 0600, and the output must get the usual permissions
        # (0666 less the umask), as any file a user writes.
        self.tmp = temporary_name(self.dest)
        try:
            os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError as exc:
            raise OutputError(f"cannot create a file in output folder {folder}: {exc.strerror}") from exc
        self._committed = False
        self._sha_offset: int | None = None
        try:
            self._start(source, tensors, metadata)
        except BaseException:
            self.abort()
            raise

    def _start(
        self, source: ModelFile, tensors: Sequence[OutTensor], metadata: dict[str, tuple[Any, gguf.GGUFValueType]]
    ) -> None:
        # The source's metadata entries are copied as stored (see gguf_header), except the ones `metadata` replaces,
        # which are appended after them with the new keys.
        entries = [kv.raw for key, kv in source.header.kvs.items() if key not in metadata]
        self._sha_offset = None
        pos = 24 + sum(len(e) for e in entries)
        for key, (value, vtype) in metadata.items():
            entry = encode_kv(key, value, vtype)
            if key == KEY_SOURCE_SHA256:
                self._sha_offset = pos + len(entry) - len(_SHA_PLACEHOLDER)
            entries.append(entry)
            pos += len(entry)
        self.alignment = source.header.alignment
        infos = []
        rel = 0
        for t in tensors:
            infos.append(TensorInfo(t.name, t.ne, int(t.qtype), rel))
            rel += -(-t.n_bytes // self.alignment) * self.alignment
        head = encode_header(entries, infos, self.alignment)
        self.data_start = len(head)
        self.offsets = {t.name: self.data_start + info.offset for t, info in zip(tensors, infos, strict=True)}
        self.sizes = {t.name: t.n_bytes for t in tensors}
        self.end = self.data_start + rel
        self.fd = os.open(self.tmp, os.O_WRONLY)
        self._pwrite(0, head)

    def _pwrite(self, pos: int, data: npt.NDArray[np.uint8] | bytes) -> None:
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data if isinstance(data, np.ndarray) else data
        view = memoryview(raw)
        try:
            while len(view):
                n = os.pwrite(self.fd, view, pos)
                view = view[n:]
                pos += n
        except OSError as exc:
            raise OutputError(f"cannot write {self.dest}: {exc.strerror} (errno {exc.errno})") from exc

    def write(self, name: str, data: npt.NDArray[Any]) -> None:
        """Write a tensor's bytes (already in its type) at its place."""
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        expected = self.sizes[name]
        if raw.nbytes != expected:
            raise OutputError(f"tensor {name!r} needs {expected} bytes, got {raw.nbytes}")
        self._pwrite(self.offsets[name], raw)

    def copy_from(self, name: str, src_fd: int, src_offset: int, n_bytes: int) -> None:
        """Copy a tensor's bytes from another file without passing them through Python."""
        pos = self.offsets[name]
        done = 0
        try:
            while done < n_bytes:
                n = os.copy_file_range(src_fd, self.fd, n_bytes - done, src_offset + done, pos + done)
                if n == 0:
                    raise OutputError(f"unexpected end of the input while copying tensor {name!r}")
                done += n
        except OSError as exc:
            if exc.errno in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP: fall back to read + write
                self._copy_slow(name, src_fd, src_offset + done, n_bytes - done, pos + done)
            else:
                raise OutputError(f"cannot write {self.dest}: {exc.strerror} (errno {exc.errno})") from exc

    def _copy_slow(self, name: str, src_fd: int, src_offset: int, n_bytes: int, pos: int) -> None:
        chunk = 16 << 20
        done = 0
        while done < n_bytes:
            block = os.pread(src_fd, min(chunk, n_bytes - done), src_offset + done)
            if not block:
                raise OutputError(f"unexpected end of the input while copying tensor {name!r}")
            self._pwrite(pos + done, block)
            done += len(block)

    def set_source_sha256(self, digest: str) -> None:
        if self._sha_offset is None:
            return
        assert len(digest) == len(_SHA_PLACEHOLDER)
        os.pwrite(self.fd, digest.encode(), self._sha_offset)

    def commit(self) -> None:
        try:
            os.ftruncate(self.fd, self.end)  # the padding after the last tensor, as GGUFWriter writes it
            os.fsync(self.fd)
        except OSError as exc:
            raise OutputError(f"cannot finish {self.dest}: {exc.strerror} (errno {exc.errno})") from exc
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.dest)
        self._committed = True

    def abort(self) -> None:
        fd = getattr(self, "fd", -1)
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
            self.fd = -1
        if not self._committed:
            with contextlib.suppress(FileNotFoundError):
                self.tmp.unlink()

    def __enter__(self) -> AtomicGGUFWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def write_small_gguf(path: str | os.PathLike[str], arch: str, fill: Callable[[gguf.GGUFWriter], None]) -> Path:
    """A small GGUF container (edit plans, calibrator alignments) through gguf-py's writer, atomically: `fill` adds
    the keys and tensors, the file is written under a temporary name and renamed when complete."""
    path = Path(path)
    with atomic(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            fill(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path


def sha_placeholder() -> str:
    return _SHA_PLACEHOLDER
