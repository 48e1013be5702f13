"""An edit plan as a llama.cpp LoRA adapter: the change kept apart from the model, applied at run time.

A low-rank edit W <- W + L^T R is a LoRA update B A with B = L^T (rows x k) and A = R (k x cols). Other kinds are
written as the low-rank update they are, computed against the model's own weights (dequantized to float32):
- project_out: W <- W - U^T diag(1 - g) U W, so B = -U^T diag(1 - g), A = U W (rank k);
- project_in: W <- W - W V^T diag(1 - g) V, so B = -W V^T diag(1 - g), A = V (rank k);
- scale_rows / scale_cols: diag(s) W - W touches only the rows (columns) with s != 1: one selector column (row) per
  changed row (column), rank = how many changed (refused above MAX_RANK: a dense update is not an adapter);
- add_rows: rows r_j gain D_j: B = the selectors of r_j, A = D.
Several edits of one tensor (a merged plan) are composed in order, each against the tensor as the edits before it
left it, and their factors stacked. An edit that creates a tensor the model lacks (the output layer of a model with
tied embeddings) cannot be an adapter: llama.cpp applies adapters to existing tensors only; such plans are refused
with a pointer to `pydetox apply`.

The file is what llama.cpp's loader reads (src/llama-adapter.cpp): `general.type = adapter`, `general.architecture`
the model's, `adapter.type = lora`, `adapter.lora.alpha`, and per tensor `NAME.lora_a` (numpy (k, cols), ggml ne
[cols, k]) and `NAME.lora_b` (numpy (rows, k), ggml ne [k, rows]). llama.cpp scales an update by alpha / k (k of that
tensor) times the runtime scale; alpha is the first tensor's rank and every other tensor's B is multiplied by its
k / alpha, so that scale 1 is the plan at strength 1 for every tensor. An adapter applied to a quantized model is
never requantized: none of the edit leaks through the quantization, at the cost of two small matrix products per
edited tensor at run time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt

from pydetox import __version__, keys
from pydetox.errors import PlanError, PydetoxError
from pydetox.gguf_io import BackgroundHash, ModelFile, sha256_file
from pydetox.output import Outputs, atomic
from pydetox.plan import Edit, EditKind, EditPlan

F32 = npt.NDArray[np.float32]
MAX_RANK = 1024  # an update of higher rank than this is not worth an adapter: apply the plan instead
ADAPTER_TYPES = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16}


@dataclass
class AdapterReport:
    path: str
    tensors: int
    ranks: dict[str, int]
    bytes: int
    dtype: str
    alpha: float


def _selectors(rows: int, picked: npt.NDArray[np.int64], values: F32) -> F32:
    """rows x len(picked): column j is values[j] at row picked[j], zero elsewhere."""
    out = np.zeros((rows, len(picked)), np.float32)
    out[picked, np.arange(len(picked))] = values
    return out


def edit_factors(e: Edit, W: F32 | None) -> tuple[F32, F32]:
    """(B, A) with B @ A the change `e` makes to the (rows, cols) matrix W (W is needed by every kind but low_rank
    and add_rows)."""
    rows, cols = e.shape
    if e.kind is EditKind.LOW_RANK:
        assert e.b is not None
        return np.ascontiguousarray(e.a.T), np.ascontiguousarray(e.b)
    if e.kind is EditKind.ADD_ROWS:
        assert e.b is not None
        return _selectors(rows, e.a.astype(np.int64), np.ones(len(e.a), np.float32)), np.ascontiguousarray(e.b)
    assert W is not None
    if e.kind in (EditKind.PROJECT_OUT, EditKind.PROJECT_IN):
        damp = 1.0 - (np.zeros(e.a.shape[0], np.float32) if e.gain is None else e.gain)
        if e.kind is EditKind.PROJECT_OUT:
            return np.ascontiguousarray(-(e.a.T * damp[None, :])), e.a @ W
        return np.ascontiguousarray(-((W @ e.a.T) * damp[None, :])), np.ascontiguousarray(e.a)
    changed = np.flatnonzero(e.a != 1.0)
    if len(changed) > MAX_RANK:
        raise PlanError(f"edit of {e.tensor} ({e.kind.value}) changes {len(changed)} "
                        f"{'rows' if e.kind is EditKind.SCALE_ROWS else 'columns'}: as an adapter that is an update of "
                        f"rank {len(changed)} (over {MAX_RANK}); apply the plan to the model instead (pydetox apply)")
    delta = (e.a[changed] - 1.0).astype(np.float32)
    if e.kind is EditKind.SCALE_ROWS:  # (diag(s) - I) W
        return _selectors(rows, changed, delta), np.ascontiguousarray(W[changed])
    if e.kind is EditKind.SCALE_COLS:  # W (diag(s) - I)
        return np.ascontiguousarray(W[:, changed] * delta[None, :]), _selectors(cols, changed, np.ones(len(changed), np.float32)).T.copy()
    raise PlanError(f"edit of {e.tensor}: kind {e.kind.value} has no adapter form")


def adapter_factors(plan: EditPlan, model: ModelFile) -> dict[str, tuple[F32, F32]]:
    """Per edited tensor, (B, A) with B @ A the change the plan makes to it (see the module docstring)."""
    from pydetox.kernels import dequantize

    plan.validate()
    shapes = {n: t.shape for n, t in model.tensors.items() if len(t.ne) == 2}
    plan.check_fits(model.arch, shapes)
    out: dict[str, tuple[F32, F32]] = {}
    for name in plan.tensors:
        edits = plan.for_tensor(name)
        if name not in model.tensors:
            raise PlanError(f"the plan creates tensor {name!r} (from {edits[0].source!r}), which the model does not "
                            "have; an adapter can only change existing tensors: apply the plan (pydetox apply)")
        if name == "token_embd.weight":
            raise PlanError("the plan edits token_embd.weight, which llama.cpp adapts as an embedding lookup, not as a "
                            "matrix product; apply the plan instead (pydetox apply)")
        W = None
        if any(e.kind not in (EditKind.LOW_RANK, EditKind.ADD_ROWS) for e in edits) or len(edits) > 1:
            entry = model.tensors[name]
            W = dequantize(model.read(entry), entry.qtype, entry.rows, entry.cols).astype(np.float32)
        Bs, As = [], []
        for e in edits:
            B, A = edit_factors(e, W)
            if W is not None:
                W = W + B @ A  # the next edit of this tensor sees this one's result
            Bs.append(B.astype(np.float32))
            As.append(A.astype(np.float32))
        B, A = np.concatenate(Bs, axis=1), np.concatenate(As, axis=0)
        if B.shape[1] > MAX_RANK:
            raise PlanError(f"the plan's edits of {name} add up to an update of rank {B.shape[1]} (over {MAX_RANK}); "
                            "apply the plan instead (pydetox apply)")
        if not (np.all(np.isfinite(B)) and np.all(np.isfinite(A))):
            raise PlanError(f"the adapter for {name} holds NaN or inf values")
        out[name] = (B, A)
    return out


def export_lora(plan: EditPlan, model_path: str | os.PathLike[str], out: str | os.PathLike[str], *, dtype: str = "F32",
                plan_path: str | os.PathLike[str] | None = None, force: bool = False) -> AdapterReport:
    """Write `plan` as a LoRA adapter for the GGUF `model_path` (see the module docstring)."""
    qtype = ADAPTER_TYPES.get(dtype.upper())
    if qtype is None:
        raise PydetoxError(f"adapter type must be one of {', '.join(ADAPTER_TYPES)}, got {dtype!r}")
    model_path, out = Path(model_path), Path(out)
    Outputs([model_path, plan_path], force=force).claim(out, "adapter")
    with ModelFile(model_path) as model:
        factors = adapter_factors(plan, model)
        arch = model.arch
    if not factors:
        raise PlanError("the plan has no edits to export")
    alpha = float(next(iter(factors.values()))[0].shape[1])
    with atomic(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            writer.add_string(keys.TOOL, __version__)
            writer.add_string(keys.SOURCE_NAME, model_path.name)
            writer.add_string(keys.SOURCE_SHA256, BackgroundHash(model_path).result())  # remembered per file, as apply's
            writer.add_string(keys.PLAN_METHOD, plan.method)
            writer.add_string(keys.PLAN_PARAMS, json.dumps(plan.params, sort_keys=True))
            if plan_path is not None:
                writer.add_string(keys.PLAN_SHA256, sha256_file(plan_path))
            np_type = np.float32 if qtype is gguf.GGMLQuantizationType.F32 else np.float16
            for name, (B, A) in factors.items():
                k = B.shape[1]
                writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(A, dtype=np_type))
                writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(B * np.float32(k / alpha), dtype=np_type))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return AdapterReport(str(out), len(factors), {n: int(B.shape[1]) for n, (B, _) in factors.items()},
                         out.stat().st_size, dtype.upper(), alpha)


def describe(report: AdapterReport) -> str:
    ranks = sorted(set(report.ranks.values()))
    return (f"wrote {report.path}: LoRA adapter, {report.tensors} tensors, rank {'/'.join(map(str, ranks))}, "
            f"{report.dtype}, {report.bytes / 2**20:.1f} MiB")


def adapter_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What an adapter file says about itself (its pydetox provenance included)."""
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return {"type": fields.get("general.type"), "arch": fields.get("general.architecture"),
            "alpha": fields.get(gguf.Keys.Adapter.LORA_ALPHA), "tensors": len(r.tensors) // 2,
            "pydetox": {k: v for k, v in fields.items() if k.startswith("pydetox.")}}
