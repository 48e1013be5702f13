"""Nothing lost, nothing poisoned: every way a user's typo, reused name, Ctrl-C or kill could destroy a file or ship a
broken model, tried on the CLI with tiny models built here. Each must be refused with exit code 2 (or end with 130
when interrupted) and leave every input byte-identical and no temporary file behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import sha256
from tiny import write_tiny_llama

from pydetox.cli import main
from pydetox.errors import GGUFFileError, OutputError, PlanError
from pydetox.gguf_header import encode_header, read_header
from pydetox.gguf_io import ModelFile
from pydetox.output import Outputs, atomic, stale_temporaries, temporary_name, write_text
from pydetox.plan import EditKind, EditPlan, random_plan

SHAPE = {"d": 64, "ff": 128, "heads": 2, "kv_heads": 1}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    model = write_tiny_llama(tmp_path / "in.gguf", **SHAPE)
    with ModelFile(model) as m:
        shapes = [(n, t.shape) for n, t in m.tensors.items() if n.endswith("ffn_down.weight")]
    plan = random_plan("llama", shapes, EditKind.PROJECT_OUT, rank=2).save(tmp_path / "p.plan.gguf")
    return model, plan


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert "Traceback" not in err


def test_apply_never_writes_over_its_inputs(setup: tuple[Path, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    model, plan = setup
    before = {p: sha256(p) for p in (model, plan)}
    out = tmp_path / "out.gguf"
    refused(["apply", str(plan), str(model), "-o", str(out), "--report", str(model), "--quiet"], capsys,
            "is the input file")
    refused(["apply", str(plan), str(model), "-o", str(out), "--report", str(out), "--quiet"], capsys,
            "is also the output model")
    refused(["apply", str(plan), str(model), "-o", str(plan), "--force", "--quiet"], capsys, "is the input file")
    link = tmp_path / "link.gguf"
    link.symlink_to(model)
    refused(["apply", str(plan), str(model), "-o", str(link), "--force", "--quiet"], capsys, "(through a link)")
    hard = tmp_path / "hard.gguf"
    os.link(model, hard)
    refused(["apply", str(plan), str(model), "-o", str(hard), "--force", "--quiet"], capsys, "(through a link)")
    refused(["apply", str(plan), str(model), "-o", str(out), "--report", str(tmp_path / "nodir" / "r.json"), "--quiet"],
            capsys, "does not exist")
    refused(["apply", str(plan), str(model), "-o", str(tmp_path), "--quiet"], capsys, "is a folder")
    assert not out.exists()
    assert not temporaries(tmp_path)
    assert {p: sha256(p) for p in (model, plan)} == before
    # the report cannot replace an existing file without --force either, and is checked before the work
    report = tmp_path / "r.json"
    report.write_text("keep")
    refused(["apply", str(plan), str(model), "-o", str(out), "--report", str(report), "--quiet"], capsys, "exists")
    assert not out.exists()
    assert report.read_text() == "keep"
    assert main(["apply", str(plan), str(model), "-o", str(out), "--report", str(report), "--force", "--quiet"]) == 0
    assert json.loads(report.read_text())["output"] == str(out)
    card = Path(f"{out}.md").read_text()  # the model card, from the output's own metadata
    assert card.startswith("---\nbase_model: ")
    assert f"`{sha256(plan)}`" in card
    assert "Not evaluated here" in card


def test_plan_commands_refuse_existing_files_and_inputs(setup: tuple[Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    model, plan = setup
    before = sha256(model)
    refused(["plan", "scale", str(plan), "--strength", "0.5", "-o", str(model)], capsys, "exists; pass --force")
    refused(["plan", "scale", str(plan), "--strength", "0.5", "-o", str(plan), "--force"], capsys, "is the input file")
    refused(["plan", "merge", str(plan), str(plan), "-o", str(plan), "--force"], capsys, "is the input file")
    refused(["plan", "random", "--model", str(model), "--tensors", "*", "-o", str(model), "--force"], capsys,
            "is the input file")
    assert sha256(model) == before
    half = tmp_path / "half.plan.gguf"
    assert main(["plan", "scale", str(plan), "--strength", "0.5", "-o", str(half)]) == 0
    refused(["plan", "scale", str(plan), "--strength", "0.25", "-o", str(half)], capsys, "exists; pass --force")
    assert main(["plan", "scale", str(plan), "--strength", "0.25", "-o", str(half), "--force"]) == 0
    assert EditPlan.load(half).params["plan_strength"] == 0.25


def test_eval_checks_its_outputs_before_evaluating(setup: tuple[Path, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = setup
    before = sha256(model)
    refused(["eval", str(model), "--json", str(model), "--quiet"], capsys, "is the input file")
    refused(["eval", str(model), "--json", str(model), "--force", "--quiet"], capsys, "is the input file")
    t0 = time.perf_counter()
    refused(["eval", str(model), "--json", str(tmp_path / "nodir" / "r.json"), "--quiet"], capsys, "does not exist")
    assert time.perf_counter() - t0 < 30  # refused up front, not after an evaluation (generous: no timing claim)
    refused(["eval", str(model), "--plot", str(tmp_path), "--quiet"], capsys, "is a folder")
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat\n")
    refused(["eval", str(model), "--prompts", str(prompts), "--json", str(prompts), "--force", "--quiet"], capsys,
            "is the input file")
    assert sha256(model) == before
    assert prompts.read_text() == "the cat\n"


@pytest.mark.parametrize(("args", "message"), [
    (["--samples", "0"], "--samples: expected a whole number >= 1"),
    (["--samples", "-3"], "--samples: expected a whole number >= 1"),
    (["--limit", "0"], "--limit: expected a whole number >= 1"),
    (["--limit", "-1"], "--limit: expected a whole number >= 1"),
    (["--temperature", "nan"], "--temperature: expected a finite number >= 0"),
    (["--temperature", "-1"], "--temperature: expected a finite number >= 0"),
    (["--top-p", "0"], "--top-p: expected a number in (0, 1]"),
    (["--top-p", "1.5"], "--top-p: expected a number in (0, 1]"),
    (["--max-tokens", "0"], "--max-tokens: expected a whole number >= 1"),
])
def test_eval_arguments_are_checked(setup: tuple[Path, Path], args: list[str], message: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(setup[0]), *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_other_bad_arguments_are_clean_errors(setup: tuple[Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    model, plan = setup
    for argv, message in ((["plan", "random", "--model", str(model), "--tensors", "*", "--rank", "-1", "-o", "x"],
                           "--rank: expected a whole number >= 1"),
                          (["plan", "scale", str(plan), "--strength", "1e30", "-o", "x"], "a strength in [0, 10]"),
                          (["plan", "scale", str(plan), "--strength", "inf", "-o", "x"], "a strength in [0, 10]")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    binary = tmp_path / "p.txt"
    binary.write_bytes(b"the cat\n\xff\xfe bad\n")
    refused(["eval", str(model), "--prompts", str(binary), "--quiet"], capsys, "must be UTF-8 text")
    obj = tmp_path / "p.json"
    obj.write_text(json.dumps({"a": "the cat", "b": "a dog"}))
    refused(["eval", str(model), "--prompts", str(obj), "--quiet"], capsys, "holds a list")
    assert not temporaries(tmp_path)


def test_stale_temporaries_of_a_killed_run_are_removed(setup: tuple[Path, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    model, plan = setup
    out = tmp_path / "out.gguf"
    # what a SIGKILLed apply leaves: its temporary, named with its pid (this one: a pid no process has)
    dead = out.with_name(f".out.gguf.{2**22 + 17}-0123456789ab.tmp")
    dead.write_bytes(b"x" * 1000)
    old = out.with_name(".out.gguf.0123456789ab.tmp")  # the naming before pids were in it
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    alive = out.with_name(f".out.gguf.{os.getppid()}-0123456789ab.tmp")  # a running process's: not touched
    alive.write_bytes(b"x")
    other = out.with_name(f".other.gguf.{2**22 + 17}-0123456789ab.tmp")  # another output's: not touched
    other.write_bytes(b"x")
    assert set(stale_temporaries(out)) == {dead, old}
    assert main(["apply", str(plan), str(model), "-o", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"removed {dead}" in err
    assert f"removed {old}" in err
    assert not dead.exists()
    assert not old.exists()
    assert alive.exists()
    assert other.exists()


def paused_apply(plan: Path, model: Path, out: Path) -> subprocess.Popen[str]:
    """`pydetox apply` in a subprocess, stopped with its output half written (after the first edited tensor, before
    the rename); returns once it says so."""
    script = textwrap.dedent(f"""
        import signal, sys, time, pydetox.apply as a
        # a child of a background job inherits SIGINT ignored; the test sends it, so it must be heard
        signal.signal(signal.SIGINT, signal.default_int_handler)
        real = a._process
        def slow(*args, **kw):
            r = real(*args, **kw)
            print("writing", flush=True)
            time.sleep(60)
            return r
        a._process = slow
        from pydetox.cli import main
        sys.exit(main(["apply", {str(plan)!r}, {str(model)!r}, "-o", {str(out)!r}, "--quiet"]))
    """)
    # cwd away from the checkout: `python -c` puts the cwd first on sys.path, and a checkout's pydetox has no built core
    # when the package is installed non-editable (as CI does).
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=out.parent)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "writing":
        proc.kill()
        pytest.fail(f"the paused apply did not start: {line!r}\n{proc.communicate()[1]}")
    return proc


def test_a_real_sigkill_leaves_a_temporary_that_the_next_run_removes(setup: tuple[Path, Path], tmp_path: Path) -> None:
    model, plan = setup
    out = tmp_path / "out.gguf"
    proc = paused_apply(plan, model, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = temporaries(tmp_path)
    assert len(left) == 1
    assert not out.exists()
    assert main(["apply", str(plan), str(model), "-o", str(out), "--quiet"]) == 0
    assert not temporaries(tmp_path)
    assert out.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_apply_exits_130_and_cleans_up(setup: tuple[Path, Path], tmp_path: Path, sig: int) -> None:
    model, plan = setup
    out = tmp_path / "out.gguf"
    proc = paused_apply(plan, model, out)
    assert len(temporaries(tmp_path)) == 1
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["pydetox: interrupted; files being written were removed, finished ones kept"]
    assert not temporaries(tmp_path)
    assert not out.exists()


def test_corrupt_plan_is_refused_by_its_checksum(setup: tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    model, plan = setup
    data = bytearray(plan.read_bytes())
    start = int(gguf.GGUFReader(plan).data_offset)
    for i in (start + 5, start + 77, start + 301):  # three bytes of the arrays: a value of ~1e36 where one was ~0.1
        data[i] ^= 0x7C
    bad = tmp_path / "bad.plan.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(PlanError, match="is corrupt: its content does not match the checksum"):
        EditPlan.load(bad)
    refused(["apply", str(bad), str(model), "-o", str(tmp_path / "o.gguf"), "--quiet"], capsys, "is corrupt")
    assert not (tmp_path / "o.gguf").exists()


def _rewrite_tensor_infos(model: Path, dest: Path, change: dict[str, object]) -> Path:
    """`model` with the first tensor's info changed (name or offset), its data left where it was."""
    h = read_header(model)
    first = h.tensors[0]
    infos = [first.__class__(str(change.get("name", first.name)), first.ne, first.qtype_id,
                             int(change.get("offset", first.offset))), *h.tensors[1:]]  # type: ignore[call-overload]
    head = encode_header([kv.raw for kv in h.kvs.values()], infos, h.alignment)
    data = model.read_bytes()[h.data_offset :]
    dest.write_bytes(head + data)
    return dest


