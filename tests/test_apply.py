"""The engine on tiny real GGUF files: correctness against the references, byte-for-byte copies, llama.cpp's own
type mix and bytes, provenance, and refusal of bad requests with nothing left behind."""

from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import sha256

from pydetox import gguf_io
from pydetox import reference as R
from pydetox.apply import ApplyOptions, apply_plan
from pydetox.errors import OutputError, PlanMismatchError, PydetoxError, UnsupportedTypeError
from pydetox.gguf_io import ModelFile
from pydetox.kernels import dequantize
from pydetox.plan import Edit, EditKind, EditPlan, random_orthonormal, random_plan

Q = gguf.GGMLQuantizationType
FFN_DOWN = "blk.1.ffn_down.weight"
ATTN_OUT = "blk.0.attn_output.weight"
FFN_UP = "blk.1.ffn_up.weight"


def matrix(model: ModelFile, name: str) -> np.ndarray:
    t = model.tensors[name]
    return dequantize(model.read(t), t.qtype, t.rows, t.cols)


def two_edit_plan(path: Path, seed: int = 0) -> EditPlan:
    rng = np.random.default_rng(seed)
    with ModelFile(path) as m:
        down, att, up = m.tensors[FFN_DOWN].shape, m.tensors[ATTN_OUT].shape, m.tensors[FFN_UP].shape
        arch = m.arch
    return EditPlan(arch, [
        Edit(FFN_DOWN, EditKind.PROJECT_OUT, down, random_orthonormal(rng, 4, down[0])),
        Edit(ATTN_OUT, EditKind.PROJECT_IN, att, random_orthonormal(rng, 3, att[1]), gain=np.full(3, 0.25, np.float32)),
        Edit(ATTN_OUT, EditKind.SCALE_ROWS, att, rng.uniform(0.5, 1, att[0]).astype(np.float32)),
        Edit(FFN_UP, EditKind.ADD_ROWS, up, np.array([up[0] - 1, 0, 5], np.float32),
             rng.standard_normal((3, up[1])).astype(np.float32)),
    ], method="test")


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_edit_keeps_types_copies_the_rest_and_matches_reference(tiny_f32: Path, tmp_path: Path) -> None:
    before = sha256(tiny_f32)
    plan = two_edit_plan(tiny_f32)
    plan_path = plan.save(tmp_path / "plan.gguf")
    out = tmp_path / "out.gguf"
    report = apply_plan(plan, tiny_f32, out, ApplyOptions(threads=2, progress=False), plan_path=plan_path)
    assert sha256(tiny_f32) == before
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not a private temporary
    with ModelFile(tiny_f32) as src, ModelFile(out) as dst:
        assert list(src.tensors) == list(dst.tensors)
        for name, t in src.tensors.items():
            assert dst.tensors[name].qtype == t.qtype
            if name not in (FFN_DOWN, ATTN_OUT, FFN_UP):
                assert dst.read(dst.tensors[name]).tobytes() == src.read(t).tobytes(), name
        w0 = matrix(src, FFN_DOWN)
        np.testing.assert_allclose(matrix(dst, FFN_DOWN), R.project_out(w0, plan.edits[0].a), atol=2e-5)
        a0 = matrix(src, ATTN_OUT)
        want = R.scale_rows(R.project_in(a0, plan.edits[1].a, plan.edits[1].gain), plan.edits[2].a)
        np.testing.assert_allclose(matrix(dst, ATTN_OUT), want, atol=2e-5)
        want = R.add_rows(matrix(src, FFN_UP), plan.edits[3].a, plan.edits[3].b)
        np.testing.assert_allclose(matrix(dst, FFN_UP), want, atol=2e-5)
        # metadata is preserved, provenance is added
        for key, kv in src.header.kvs.items():
            assert dst.header.kvs[key].raw == kv.raw, key  # copied as stored
        assert gguf.GGUFReader(out).fields[gguf.Keys.General.NAME].contents() == "tiny-llama-test"  # gguf-py reads it
        assert dst.get_field(gguf_io.KEY_SOURCE_SHA256) == before
        assert dst.get_field(gguf_io.KEY_PLAN_SHA256) == sha256(plan_path)
        assert dst.get_field(gguf_io.KEY_PLAN_METHOD) == "test"
    by_name = {t.name: t for t in report.tensors}
    assert by_name[FFN_DOWN].action == "edit"
    assert by_name["blk.0.ffn_up.weight"].action == "copy"
    assert by_name[FFN_DOWN].edits[0].survival < 1e-5  # F32 output: nothing comes back
    assert by_name[ATTN_OUT].edits[1].survival is None  # scaling has no "removed component"
    assert set(report.timings) >= {"read", "dequantize", "edit", "quantize", "write", "total"}
    json.dumps(report.to_json())
    assert "leakage" in report.table()


