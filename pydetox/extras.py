"""The optional parts of pydetox and the packages they need. `pip install pydetox` gives the engine (apply, plans,
LoRA export) and the evaluation; discovery, calibrator training and `convert` need the `discover` extra (torch,
transformers), `pydetox sweep` the `sweep` extra (Optuna, Ray)."""

from __future__ import annotations

import importlib
from typing import Any

from pydetox.errors import PydetoxError

EXTRAS = {"torch": "discover", "transformers": "discover", "accelerate": "discover", "optuna": "sweep", "ray": "sweep"}


def require(module: str, what: str) -> Any:
    """`module` imported, or a PydetoxError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRAS.get(module.split(".")[0], "all")
        raise PydetoxError(f"{what} needs {module.split('.')[0]}, which is not installed: "
                           f'pip install "pydetox[{extra}]"') from exc