def test_reader_refuses_overlapping_data_and_bad_names(setup: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = setup
    h = read_header(model)
    overlapping = _rewrite_tensor_infos(model, tmp_path / "overlap.gguf", {"offset": h.tensors[3].offset})
    with pytest.raises(GGUFFileError, match="tensor data must follow in order"):
        ModelFile(overlapping)
    nul = _rewrite_tensor_infos(model, tmp_path / "nul.gguf", {"name": "token_embd\x00.weight"})
    with pytest.raises(GGUFFileError, match="is not a valid name"):
        ModelFile(nul)
    long = _rewrite_tensor_infos(model, tmp_path / "long.gguf", {"name": "t" * 64})
    with pytest.raises(GGUFFileError, match="is not a valid name"):
        ModelFile(long)
    assert ModelFile(_rewrite_tensor_infos(model, tmp_path / "same.gguf", {})).tensors  # the rewrite itself is sound


def test_quantized_result_out_of_range_is_refused(tmp_path: Path) -> None:
    """Finite float weights beyond F16's range would become inf in an F16 model: refused, not written."""
    from pydetox.apply import ApplyOptions, apply_plan
    from pydetox.errors import PydetoxError

    model = write_tiny_llama(tmp_path / "in.gguf", **SHAPE)
    with ModelFile(model) as m:
        name, entry = next((n, t) for n, t in m.tensors.items() if n.endswith("ffn_down.weight"))
    gains = np.full(entry.rows, 1e6, np.float32)  # rows scaled to ~1e5: finite in F32, inf in F16
    from pydetox.plan import Edit

    plan = EditPlan("llama", [Edit(name, EditKind.SCALE_ROWS, entry.shape, gains)])
    with pytest.raises(PydetoxError, match=r"NaN/inf|times its own norm"):
        apply_plan(plan, model, tmp_path / "o.gguf", ApplyOptions(progress=False, max_edit=1e12,
                                                                   ftype=gguf.LlamaFileType.MOSTLY_F16))
    assert not [p for p in tmp_path.iterdir() if p.name != "in.gguf"]


def test_outputs_unit(tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_text("a")
    outs = Outputs([src])
    with pytest.raises(OutputError, match="is the input file"):
        outs.claim(tmp_path / "." / "a.txt")
    b = outs.claim(tmp_path / "b.txt")
    with pytest.raises(OutputError, match="is also the output"):
        outs.claim(b)
    write_text(b, "b")
    assert b.read_text() == "b"
    assert not temporaries(tmp_path)

    def fail_halfway() -> None:
        with atomic(tmp_path / "c.txt") as tmp:
            tmp.write_text("half")
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        fail_halfway()
    assert not (tmp_path / "c.txt").exists()
    assert not temporaries(tmp_path)
    assert temporary_name(b).name.startswith(f".b.txt.{os.getpid()}-")


def test_detox_refuses_to_replace_an_earlier_run_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)
    out = tmp_path / "dx"
    out.mkdir()
    (out / "report.json").write_text("{}")
    refused(["detox", "--model", str(model), "--method", "aura", "--types", "F16", "--out", str(out), "--quiet"], capsys,
            "holds the results of an earlier run (report.json); pass --force")
    assert (out / "report.json").read_text() == "{}"
    # an input named like one of the job's outputs is refused even with --force: a plan where the job saves its own
    with ModelFile(model) as m:
        shapes = [(n, t.shape) for n, t in m.tensors.items() if n.endswith("ffn_down.weight")]
    inside = random_plan("llama", shapes, EditKind.PROJECT_OUT, rank=2).save(out / "aura.plan.gguf")
    before = sha256(inside)
    refused(["detox", "--model", str(model), "--method", "aura", "--plan", str(inside), "--types", "F16",
             "--out", str(out), "--force", "--quiet"], capsys, "is the input file")
    assert sha256(inside) == before
    assert (out / "report.json").read_text() == "{}"


def test_eval_sizes_the_context_by_wave_and_cuts_overlong_prompts(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from pydetox.evaluate import cut_prompt, wave_context

    assert wave_context([5000, 3, 3, 3], 2, 20) == 5020 + 23
    assert wave_context([3, 3, 5000, 3], 2, 20) == 5043
    assert wave_context([], 16, 20) == 0
    assert cut_prompt(list(range(10)), 4) == [0, 7, 8, 9]
    assert cut_prompt([1, 2], 4) == [1, 2]
    model = write_tiny_llama(tmp_path / "m.gguf", **SHAPE)  # trained context: 256 tokens
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat\n" + "the dog was in the cat " * 400 + "\na dog is\n")
    out = tmp_path / "r.json"
    assert main(["eval", str(model), "--prompts", str(prompts), "--max-tokens", "5", "--ppl-tokens", "0", "--batch", "2",
                 "--evaluators", "profanity-check", "--json", str(out), "--quiet"]) == 0
    assert "1 prompt(s) longer than the model's trained context (256 tokens)" in capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["settings"]["n_prompts"] == 3
    assert report["settings"]["limit"] is None
    assert main(["eval", str(model), "--prompts", str(prompts), "--limit", "50", "--max-tokens", "5", "--ppl-tokens", "0",
                 "--evaluators", "profanity-check", "--json", str(out), "--force", "--quiet"]) == 0
    assert json.loads(out.read_text())["settings"]["n_prompts"] == 3  # the prompts used, not the --limit asked for