def test_type_mix_and_bytes_equal_llama_quantize(tiny_f32: Path, tmp_path: Path) -> None:
    import llama_cpp

    ours = tmp_path / "ours.gguf"
    apply_plan(None, tiny_f32, ours, ApplyOptions(ftype=gguf.LlamaFileType.MOSTLY_Q4_K_M, threads=3, progress=False))
    theirs = tmp_path / "theirs.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(tiny_f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    with ModelFile(ours) as a, ModelFile(theirs) as b:
        assert {n: t.qtype for n, t in a.tensors.items()} == {n: t.qtype for n, t in b.tensors.items()}
        assert {t.qtype for t in a.tensors.values()} >= {Q.Q4_K, Q.Q6_K}
        for name, t in a.tensors.items():
            assert a.read(t).tobytes() == b.read(b.tensors[name]).tobytes(), name
        assert a.get_field(gguf.Keys.General.FILE_TYPE) == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)


def test_edited_quantized_output_runs_in_llama_cpp(tiny_f32: Path, tmp_path: Path) -> None:
    from pydetox.runtime import load_llama

    plan = two_edit_plan(tiny_f32, seed=3)
    out = tmp_path / "q.gguf"
    report = apply_plan(plan, tiny_f32, out, ApplyOptions(ftype=gguf.LlamaFileType.MOSTLY_Q4_K_M, progress=False))
    leak = [e.survival for t in report.tensors for e in t.edits if e.survival is not None]
    assert leak
    assert all(0 < x < 0.5 for x in leak)  # quantization brings a little of the subspace back
    llm = load_llama(out, n_ctx=64, seed=0)
    result = llm("the cat", max_tokens=6, temperature=0.0)
    assert result["usage"]["completion_tokens"] > 0


def test_edited_tensors_keep_a_type_floor(tiny_f32: Path, tmp_path: Path) -> None:
    """--edited-type Q8_0 at Q4_K_M: the edited tensors get Q8_0 and keep more of the edit; every other tensor gets
    exactly llama.cpp's type and bytes, as without the floor."""
    plan = two_edit_plan(tiny_f32, seed=4)
    plain, floored = tmp_path / "plain.gguf", tmp_path / "floor.gguf"
    ftype = gguf.LlamaFileType.MOSTLY_Q4_K_M
    r0 = apply_plan(plan, tiny_f32, plain, ApplyOptions(ftype=ftype, progress=False))
    r1 = apply_plan(plan, tiny_f32, floored, ApplyOptions(ftype=ftype, progress=False, edited_floor=Q.Q8_0))
    edited = {FFN_DOWN, ATTN_OUT, FFN_UP}
    with ModelFile(plain) as a, ModelFile(floored) as b:
        for name, t in a.tensors.items():
            if name in edited:
                assert b.tensors[name].qtype == Q.Q8_0
            else:
                assert b.tensors[name].qtype == t.qtype
                assert b.read(b.tensors[name]).tobytes() == a.read(t).tobytes()
    leak = {rep.name: max(e.survival or 0 for e in rep.edits) for rep in r0.tensors if rep.name in edited}
    leak_floor = {rep.name: max(e.survival or 0 for e in rep.edits) for rep in r1.tensors if rep.name in edited}
    assert leak_floor[FFN_DOWN] < leak[FFN_DOWN] / 2, (leak, leak_floor)  # the project_out edit
    assert leak_floor[ATTN_OUT] < leak[ATTN_OUT], (leak, leak_floor)


