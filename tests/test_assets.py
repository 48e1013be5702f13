from __future__ import annotations

from pathlib import Path

import pytest

from pydetox.assets import ASSETS, fetch, resolve_model
from pydetox.errors import AssetError


def test_unknown_asset_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="unknown asset 'nope'; known: badwords, bilstm-toxic, clean-text, "):
        fetch("nope", cache=tmp_path)
    with pytest.raises(AssetError, match="neither a file, a known asset"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(AssetError, match=r"org/repo:file\.gguf"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct:model.safetensors")


def test_registry_pins_versions_and_hashes() -> None:
    for asset in ASSETS.values():
        for spec in asset.files:
            assert len(spec.sha256) == 64
            assert all("==" in part.requirement for part in spec.parts)


def test_local_path_is_used_as_is(tiny_f32: Path) -> None:
    assert resolve_model(str(tiny_f32)) == tiny_f32


@pytest.mark.slow
def test_corrupted_cache_is_fetched_again(tmp_path: Path, smollm2: Path) -> None:
    bad = tmp_path / smollm2.name
    bad.write_bytes(b"damaged")
    # a cached file with the wrong hash is replaced by a verified download
    assert fetch("smollm2-135m-instruct", cache=tmp_path, quiet=True).read_bytes()[:4] == b"GGUF"
