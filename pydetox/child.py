"""Running a stage in a child process, so that what it leaves in memory goes when it ends.

torch's stages keep memory after their objects are dropped: oneDNN's primitive cache (a primitive per padded matmul
shape) and heap fragments that `heap.release` cannot give back. After the SmolLM2 student, the llama.cpp stages that
followed in the same process peaked at 2.71 GB where they need 1.33 GB alone (docs/speed-distill.md). A stage run
through `call` starts a fresh interpreter, so its memory is the operating system's again when it returns.

The child imports pydetox from where this process did, runs with this process's torch thread count, and writes to
this process's `sys.stdout` and `sys.stderr` (relayed, so that a redirection such as a sweep's log file catches it).
A `PydetoxError` in the child is raised here with its message; any other failure raises `ChildError` with the
child's traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydetox.errors import PydetoxError


class ChildError(RuntimeError):
    """A stage run in a child process failed other than with a PydetoxError (its traceback is the message)."""


@dataclass(frozen=True)
class Outcome:
    value: Any  # what the function returned
    peak_rss: int  # the child's peak resident memory, bytes (VmHWM; ru_maxrss where there is no /proc)


def _relay(pipe: IO[bytes], to: Any) -> None:
    """Copy the child's output to `to` as it comes (progress bars' carriage returns included)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := pipe.read1(65536):  # type: ignore[attr-defined]
        to.write(decoder.decode(chunk))
        to.flush()
    to.write(decoder.decode(b"", final=True))
    to.flush()


# The child's first lines: this pydetox package (argv[1], the folder it was imported from) loaded by its path before
# anything imports `pydetox`, so that neither the working directory (first on a `-c` or `-m` interpreter's path: a
# source checkout there has no compiled `_core`) nor the path's order picks another copy.
_BOOT = """
import importlib.util, sys
from pathlib import Path
init = Path(sys.argv[1]) / "__init__.py"
spec = importlib.util.spec_from_file_location("pydetox", init, submodule_search_locations=[sys.argv[1]])
package = importlib.util.module_from_spec(spec)
sys.modules["pydetox"] = package
spec.loader.exec_module(package)
from pydetox.child import _main
sys.exit(_main(Path(sys.argv[2]), Path(sys.argv[3])))
"""


def call(target: str, **kwargs: Any) -> Outcome:
    """`module:function` called with `kwargs` (picklable) in a fresh Python process; its return value (picklable)
    and the child's peak RSS."""
    module, _, function = target.partition(":")
    if not module or not function:
        raise ValueError(f"expected a target 'module:function', got {target!r}")
    threads = None
    if "torch" in sys.modules:  # the caller may have set it (a sweep's trial: its CPUs)
        threads = sys.modules["torch"].get_num_threads()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # progress lines reach the terminal as they are printed
    with tempfile.TemporaryDirectory(prefix="pydetox-child-") as tmp:
        request, answer = Path(tmp) / "request.pkl", Path(tmp) / "answer.pkl"
        request.write_bytes(pickle.dumps({"module": module, "function": function, "kwargs": kwargs,
                                          "threads": threads}))
        proc = subprocess.Popen([sys.executable, "-c", _BOOT, str(Path(__file__).resolve().parent), str(request),
                                 str(answer)], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        relays = [threading.Thread(target=_relay, args=(pipe, to), daemon=True)
                  for pipe, to in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
        for t in relays:
            t.start()
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C (the child got it as well) or any other interruption: no orphan
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            for t in relays:
                t.join(timeout=10)
        if not answer.is_file():
            raise ChildError(f"{target} ended (exit status {code}) without an answer: killed, or out of memory?")
        out = pickle.loads(answer.read_bytes())
    if "error" in out:
        if out["pydetox_error"]:
            raise PydetoxError(out["error"])
        raise ChildError(f"{target} failed in a child process:\n{out['traceback']}")
    return Outcome(out["value"], out["peak_rss"])


def _main(request: Path, answer: Path) -> int:
    from pydetox.apply import peak_rss_bytes

    job = pickle.loads(request.read_bytes())
    if job["threads"]:
        import torch

        torch.set_num_threads(job["threads"])
    try:
        value = getattr(importlib.import_module(job["module"]), job["function"])(**job["kwargs"])
        data = pickle.dumps({"value": value, "peak_rss": peak_rss_bytes()})
        code = 0
    except Exception as e:  # handed to the parent, which raises it (a value that cannot be pickled included)
        data = pickle.dumps({"error": str(e), "pydetox_error": isinstance(e, PydetoxError),
                             "traceback": traceback.format_exc()})
        code = 1
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
        sys.stderr.flush()
    tmp = answer.with_name(answer.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(answer)
    return code

