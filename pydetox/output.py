"""The one way pydetox writes a file: checked before the work starts, written under a temporary name, renamed when
complete.

`Outputs` is made once per command with the files the command reads (`inputs`) and whether the user passed
`--force`. `claim(path)` checks an output before any work is done and refuses:
- a path that is a folder, or whose folder does not exist or cannot be written;
- a path that is, or links to, one of the inputs (even with --force: an input is never replaced);
- a path claimed twice by the same command (`--report out.gguf -o out.gguf`);
- an existing file, unless --force.
It also removes temporary files of the same output's naming that an interrupted run left behind (a process killed
before it could clean up), and says so.

Files are written by `write_text`/`write_bytes`, or by any library through `atomic(path)`, which hands out a
temporary path in the destination folder (`.NAME.PID-RANDOM.tmp`) and renames it over the destination only when
the block finishes without an exception (`os.replace` is atomic on POSIX). A failure or Ctrl-C removes it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydetox.errors import OutputError

# When this process started: a temporary file of an output's naming older than this, whose writer is not running,
# was left by an earlier run.
PROCESS_START = time.time()
_TMP = re.compile(r"^\.(?P<name>.+)\.(?:(?P<pid>\d+)-)?[0-9a-f]{12}\.tmp$")


def temporary_name(dest: Path) -> Path:
    """A fresh temporary path beside `dest`, of the naming `stale_temporaries` recognises."""
    return dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process of another user
    return True


def stale_temporaries(dest: Path) -> list[Path]:
    """Temporary files of `dest`'s naming that no running process is writing: the ones that name their writer's pid
    when that process is gone, the older ones (no pid in the name) when they predate this process."""
    folder = dest.parent if str(dest.parent) else Path(".")
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        m = _TMP.match(entry.name)
        if m is None or m["name"] != dest.name or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(m["pid"]) if m["pid"] else None
        if pid == os.getpid():
            continue
        try:
            old = entry.stat(follow_symlinks=False).st_mtime < PROCESS_START
        except OSError:
            continue
        if (pid is not None and not _running(pid)) or (pid is None and old):
            found.append(Path(entry.path))
    return found


def remove_stale(dest: Path, quiet: bool = False) -> list[Path]:
    removed = []
    for tmp in stale_temporaries(dest):
        try:
            size = tmp.stat().st_size
            tmp.unlink()
        except OSError:
            continue
        removed.append(tmp)
        if not quiet:
            print(f"pydetox: removed {tmp} ({size / 2**20:.1f} MiB), a temporary file an interrupted run left behind",
                  file=sys.stderr)
    return removed


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


class Outputs:
    """The files one command reads and writes; see the module docstring."""

    def __init__(self, inputs: Iterable[str | os.PathLike[str] | None] = (), force: bool = False, quiet: bool = False) -> None:
        self.inputs = [Path(p) for p in inputs if p is not None and str(p) not in ("", "-")]
        self.force = force
        self.quiet = quiet
        self.claimed: dict[Path, str] = {}

    def add_input(self, path: str | os.PathLike[str]) -> None:
        self.inputs.append(Path(path))

    def claim(self, path: str | os.PathLike[str], what: str = "output", force: bool | None = None) -> Path:
        """Check `path` as an output of this command (see the module docstring) and return it."""
        p = Path(path)
        force = self.force if force is None else force
        if p.is_dir():
            raise OutputError(f"{what} {p} is a folder; expected a file path")
        folder = p.parent if str(p.parent) else Path(".")
        if not folder.exists():
            raise OutputError(f"{what} {p}: folder {folder} does not exist; create it first")
        if not folder.is_dir():
            raise OutputError(f"{what} {p}: {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"{what} {p}: folder {folder} is not writable")
        for src in self.inputs:
            same_name = p.absolute() == src.absolute()
            if same_name or (src.exists() and p.exists() and _same(p, src)):
                raise OutputError(f"{what} {p} is the input file {src}{'' if same_name else ' (through a link)'}; "
                                  "inputs are never overwritten, not even with --force: choose another name")
        key = p.resolve()
        if key in self.claimed:
            raise OutputError(f"{what} {p} is also the {self.claimed[key]}; give each output its own name")
        if (p.exists() or p.is_symlink()) and not force:
            raise OutputError(f"{what} {p} exists; pass --force to replace it")
        self.claimed[key] = what
        remove_stale(p, self.quiet)
        return p


@contextlib.contextmanager
def atomic(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside `dest` to write; renamed to `dest` when the block ends without an exception, removed
    otherwise (KeyboardInterrupt included)."""
    dest = Path(dest)
    tmp = temporary_name(dest)
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError(f"nothing was written to {dest}")
        os.replace(tmp, dest)
    except OSError as exc:
        raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_bytes(dest: str | os.PathLike[str], data: bytes) -> Path:
    with atomic(dest) as tmp:
        # 0666 less the umask, as any file a user writes (tempfile.mkstemp would make it 0600)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(dest)


def write_text(dest: str | os.PathLike[str], text: str) -> Path:
    return write_bytes(dest, text.encode("utf-8"))
