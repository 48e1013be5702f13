"""Edit plans: what to change in which tensor, as one small, versioned, portable file.

A plan is the output of discovery and the input of `pydetox apply`. It holds bases and vectors, never full
matrices, names the architecture and the (rows, cols) shape of every tensor it edits, and is refused by a model it
does not fit. On disk it is a GGUF file of its own (like repeng's `ControlVector.export_gguf`): the edit list is
JSON metadata, the arrays are F32 tensors, and loading it executes no code.

Edit kinds (W is a tensor as a (rows, cols) matrix, torch's (out, in)):
- project_out: W <- (I - U^T diag(1 - g) U) W, U (k, rows) orthonormal: remove (g = 0) or damp a subspace of what
  the matrix writes (GloSS, ProFS on down-projections).
- project_in: W <- W (I - V^T diag(1 - g) V), V (k, cols) orthonormal: the same on what the matrix reads. With V the
  top right singular vectors of the output layer and g the damping, this is EigenShift's spectral edit, stored as
  k x d numbers instead of a vocab x d matrix.
- low_rank: W <- W + L^T R, L (k, rows), R (k, cols): rank-one edits (TRNE).
- scale_rows / scale_cols: W <- diag(s) W / W diag(s): neuron gains (AurA, Meow2X).
- add_rows: W[r_j, :] += D[j, :], r (k,) row numbers, D (k, cols): learned changes to a few rows of a matrix (the
  output-layer rows of chosen tokens, pydetox.discover.unlikelihood); k x cols numbers instead of a rows x k selector.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt

from pydetox import __version__, _core, keys
from pydetox.errors import PlanError, PlanMismatchError
from pydetox.gguf_io import write_small_gguf

# 2: a sha256 of the plan's content (KEY_CHECKSUM), verified on load. Version 1 files (no checksum) still load.
PLAN_VERSION = 2
PLAN_TYPE = keys.PLAN_TYPE  # general.type of a plan file
KEY_VERSION = keys.PLAN_VERSION
KEY_METHOD = keys.PLAN_METHOD
KEY_PARAMS = keys.PLAN_PARAMS
KEY_EDITS = keys.PLAN_EDITS
KEY_MODEL = keys.PLAN_MODEL
KEY_TOOL = keys.TOOL
KEY_CHECKSUM = keys.PLAN_CONTENT_SHA256

# `scaled` takes strengths in [0, MAX_STRENGTH]: 1 is the edit as discovered, fitted strengths lie below it, and an
# edit extrapolated more than tenfold is damage, not detox (apply refuses such edits anyway, ApplyOptions.max_edit).
MAX_STRENGTH = 10.0

# How far from orthonormal a basis may be (max |B B^T - I|): float32 round-off of a QR is ~1e-6.
ORTHONORMAL_TOL = 1e-3

Array = npt.NDArray[np.float32]


class EditKind(str, Enum):
    PROJECT_OUT = "project_out"
    PROJECT_IN = "project_in"
    LOW_RANK = "low_rank"
    SCALE_ROWS = "scale_rows"
    SCALE_COLS = "scale_cols"
    ADD_ROWS = "add_rows"


@dataclass(frozen=True)
class KindSpec:
    """How one edit kind is checked. The native core knows it by the same name (`_core.OpKind`)."""

    shapes: Callable[[int, int, int], dict[str, tuple[int, ...]]]  # (rows, cols, k) -> expected array shapes
    orthonormal: bool  # `a` must have orthonormal rows
    takes_gain: bool


EDIT_KINDS: dict[EditKind, KindSpec] = {}


def register_kind(kind: EditKind, spec: KindSpec) -> None:
    EDIT_KINDS[kind] = spec


register_kind(EditKind.PROJECT_OUT, KindSpec(lambda r, c, k: {"a": (k, r), "gain": (k,)}, True, True))
register_kind(EditKind.PROJECT_IN, KindSpec(lambda r, c, k: {"a": (k, c), "gain": (k,)}, True, True))
register_kind(EditKind.LOW_RANK, KindSpec(lambda r, c, k: {"a": (k, r), "b": (k, c)}, False, False))
register_kind(EditKind.SCALE_ROWS, KindSpec(lambda r, c, k: {"a": (r,)}, False, False))
register_kind(EditKind.SCALE_COLS, KindSpec(lambda r, c, k: {"a": (c,)}, False, False))
register_kind(EditKind.ADD_ROWS, KindSpec(lambda r, c, k: {"a": (k,), "b": (k, c)}, False, False))


@dataclass(frozen=True, eq=False)
class Edit:
    """One change to one tensor.

    `source` names the tensor an absent `tensor` is created from: an output-layer edit on a model with tied
    embeddings (no output.weight) starts from token_embd.weight and adds a separate output tensor.
    """

    tensor: str
    kind: EditKind
    shape: tuple[int, int]
    a: Array
    b: Array | None = None
    gain: Array | None = None
    source: str | None = None

    @property
    def rank(self) -> int:
        if self.kind is EditKind.ADD_ROWS:
            return int(self.a.shape[0])  # rows changed
        return int(self.a.shape[0]) if self.a.ndim == 2 else 0

    def arrays(self) -> dict[str, Array]:
        out = {"a": self.a}
        if self.b is not None:
            out["b"] = self.b
        if self.gain is not None:
            out["gain"] = self.gain
        return out

    def native(self) -> tuple[_core.OpKind, Array, Array | None, Array | None]:
        return (_core.OpKind.__members__[self.kind.name], self.a, self.b, self.gain)

    def scaled(self, strength: float) -> Edit:
        """The same edit at `strength`: 0 leaves the tensor as it is, 1 is this edit, and between them the change is
        interpolated in the edit's own parameters: projections damp by strength * (1 - g), low_rank and add_rows
        add strength times their change, scalings become 1 + strength * (s - 1). Every kind is linear in these, so
        the edited tensor is exactly (1 - strength) W + strength W_edited (above 1: the edit extrapolated), with one
        exception: a scaling never goes below 0. Extrapolating a gain under 1 past 0 would flip the sign of a row a
        plan meant to silence (a word filter's banned token at 0 would come out at -0.2 for strength 1.2), so it
        stops at 0."""
        if not (np.isfinite(strength) and 0 <= strength <= MAX_STRENGTH):
            raise PlanError(f"strength must be a number in [0, {MAX_STRENGTH:g}] (1: the plan as discovered), got {strength}")
        k = self.kind
        s = np.float32(strength)
        if k in (EditKind.PROJECT_OUT, EditKind.PROJECT_IN):
            g = np.zeros(self.a.shape[0], np.float32) if self.gain is None else self.gain
            return Edit(self.tensor, k, self.shape, self.a, self.b, (1 - s * (1 - g)).astype(np.float32), self.source)
        if k is EditKind.LOW_RANK:
            return Edit(self.tensor, k, self.shape, (s * self.a).astype(np.float32), self.b, self.gain, self.source)
        if k in (EditKind.SCALE_ROWS, EditKind.SCALE_COLS):
            gains = np.maximum(1 + s * (self.a - 1), 0)
            return Edit(self.tensor, k, self.shape, gains.astype(np.float32), self.b, self.gain, self.source)
        if k is EditKind.ADD_ROWS:
            assert self.b is not None
            return Edit(self.tensor, k, self.shape, self.a, (s * self.b).astype(np.float32), self.gain, self.source)
        raise PlanError(f"edit of {self.tensor}: no strength for kind {k.value}")

    def validate(self) -> None:
        where = f"edit of {self.tensor} ({self.kind.value})"
        spec = EDIT_KINDS.get(self.kind)
        if spec is None:
            raise PlanError(f"{where}: unknown kind")
        rows, cols = self.shape
        if rows <= 0 or cols <= 0:
            raise PlanError(f"{where}: shape must be positive, got {self.shape}")
        expected = spec.shapes(rows, cols, self.rank)
        for name, arr in self.arrays().items():
            if name not in expected:
                raise PlanError(f"{where}: kind takes no {name!r} array")
            if arr.shape != expected[name] or (self.rank == 0 and arr.ndim == 2) or (self.rank == 0 and name == "b"):
                raise PlanError(f"{where}: array {name!r} should have shape {expected[name]}, got {arr.shape}")
            if not np.all(np.isfinite(arr)):
                raise PlanError(f"{where}: array {name!r} holds NaN or inf values")
        if "b" in expected and self.b is None:
            raise PlanError(f"{where}: needs a right factor 'b'")
        if self.kind is EditKind.ADD_ROWS:
            r = self.a.astype(np.float64)
            if np.any(r != np.round(r)) or r.min() < 0 or r.max() >= rows or len(np.unique(r)) != len(r):
                raise PlanError(f"{where}: 'a' must hold distinct whole row numbers in [0, {rows}), "
                                f"found values from {r.min():g} to {r.max():g} ({len(r) - len(np.unique(r))} repeated)")
        if spec.orthonormal:
            a64 = self.a.astype(np.float64)
            err = float(np.abs(a64 @ a64.T - np.eye(self.rank)).max())
            if err > ORTHONORMAL_TOL:
                raise PlanError(
                    f"{where}: basis rows must be orthonormal (max |B B^T - I| <= {ORTHONORMAL_TOL}), got {err:.3g}; "
                    "orthonormalise it (e.g. numpy.linalg.qr) before saving"
                )


def content_sha256(arch: str, method: str, params_json: str, model: str, index_json: str,
                   arrays: Iterable[tuple[str, Array]]) -> str:
    """The checksum a plan file carries: every string that decides what apply does and every array's name, shape
    and float32 bytes, in the order of the edit index."""
    h = hashlib.sha256()
    for text in (arch, method, params_json, model, index_json):
        b = text.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    for name, arr in arrays:
        a = np.ascontiguousarray(arr, dtype=np.float32)
        h.update(f"{name}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass(eq=False)
class EditPlan:
    """A list of edits for one model, with the method and parameters that produced it."""

    arch: str
    edits: list[Edit]
    method: str = "manual"
    params: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    tool: str = f"pydetox {__version__}"
    version: int = PLAN_VERSION

    def validate(self) -> None:
        if not self.edits:
            raise PlanError("the plan has no edits")
        for e in self.edits:
            e.validate()

    def scaled(self, strength: float, source: str = "") -> EditPlan:
        """Every edit at `strength` (see `Edit.scaled`). The parameters record the overall strength, the method and
        the plan it came from; the method is named `METHOD-sSTRENGTH` (`distill-s0.7`), so that a report can hold the
        plan beside the one it was scaled from."""
        total = strength * float(self.params.get("plan_strength", 1.0))
        base = str(self.params.get("scaled_method", self.method))
        params = {**self.params, "plan_strength": total, "scaled_method": base}
        if source:
            params["scaled_from"] = source
        return EditPlan(self.arch, [e.scaled(strength) for e in self.edits], f"{base}-s{total:g}", params, self.model)

    @classmethod
    def merged(cls, plans: list[tuple[str, EditPlan]]) -> EditPlan:
        """One plan that makes every change of `plans` (name, plan), in order: edits of a tensor that two plans
        touch are applied one after the other, the later plan's on the result of the earlier one's (so order
        matters there). The plans must be for one architecture and must agree on the shape of every tensor they
        share. The method is the plans' methods joined by '+'; the parameters
        keep each plan's method, parameters, model and file name under 'merged'. The model a plan names is the file
        it was discovered from (the F16 or the Q4_K_M of one model), so it is recorded, not compared: apply checks
        the architecture and every tensor's shape."""
        if len(plans) < 2:
            raise PlanError(f"merging takes two or more plans, got {len(plans)}")
        first_name, first = plans[0]
        shapes: dict[str, tuple[tuple[int, int], str]] = {}
        for name, p in plans:
            if p.arch != first.arch:
                raise PlanMismatchError(f"{name} is a plan for architecture {p.arch!r}, {first_name} for {first.arch!r}")
            for e in p.edits:
                seen = shapes.setdefault(e.tensor, (e.shape, name))
                if seen[0] != e.shape:
                    raise PlanMismatchError(f"{name} edits {e.tensor!r} as {e.shape[0]}x{e.shape[1]}, "
                                            f"{seen[1]} as {seen[0][0]}x{seen[0][1]}")
        params = {"merged": [{"file": name, "method": p.method, "model": p.model, "params": p.params} for name, p in plans]}
        return cls(first.arch, [e for _, p in plans for e in p.edits], "+".join(p.method for _, p in plans), params,
                   first.model)

    @property
    def tensors(self) -> list[str]:
        return list(dict.fromkeys(e.tensor for e in self.edits))

    def for_tensor(self, name: str) -> list[Edit]:
        return [e for e in self.edits if e.tensor == name]

    def check_fits(self, arch: str, shapes: dict[str, tuple[int, int]]) -> None:
        """Refuse a model whose architecture or tensor shapes differ from the ones the plan was made for."""
        if arch != self.arch:
            raise PlanMismatchError(f"plan was made for architecture {self.arch!r}, the model is {arch!r}")
        for e in self.edits:
            found = shapes.get(e.tensor)
            if found is None and e.source is not None:
                found = shapes.get(e.source)
                if found is None:
                    raise PlanMismatchError(f"plan edits {e.tensor!r} (from {e.source!r}); the model has neither")
            if found is None:
                raise PlanMismatchError(f"plan edits tensor {e.tensor!r}, which the model does not have")
            if found != e.shape:
                raise PlanMismatchError(
                    f"plan edits {e.tensor!r} as a {e.shape[0]}x{e.shape[1]} matrix, the model's is {found[0]}x{found[1]}"
                )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan (atomically: a temporary file renamed when complete)."""
        self.validate()

        def fill(writer: gguf.GGUFWriter) -> None:
            params = json.dumps(self.params, sort_keys=True)
            writer.add_type(PLAN_TYPE)
            writer.add_uint32(KEY_VERSION, max(self.version, PLAN_VERSION))  # a v1 plan saved again gains a checksum
            writer.add_string(KEY_METHOD, self.method)
            writer.add_string(KEY_PARAMS, params)
            writer.add_string(KEY_MODEL, self.model)
            writer.add_string(KEY_TOOL, self.tool)
            index = []
            stored = []
            for i, e in enumerate(self.edits):
                arrays = {}
                for name, arr in e.arrays().items():
                    tname = f"edit.{i}.{name}"
                    data = np.ascontiguousarray(arr, dtype=np.float32)
                    writer.add_tensor(tname, data)
                    arrays[name] = tname
                    stored.append((tname, data))
                index.append({"tensor": e.tensor, "kind": e.kind.value, "shape": list(e.shape), "source": e.source,
                              "arrays": arrays})
            index_json = json.dumps(index)
            writer.add_string(KEY_EDITS, index_json)
            writer.add_string(KEY_CHECKSUM, content_sha256(self.arch, self.method, params, self.model, index_json, stored))

        return write_small_gguf(path, self.arch, fill)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EditPlan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"expected an edit plan file at {path}, found nothing")
        try:
            reader = gguf.GGUFReader(path, "r")
            fields = dict(reader.fields)

            def get(key: str, default: Any = None) -> Any:
                if key not in fields:
                    if default is not None:
                        return default
                    raise PlanError(f"{path} is not a pydetox edit plan: key {key!r} is missing")
                return fields[key].contents()

            if get(gguf.Keys.General.TYPE) != PLAN_TYPE:
                raise PlanError(f"{path} is a GGUF but not a pydetox edit plan (general.type is {get(gguf.Keys.General.TYPE)!r})")
            version = int(get(KEY_VERSION))
            if version > PLAN_VERSION or version < 1:
                raise PlanError(f"{path} is plan format version {version}; this pydetox reads versions 1..{PLAN_VERSION}")
            arrays = {}
            for t in reader.tensors:
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise PlanError(f"{path}: array {t.name!r} is {t.tensor_type.name}; plans store F32 arrays")
                arrays[t.name] = np.array(t.data, dtype=np.float32)
            index_json = str(get(KEY_EDITS))
            index = json.loads(index_json)
            if not isinstance(index, list):
                raise PlanError(f"{path}: the edit index is not a list")
            if version >= 2:
                want = str(get(KEY_CHECKSUM))
                arch = str(get(gguf.Keys.General.ARCHITECTURE))
                stored = [(name, arrays[name]) for item in index for name in item["arrays"].values()]
                got = content_sha256(arch, str(get(KEY_METHOD, "")), str(get(KEY_PARAMS)), str(get(KEY_MODEL, "")),
                                     index_json, stored)
                if got != want:
                    raise PlanError(f"{path} is corrupt: its content does not match the checksum it carries "
                                    f"({got[:12]}... computed, {want[:12]}... stored); get the plan again or rerun discovery")
            else:
                import warnings

                warnings.warn(f"{path} is an edit plan of format version {version}, which carries no checksum: "
                              "corruption cannot be detected; save it again with this pydetox", stacklevel=2)
            edits = []
            for item in index:
                named = {k: arrays[v] for k, v in item["arrays"].items()}
                edits.append(
                    Edit(
                        tensor=str(item["tensor"]),
                        kind=EditKind(item["kind"]),
                        shape=(int(item["shape"][0]), int(item["shape"][1])),
                        a=named["a"],
                        b=named.get("b"),
                        gain=named.get("gain"),
                        source=None if item.get("source") is None else str(item["source"]),
                    )
                )
            plan = cls(
                arch=str(get(gguf.Keys.General.ARCHITECTURE)),
                edits=edits,
                method=str(get(KEY_METHOD, "")),
                params=json.loads(get(KEY_PARAMS)),
                model=str(get(KEY_MODEL, "")),  # GGUFWriter drops empty strings
                tool=str(get(KEY_TOOL, "")),
                version=version,
            )
        except PlanError:
            raise
        except Exception as exc:  # corrupt GGUF, bad JSON, missing arrays, wrong types: all one clear error
            raise PlanError(f"{path} is not a readable edit plan ({type(exc).__name__}: {exc})") from exc
        plan.validate()
        return plan


def random_orthonormal(rng: np.random.Generator, k: int, n: int) -> Array:
    """k orthonormal rows of length n (QR of a Gaussian matrix)."""
    if k > n:
        raise PlanError(f"cannot make {k} orthonormal directions in dimension {n}")
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return np.ascontiguousarray(q.T, dtype=np.float32)


def random_plan(
    arch: str, shapes: Iterable[tuple[str, tuple[int, int]]], kind: EditKind, rank: int, seed: int = 0, model: str = ""
) -> EditPlan:
    """A plan of random edits (orthonormal bases, small low-rank factors, gains near 1) for tests and benchmarks."""
    rng = np.random.default_rng(seed)
    edits = []
    for name, (rows, cols) in shapes:
        if kind is EditKind.PROJECT_OUT:
            edits.append(Edit(name, kind, (rows, cols), random_orthonormal(rng, rank, rows)))
        elif kind is EditKind.PROJECT_IN:
            edits.append(Edit(name, kind, (rows, cols), random_orthonormal(rng, rank, cols)))
        elif kind is EditKind.LOW_RANK:
            scale = 0.01 / np.sqrt(rank)
            a = (rng.standard_normal((rank, rows)) * scale).astype(np.float32)
            b = (rng.standard_normal((rank, cols)) * scale).astype(np.float32)
            edits.append(Edit(name, kind, (rows, cols), a, b))
        elif kind is EditKind.SCALE_ROWS:
            edits.append(Edit(name, kind, (rows, cols), rng.uniform(0.5, 1.0, rows).astype(np.float32)))
        elif kind is EditKind.ADD_ROWS:
            picked = np.sort(rng.choice(rows, min(rank, rows), replace=False)).astype(np.float32)
            added = (rng.standard_normal((len(picked), cols)) * 0.01).astype(np.float32)
            edits.append(Edit(name, kind, (rows, cols), picked, added))
        else:
            edits.append(Edit(name, kind, (rows, cols), rng.uniform(0.5, 1.0, cols).astype(np.float32)))
    params = {"kind": kind.value, "rank": rank, "seed": seed}
    return EditPlan(arch=arch, edits=edits, method="random", params=params, model=model)
