"""Toxic and non-toxic texts for discovery: ParaDetox pairs (an embedded 3,000-pair sample by default, or any JSONL
of {"toxic", "neutral"} objects), never the prompts used for evaluation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from pydetox.errors import PydetoxError

EMBEDDED = "paradetox-3000"


@dataclass(frozen=True)
class DiscoveryData:
    toxic: list[str]
    neutral: list[str]  # neutral[i] is the paraphrase of toxic[i]
    source: str


def _read(spec: str) -> tuple[list[dict[str, str]], str]:
    if spec == EMBEDDED:
        text = resources.files("pydetox.data").joinpath("paradetox-3000.jsonl").read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()], "ParaDetox (embedded 3,000-pair sample)"
    path = Path(spec)
    if not path.is_file():
        raise PydetoxError(f"expected a JSONL file of {{\"toxic\", \"neutral\"}} pairs at {path}, found nothing")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                rows.append({"toxic": str(row["toxic"]), "neutral": str(row["neutral"])})
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise PydetoxError(f"{path}:{n}: expected an object with 'toxic' and 'neutral', found {line[:80]!r}") from exc
    return rows, str(path)


def usable_pairs(spec: str = EMBEDDED, exclude: set[str] | None = None) -> tuple[list[dict[str, str]], str]:
    """Every pair of `spec` and its description; pairs whose text is in `exclude` (evaluation prompts) dropped."""
    rows, source = _read(spec)
    if exclude:
        low = {e.strip().lower() for e in exclude}
        rows = [r for r in rows if r["toxic"].strip().lower() not in low and r["neutral"].strip().lower() not in low]
    return rows, source


def load_pairs(spec: str = EMBEDDED, n: int = 500, seed: int = 0, exclude: set[str] | None = None) -> DiscoveryData:
    """`n` pairs drawn with `seed`; pairs whose text is in `exclude` (evaluation prompts) are dropped first."""
    rows, source = usable_pairs(spec, exclude)
    if len(rows) < n:
        raise PydetoxError(f"{source} has {len(rows)} usable pairs; {n} were asked for")
    idx = np.random.default_rng(seed).choice(len(rows), n, replace=False)
    pick = [rows[int(i)] for i in sorted(idx)]
    return DiscoveryData([r["toxic"] for r in pick], [r["neutral"] for r in pick], source)
