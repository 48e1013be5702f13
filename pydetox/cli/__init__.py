"""The `pydetox` command: one module per command group, each a thin layer over library functions. Heavy imports
happen inside each subcommand, so `pydetox --help` is instant."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from pydetox import __version__
from pydetox.cli.detox import _add_calibrate, _add_detox, _add_sweep
from pydetox.cli.evaluate import _add_compare, _add_eval
from pydetox.cli.models import _add_apply, _add_chat, _add_convert, _add_demo, _add_export_lora, _add_fetch, _add_info
from pydetox.cli.plans import _add_discover, _add_plan
from pydetox.errors import PydetoxError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pydetox", description="Remove toxicity from a language model by editing its "
                                "weights, and ship the result as GGUF files for llama.cpp.")
    p.add_argument("--version", action="version", version=f"pydetox {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_fetch(sub)
    _add_plan(sub)
    _add_apply(sub)
    _add_export_lora(sub)
    _add_info(sub)
    _add_discover(sub)
    _add_detox(sub)
    _add_convert(sub)
    _add_eval(sub)
    _add_compare(sub)
    _add_calibrate(sub)
    _add_sweep(sub)
    _add_chat(sub)
    _add_demo(sub)
    return p


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM (kill, a scheduler's stop) cleans up like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 refused (a PydetoxError: bad input, an output that would be lost), 130 interrupted."""
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        return int(args.func(args))
    except PydetoxError as exc:
        print(f"pydetox: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # the writers have removed their temporary files on the way out; finished outputs stay
        print("pydetox: interrupted; files being written were removed, finished ones kept", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
