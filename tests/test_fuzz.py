"""Hundreds of truncated and mutated models and plans: each is either applied or refused with a PydetoxError;
the native core never crashes, nothing written holds a NaN or inf, no partial output or temporary file is left, and
the inputs are never changed."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import sha256

from pydetox.apply import MAX_EDIT, ApplyOptions, apply_plan
from pydetox.errors import PydetoxError
from pydetox.gguf_io import ModelFile
from pydetox.plan import Edit, EditKind, EditPlan, random_plan

N_MODELS = 240
N_PLANS = 240  # mutated plan files
N_VALUES = 200  # plans with mutated values (what a bug or a hand-made plan could hold), applied directly


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


def all_finite(path: Path) -> bool:
    for t in gguf.GGUFReader(path).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        if not np.all(np.isfinite(values)):
            return False
    return True


def check_refused_or_done(plan: EditPlan | None, model: Path, out: Path, options: ApplyOptions,
                          plan_file: Path | None = None) -> str:
    inputs = [model] + ([plan_file] if plan_file else [])
    before = [sha256(p) for p in inputs]
    try:
        report = apply_plan(plan, model, out, options)
        outcome = "applied"
        with ModelFile(out):
            pass  # what was written reads back as a GGUF
        assert all_finite(out), "an output holds NaN or inf"
        assert all(t.rel_edit is None or t.rel_edit <= options.max_edit for t in report.tensors)
        out.unlink()
    except PydetoxError:
        outcome = "refused"
        assert not out.exists()
    assert [sha256(p) for p in inputs] == before
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
    """A plan file damaged anywhere is refused on load (its checksum), or loads unchanged (a byte of padding)."""
    _, _, plan = fuzz_base
    good = plan.save(tmp_path / "good.plan")
    data = good.read_bytes()
    header = int(gguf.GGUFReader(good).data_offset)
    rng = np.random.default_rng(99)
    refused = unchanged = 0
    for i in range(N_PLANS):
        path = tmp_path / f"p{i}.plan"
        path.write_bytes(mutate(data, rng, header))
        try:
            loaded = EditPlan.load(path)
        except PydetoxError:
            refused += 1
            continue
        assert [e.tensor for e in loaded.edits] == [e.tensor for e in plan.edits]
        assert all(np.array_equal(a.a, b.a) for a, b in zip(loaded.edits, plan.edits, strict=True))
        unchanged += 1
        check_refused_or_done(loaded, tiny_q8_tied, tmp_path / f"out{i}.gguf", ApplyOptions(progress=False), path)
    assert refused > N_PLANS * 3 // 4


def _mutated_values(rng: np.random.Generator, shapes: list[tuple[str, tuple[int, int]]]) -> EditPlan:
    kind = [EditKind.LOW_RANK, EditKind.SCALE_ROWS, EditKind.SCALE_COLS, EditKind.PROJECT_OUT][int(rng.integers(4))]
    plan = random_plan("llama", shapes, kind, rank=2, seed=int(rng.integers(1 << 30)))
    edits = []
    for e in plan.edits:
        a = e.a.copy()
        how = int(rng.integers(4))
        if how == 0:  # values blown up by up to 1e30 (a strength of 1e30, a flipped exponent bit)
            a *= np.float32(10.0 ** rng.uniform(0, 30))
        elif how == 1:  # one value replaced by an extreme or non-finite one
            a.flat[int(rng.integers(a.size))] = rng.choice([np.inf, -np.inf, np.nan, 3e38, -3e38, 1e20])
        elif how == 2:  # gains of a projection far outside [0, 1]
            gain = (rng.standard_normal(a.shape[0]) * 10.0 ** rng.uniform(0, 8)).astype(np.float32) \
                if kind is EditKind.PROJECT_OUT else None
            edits.append(Edit(e.tensor, e.kind, e.shape, a, e.b, gain, e.source))
            continue
        edits.append(Edit(e.tensor, e.kind, e.shape, a, e.b, e.gain, e.source))
    return EditPlan(plan.arch, edits, "fuzz")


def test_plans_with_extreme_values(tiny_q8_tied: Path, tmp_path: Path) -> None:
    """Plans whose numbers are absurd (what a corrupt or over-scaled plan holds) are refused, not written: apply checks
    every edited tensor for NaN/inf and for an edit beyond ApplyOptions.max_edit."""
    shapes = [(n, t.shape) for n, t in ModelFile(tiny_q8_tied).tensors.items() if n.endswith(("ffn_down.weight", "attn_q.weight"))]
    rng = np.random.default_rng(7)
    outcomes: dict[str, int] = {}
    for i in range(N_VALUES):
        plan = _mutated_values(rng, shapes)
        for fmt in ([None, gguf.LlamaFileType.MOSTLY_F16] if i % 4 == 0 else [None]):
            opts = ApplyOptions(progress=False, verify=i % 2 == 0, ftype=fmt)
            o = check_refused_or_done(plan, tiny_q8_tied, tmp_path / f"v{i}.gguf", opts)
            outcomes[o] = outcomes.get(o, 0) + 1
    assert outcomes.get("refused", 0) > N_VALUES // 3
    assert outcomes.get("applied", 0) > 0


def test_strength_far_beyond_the_plan_is_refused(tiny_q8_tied: Path, tmp_path: Path) -> None:
    shapes = [(n, t.shape) for n, t in ModelFile(tiny_q8_tied).tensors.items() if n.endswith("ffn_down.weight")]
    plan = random_plan("llama", shapes, EditKind.LOW_RANK, rank=2, seed=3)
    huge = EditPlan(plan.arch, [Edit(e.tensor, e.kind, e.shape, e.a * np.float32(1e6), e.b) for e in plan.edits], "x")
    for verify in (True, False):
        with pytest.raises(PydetoxError, match="times its own norm"):
            apply_plan(huge, tiny_q8_tied, tmp_path / "o.gguf", ApplyOptions(progress=False, verify=verify))
        assert not list(tmp_path.iterdir())
    # the bound is a stated number a user can lift: the same plan is then written (its values are finite)
    report = apply_plan(huge, tiny_q8_tied, tmp_path / "o.gguf", ApplyOptions(progress=False, max_edit=1e12))
    assert max(t.rel_edit or 0 for t in report.tensors) > MAX_EDIT