def test_tied_output_edit_adds_an_output_tensor(tiny_q8_tied: Path, tmp_path: Path) -> None:
    from pydetox.runtime import load_llama

    embd = "token_embd.weight"
    with ModelFile(tiny_q8_tied) as m:
        shape = m.tensors[embd].shape
        assert "output.weight" not in m.tensors
        e0 = matrix(m, embd)
    rng = np.random.default_rng(5)
    plan = EditPlan("llama", [Edit("output.weight", EditKind.PROJECT_IN, shape, random_orthonormal(rng, 4, shape[1]),
                                   gain=np.full(4, 0.1, np.float32), source=embd)])
    out = tmp_path / "untied.gguf"
    report = apply_plan(plan, tiny_q8_tied, out, ApplyOptions(progress=False))
    assert report.tensors[-1].action == "create"
    with ModelFile(out) as m:
        assert m.tensors["output.weight"].qtype == Q.Q8_0
        np.testing.assert_array_equal(matrix(m, embd), e0)  # the input embedding is untouched
        want = R.project_in(e0, plan.edits[0].a, plan.edits[0].gain)
        assert np.abs(matrix(m, "output.weight") - want).max() < 0.05  # Q8_0 step on |w| < 1
    llm = load_llama(out, n_ctx=64, seed=0)
    assert llm("the dog", max_tokens=4, temperature=0.0)["usage"]["completion_tokens"] > 0


