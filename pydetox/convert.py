"""HF safetensors -> GGUF (F32, F16, BF16, Q8_0) with llama.cpp's own converter.

pydetox does not write a converter of its own: the tokenizer and architecture handling of llama.cpp's
`convert_hf_to_gguf.py` is large and moves with llama.cpp. The converter, its `conversion/` package and the
matching gguf-py ship in the source distribution of the pinned llama-cpp-python (0.3.36, llama.cpp 0c1e57098bba);
`converter_dir` fetches that archive once through pip (no build: pip only prepares its metadata, with the
scikit-build-core already installed where there is one, else in an isolated environment of pip's), checks its
sha256, and unpacks those parts into the cache. `convert` runs the converter in a subprocess with that
gguf-py first on the path, writes to a temporary name, and renames when complete.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from pydetox.errors import AssetError, PydetoxError
from pydetox.gguf_io import sha256_file
from pydetox.output import Outputs, atomic
from pydetox.paths import cache_dir

REQUIREMENT = "llama-cpp-python==0.3.36"
ARCHIVE_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
ROOT = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def converter_dir(quiet: bool = False) -> Path:
    folder = cache_dir() / "llama-cpp-converter"
    stamp = folder / ".sha256"
    if stamp.is_file() and stamp.read_text().strip() == ARCHIVE_SHA256:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".convert-") as tmp:
        if not quiet:
            print(f"fetching llama.cpp's converter from the {REQUIREMENT} source archive ...", file=sys.stderr)
        # pip prepares the archive's metadata with its build backend: the installed one where there is one (no
        # download), else one pip fetches into an isolated environment (a fresh venv has none).
        isolation = [] if importlib.util.find_spec("scikit_build_core") is None else ["--no-build-isolation"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *isolation, "--no-binary",
               "llama-cpp-python", "-d", tmp, REQUIREMENT]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or len(archives) != 1:
            raise AssetError(f"pip could not download the {REQUIREMENT} source archive:\n{proc.stderr.strip()[-800:]}")
        if sha256_file(archives[0]) != ARCHIVE_SHA256:
            raise AssetError(f"{archives[0].name}: sha256 does not match the pinned {ARCHIVE_SHA256}")
        with tarfile.open(archives[0]) as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(ROOT) and m.name[len(ROOT):].startswith(KEEP) and (m.isfile() or m.isdir()):
                    m.name = m.name[len(ROOT):]
                    members.append(m)
            tar.extractall(folder, members=members, filter="data")
    stamp.write_text(ARCHIVE_SHA256 + "\n")
    return folder


def convert(hf_dir: str | Path, out: str | Path, outtype: str = "f16", overwrite: bool = False) -> Path:
    """Write a GGUF of the HF model in `hf_dir` (config.json, safetensors, tokenizer files) to `out`."""
    hf_dir, out = Path(hf_dir), Path(out)
    if outtype not in OUTTYPES:
        raise PydetoxError(f"unknown output type {outtype!r}; expected one of {', '.join(OUTTYPES)}")
    if not (hf_dir / "config.json").is_file():
        raise PydetoxError(f"expected a Hugging Face model folder with config.json at {hf_dir}")
    Outputs([hf_dir], force=overwrite).claim(out, "output model")
    from pydetox.extras import require

    for module in ("torch", "transformers"):  # llama.cpp's converter imports both
        require(module, "pydetox convert")
    conv = converter_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(conv / "gguf-py"), str(conv), os.environ.get("PYTHONPATH", "")])}
    with atomic(out) as tmp:
        cmd = [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(tmp), "--outtype", outtype]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not tmp.is_file():
            raise PydetoxError(f"llama.cpp's converter failed on {hf_dir}:\n{proc.stderr.strip()[-1500:]}")
    return out
