"""What the commands share: argument validators, `--param` parsing, output claims."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Any

from pydetox.errors import PydetoxError

if TYPE_CHECKING:
    from pydetox.output import Outputs



def _outputs(args: argparse.Namespace, inputs: list[Any]) -> Outputs:
    """The command's outputs, checked against what it reads (`pydetox.output`)."""
    from pydetox.output import Outputs

    return Outputs(inputs, force=getattr(args, "force", False))


def _overrides(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise PydetoxError(f"--param takes key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _alphas(text: str | None) -> list[float]:
    try:
        values = [float(a) for a in (text or "0.4").split(",")]
    except ValueError:
        raise PydetoxError(f"--alpha takes numbers in [0, 1], comma-separated; got {text!r}") from None
    bad = [a for a in values if not 0.0 <= a <= 1.0]
    if bad:
        raise PydetoxError(f"--alpha takes numbers in [0, 1]; got {bad}")
    return values


def _number(kind: type, test: Any, expected: str) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected  # argparse names the type in its messages
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a whole number >= 1")


_nonnegative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")


_positive_float = _number(float, lambda v: v > 0, "a finite number > 0")


_nonnegative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")


_unit_interval = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


_strength = _number(float, lambda v: 0 <= v <= 10, "a strength in [0, 10]")


DEVICE_ARG: dict[str, Any] = {
    "default": "auto", "choices": ["auto", "cpu", "cuda"],
    "help": "torch device of discovery and calibrator training (default auto: CUDA when torch sees a GPU, else the "
            "CPU; evaluation and apply always run in llama.cpp on the CPU)"}


IGNORE_EOS_HELP = ("ban end-of-text tokens so that every continuation is --max-tokens long (an edit that makes the "
                   "model stop early lowers toxic rates by writing less; this compares at equal length)")