def _write_legacy_imatrix(path: Path, entries: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, values in entries.items():
            f.write(struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", 1, values.size))
            f.write(values.astype("<f4").tobytes())


def test_iq_types_need_an_importance_matrix(tiny_f32: Path, tmp_path: Path) -> None:
    plan = random_plan("llama", [(FFN_DOWN, (256, 512))], EditKind.PROJECT_OUT, rank=2)
    out = tmp_path / "iq.gguf"
    with pytest.raises(UnsupportedTypeError, match="needs an importance matrix, but no --imatrix was given"):
        apply_plan(plan, tiny_f32, out, ApplyOptions(ftype=gguf.LlamaFileType.MOSTLY_IQ2_XXS, progress=False))
    assert not out.exists()
    assert not leftovers(tmp_path)
    with ModelFile(tiny_f32) as m:
        entries = {n: np.ones(t.cols, np.float32) for n, t in m.tensors.items() if len(t.ne) == 2}
    imat = tmp_path / "imatrix.dat"
    _write_legacy_imatrix(imat, entries)
    apply_plan(plan, tiny_f32, out, ApplyOptions(ftype=gguf.LlamaFileType.MOSTLY_IQ2_XXS, imatrix=imat, progress=False))
    with ModelFile(out) as m:
        assert m.tensors[FFN_DOWN].qtype in {Q.IQ2_XXS, Q.IQ2_XS, Q.Q2_K, Q.IQ3_XXS, Q.Q4_K}
        assert any(t.qtype == Q.IQ2_XXS for t in m.tensors.values())


def test_bad_requests_leave_nothing(tiny_f32: Path, tmp_path: Path) -> None:
    before = sha256(tiny_f32)
    plan = two_edit_plan(tiny_f32)
    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="exists; pass --force"):
        apply_plan(plan, tiny_f32, existing, ApplyOptions(progress=False))
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(OutputError, match="is the input file"):
        apply_plan(plan, tiny_f32, tiny_f32, ApplyOptions(progress=False, overwrite=True))
    with pytest.raises(OutputError, match="does not exist"):
        apply_plan(plan, tiny_f32, tmp_path / "nope" / "out.gguf", ApplyOptions(progress=False))
    other = random_plan("gemma3", [(FFN_DOWN, (256, 512))], EditKind.PROJECT_OUT, rank=2)
    with pytest.raises(PlanMismatchError, match="architecture"):
        apply_plan(other, tiny_f32, tmp_path / "o.gguf", ApplyOptions(progress=False))
    wrong = random_plan("llama", [(FFN_DOWN, (512, 256))], EditKind.PROJECT_OUT, rank=2)
    with pytest.raises(PlanMismatchError, match="the model's is 256x512"):
        apply_plan(wrong, tiny_f32, tmp_path / "o.gguf", ApplyOptions(progress=False))
    from pydetox.ggml import parse_ftype

    with pytest.raises(PydetoxError, match="unknown model type"):
        parse_ftype("Q4_K_Z")
    assert not (tmp_path / "o.gguf").exists()
    assert not leftovers(tmp_path)
    assert sha256(tiny_f32) == before


def test_uncreatable_output_is_refused(tiny_f32: Path) -> None:
    # /proc refuses new files even to root, so this fails the same way for every user.
    with pytest.raises(OutputError, match="cannot create"):
        apply_plan(None, tiny_f32, Path("/proc/pydetox-out.gguf"), ApplyOptions(progress=False))


def test_full_disk_leaves_no_partial_file(tiny_f32: Path, tmp_path: Path) -> None:
    # RLIMIT_FSIZE makes writes past 1 MiB fail with EFBIG, as a full disk fails them with ENOSPC.
    out = tmp_path / "full.gguf"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        from pydetox.apply import ApplyOptions, apply_plan
        from pydetox.errors import OutputError
        try:
            opts = ApplyOptions(ftype=__import__("gguf").LlamaFileType.MOSTLY_F16, progress=False)
            apply_plan(None, {str(tiny_f32)!r}, {str(out)!r}, opts)
        except OutputError as exc:
            print("OutputError:", exc)
            sys.exit(3)
    """)
    # cwd: `python -c` puts the working folder on sys.path, where a source checkout would shadow the installed package
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "File too large" in proc.stdout
    assert not out.exists()
    assert not leftovers(tmp_path)


def test_gguf_importance_matrix_is_read(tmp_path: Path) -> None:
    from pydetox.imatrix import load_imatrix

    path = tmp_path / "imatrix.gguf"
    w = gguf.GGUFWriter(path, "imatrix")
    w.add_tensor("blk.0.ffn_down.weight.in_sum2", np.array([[2.0, 4.0, 6.0]], np.float32))
    w.add_tensor("blk.0.ffn_down.weight.counts", np.array([2.0], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = load_imatrix(path)
    np.testing.assert_array_equal(got["blk.0.ffn_down.weight"], [1.0, 2.0, 3.0])


def test_merged_plan_equals_its_plans_applied_in_turn(tiny_f32: Path, tmp_path: Path) -> None:
    """`plan merge A B` applied once gives the model A then B give, also where both edit one tensor."""
    from pydetox.cli import main

    a, b = two_edit_plan(tiny_f32, seed=1), two_edit_plan(tiny_f32, seed=2)
    pa, pb = a.save(tmp_path / "a.gguf"), b.save(tmp_path / "b.gguf")
    assert main(["plan", "merge", str(pa), str(pb), "-o", str(tmp_path / "ab.gguf")]) == 0
    ab = EditPlan.load(tmp_path / "ab.gguf")
    assert ab.method == "test+test"
    assert [m["file"] for m in ab.params["merged"]] == ["a.gguf", "b.gguf"]
    opts = ApplyOptions(threads=2, progress=False)
    apply_plan(a, tiny_f32, tmp_path / "x.gguf", opts)
    apply_plan(b, tmp_path / "x.gguf", tmp_path / "xy.gguf", opts)
    apply_plan(ab, tiny_f32, tmp_path / "once.gguf", opts)
    apply_plan(EditPlan.merged([("b", b), ("a", a)]), tiny_f32, tmp_path / "ba.gguf", opts)
    with ModelFile(tmp_path / "xy.gguf") as seq, ModelFile(tmp_path / "once.gguf") as once, \
            ModelFile(tmp_path / "ba.gguf") as swapped:
        for name in (FFN_DOWN, ATTN_OUT, FFN_UP):
            np.testing.assert_allclose(matrix(once, name), matrix(seq, name), atol=1e-5)
        assert not np.allclose(matrix(swapped, FFN_DOWN), matrix(once, FFN_DOWN), atol=1e-3)  # order matters there
    other = EditPlan("gemma3", b.edits, method="x")
    with pytest.raises(PlanMismatchError, match="architecture 'gemma3'"):
        EditPlan.merged([("a", a), ("o", other)])
    assert main(["plan", "merge", str(pa), str(pb), "-o", str(pa)]) != 0
