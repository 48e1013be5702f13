"""Hundreds of truncated and mutated models and plans: each is either applied or refused with a PydetoxError;
the native core never crashes, no partial output or temporary file is left, and the input is never changed."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import sha256

from pydetox.apply import ApplyOptions, apply_plan
from pydetox.errors import PydetoxError
from pydetox.gguf_io import ModelFile
from pydetox.plan import EditKind, EditPlan, random_plan

N_MODELS = 240
N_PLANS = 160


def mutate(data: bytes, rng: np.random.Generator, header: int) -> bytes:
    buf = bytearray(data)
    how = rng.integers(4)
    if how == 0:  # truncate anywhere
        return bytes(buf[: int(rng.integers(0, len(buf)))])
    if how == 1:  # flip bytes in the header / metadata / tensor infos
        for _ in range(int(rng.integers(1, 6))):
            buf[int(rng.integers(0, header))] ^= int(rng.integers(1, 256))
    elif how == 2:  # overwrite a field-sized run with extreme values
        at = int(rng.integers(0, header - 8))
        buf[at : at + 8] = bytes(rng.choice([b"\xff" * 8, b"\x00" * 8, b"\x7f\xff\xff\xff\xff\xff\xff\x7f"]))
    else:  # damage tensor data (scales of quantized blocks become NaN/inf or garbage)
        for _ in range(int(rng.integers(1, 50))):
            buf[int(rng.integers(header, len(buf)))] = int(rng.choice([0xFF, 0x7C, 0x7E, 0x00]))
    return bytes(buf)


def check_refused_or_done(plan: EditPlan | None, model: Path, out: Path, options: ApplyOptions) -> str:
    before = sha256(model)
    try:
        apply_plan(plan, model, out, options)
        outcome = "applied"
        with ModelFile(out):
            pass  # what was written reads back as a GGUF
        out.unlink()
    except PydetoxError:
        outcome = "refused"
        assert not out.exists()
    assert sha256(model) == before
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    return outcome


@pytest.fixture(scope="module")
def fuzz_base(tiny_q8_tied: Path) -> tuple[bytes, int, EditPlan]:
    data = tiny_q8_tied.read_bytes()
    reader = gguf.GGUFReader(tiny_q8_tied)
    shapes = [(n, t.shape) for n, t in ModelFile(tiny_q8_tied).tensors.items() if n.endswith(("ffn_down.weight", "attn_q.weight"))]
    plan = random_plan("llama", shapes, EditKind.PROJECT_OUT, rank=3, seed=1)
    return data, int(reader.data_offset), plan


def test_mutated_models(fuzz_base: tuple[bytes, int, EditPlan], tmp_path: Path) -> None:
    data, header, plan = fuzz_base
    rng = np.random.default_rng(1234)
    outcomes: dict[str, int] = {}
    for i in range(N_MODELS):
        model = tmp_path / f"m{i}.gguf"
        model.write_bytes(mutate(data, rng, header))
        opts = ApplyOptions(threads=2, progress=False, ftype=gguf.LlamaFileType.MOSTLY_Q8_0 if i % 5 == 0 else None)
        o = check_refused_or_done(plan, model, tmp_path / f"out{i}.gguf", opts)
        outcomes[o] = outcomes.get(o, 0) + 1
        model.unlink()
    # the mutations are strong enough to be refused often, and mild enough to pass sometimes
    assert outcomes.get("refused", 0) > N_MODELS // 4
    assert outcomes.get("applied", 0) > 0


def test_mutated_plans(fuzz_base: tuple[bytes, int, EditPlan], tiny_q8_tied: Path, tmp_path: Path) -> None:
    _, _, plan = fuzz_base
    good = plan.save(tmp_path / "good.plan")
    data = good.read_bytes()
    header = int(gguf.GGUFReader(good).data_offset)
    rng = np.random.default_rng(99)
    refused = 0
    for i in range(N_PLANS):
        path = tmp_path / f"p{i}.plan"
        path.write_bytes(mutate(data, rng, header))
        try:
            loaded = EditPlan.load(path)
        except PydetoxError:
            refused += 1
            continue
        check_refused_or_done(loaded, tiny_q8_tied, tmp_path / f"out{i}.gguf", ApplyOptions(progress=False))
    assert refused > N_PLANS // 4
