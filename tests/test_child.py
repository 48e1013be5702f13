"""pydetox.child: a function run in a fresh Python process, its value, its output and its errors brought back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pydetox import child
from pydetox.errors import PydetoxError


def test_a_call_runs_in_another_process_and_returns_its_value_and_peak_memory() -> None:
    done = child.call("os:getpid")
    assert done.value != os.getpid()
    assert 10_000_000 < done.peak_rss < 10_000_000_000  # an interpreter's worth, in bytes
    assert child.call("json:dumps", obj={"a": [1, 2]}, sort_keys=True).value == '{"a": [1, 2]}'


def test_the_childs_output_reaches_this_processs_streams(capsys: pytest.CaptureFixture[str]) -> None:
    assert child.call("os:system", command="echo to stdout; echo to stderr >&2; printf '\\rbar'").value == 0
    out, err = capsys.readouterr()
    assert out == "to stdout\n\rbar"  # relayed as written, a progress bar's carriage return included
    assert err == "to stderr\n"


def test_a_value_that_cannot_be_sent_back_is_an_error() -> None:
    with pytest.raises(child.ChildError, match="cannot pickle 'module' object"):
        child.call("importlib:import_module", name="json")


def test_the_child_runs_with_this_processs_torch_threads() -> None:
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert child.call("torch:get_num_threads").value == 1
    finally:
        torch.set_num_threads(before)


def test_a_pydetox_error_in_the_child_is_raised_here_with_its_message() -> None:
    with pytest.raises(PydetoxError, match="'no-such-model' is neither a file, a known asset"):
        child.call("pydetox.assets:resolve_model", name_or_path="no-such-model")


def test_any_other_failure_raises_a_child_error_with_the_traceback() -> None:
    with pytest.raises(child.ChildError, match=r"(?s)json:loads failed in a child process.*JSONDecodeError"):
        child.call("json:loads", s="{")
    with pytest.raises(ValueError, match="expected a target 'module:function'"):
        child.call("json.loads")


def test_the_child_imports_this_pydetox_whatever_its_working_directory_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A source checkout in the working directory (no compiled core) must not stand in for the installed package:
    the README's main job runs from the repository root."""
    import pydetox

    shadow = tmp_path / "pydetox"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the working directory copy was imported')\n")
    monkeypatch.chdir(tmp_path)
    assert child.call("importlib.util:find_spec", name="pydetox._core").value.origin.startswith(
        str(Path(pydetox.__file__).parent))
