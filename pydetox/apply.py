"""Apply an edit plan to a GGUF: the engine behind `pydetox apply`.

Every tensor the plan touches is read, dequantized, edited, requantized and measured in the native core
(`_core.process_tensor`, multithreaded, through libggml's own quantizers). Every other tensor is copied byte for
byte, unless a whole-model `--type` asks for another type, in which case it is requantized exactly as
llama-quantize would (`quantmix.llama_cpp_type_mix`). Memory holds a few copies of the tensor being edited, never
the model. The output appears only when complete.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tqdm import tqdm

from pydetox import __version__, _core, ggml
from pydetox.errors import GGUFFileError, OutputError, PlanError, PydetoxError, UnsupportedTypeError
from pydetox.gguf_io import (
    KEY_PLAN_METHOD,
    KEY_PLAN_PARAMS,
    KEY_PLAN_SHA256,
    KEY_SOURCE_NAME,
    KEY_SOURCE_SHA256,
    KEY_TARGET_TYPE,
    KEY_TOOL,
    AtomicGGUFWriter,
    BackgroundHash,
    ModelFile,
    OutTensor,
    TensorEntry,
    nbytes,
    sha256_file,
    sha_placeholder,
)
from pydetox.imatrix import Imatrix, load_imatrix
from pydetox.kernels import default_threads
from pydetox.output import Outputs, write_text
from pydetox.plan import Edit, EditPlan
from pydetox.quantmix import llama_cpp_type_mix

Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType

# Types llama.cpp will not write without an importance matrix, except for token_embd and output
# (llama.cpp src/llama-quant.cpp, tensor_requires_imatrix).
_NEEDS_IMATRIX = {Q.IQ3_XXS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_M, Q.IQ1_S}
_NO_IMATRIX_TENSORS = {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight", gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"}


MAX_EDIT = 4.0


@dataclass(frozen=True)
class ApplyOptions:
    """How to apply a plan."""

    ftype: gguf.LlamaFileType | None = None  # whole-model target type (llama-quantize's); None keeps each type
    threads: int | None = None  # threads for the native core; None uses every core
    imatrix: str | os.PathLike[str] | None = None  # llama-imatrix output, needed by the low-bit IQ types
    verify: bool = True  # measure what each edit kept after requantization
    overwrite: bool = False  # replace an existing output file
    progress: bool = True  # show a progress bar
    # Edited tensors get at least this many bits per weight (e.g. Q8_0) when `ftype` would give them fewer: a 4-bit
    # K-quant brings back ~half of a projection edit (its rounding noise is as large as the edit); 8 bits keep it.
    edited_floor: gguf.GGMLQuantizationType | None = None
    # The largest edit written, as ||W_edited - W|| / ||W|| of one tensor: a projection changes a tensor by at most
    # its own norm, the discovered low-rank and scaling edits by a few percent to tens of percent; an edit several
    # times the tensor's size comes from a corrupt or wildly over-scaled plan, and the model is refused, not written.
    # Measured exactly with `verify`; without it, by the change of the tensor's norm (a lower bound of the edit).
    max_edit: float = MAX_EDIT
    # Check the tensors copied unchanged as well (ggml_validate_row_data: NaN/inf, corrupt block scales), so that a
    # damaged input is refused rather than passed on; False copies them inside the kernel without reading them.
    validate_copies: bool = True


@dataclass
class EditReport:
    kind: str
    rank: int
    survival_f32: float | None  # share of the removed component left after the edit, in float
    survival: float | None  # the same after requantization (the leakage)


@dataclass
class TensorReport:
    name: str
    action: str  # copy | requantize | edit | create
    src_type: str
    dst_type: str
    n_bytes: int
    edits: list[EditReport] = field(default_factory=list)
    rel_edit: float | None = None  # ||W_edit - W|| / ||W||
    quant_noise_to_edit: float | None = None  # ||Q(W_edit) - W_edit|| / ||W_edit - W||


@dataclass
class ApplyReport:
    input: str
    output: str
    plan: str | None
    plan_sha256: str | None
    source_sha256: str
    target_type: str | None
    threads: int
    model_bytes: int
    output_bytes: int
    peak_rss_bytes: int
    timings: dict[str, float]
    tensors: list[TensorReport]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def write_json(self, path: str | os.PathLike[str]) -> None:
        write_text(path, json.dumps(self.to_json(), indent=2) + "\n")

    def table(self) -> str:
        """A table a person can read: edited tensors, then totals and timings."""
        lines = [f"{'tensor':<34} {'type':>12} {'edit':>16} {'rel.edit':>9} {'q.noise/edit':>13} {'leak f32':>9} {'leak':>8}"]
        for t in self.tensors:
            for i, e in enumerate(t.edits):
                leak32 = "-" if e.survival_f32 is None else f"{e.survival_f32:.2e}"
                leak = "-" if e.survival is None else f"{e.survival:.4f}"
                rel = "-" if t.rel_edit is None else f"{t.rel_edit:.4f}"
                noise = "-" if t.quant_noise_to_edit is None else f"{t.quant_noise_to_edit:.3f}"
                name = t.name if i == 0 else ""
                types = f"{t.src_type}->{t.dst_type}" if i == 0 else ""
                lines.append(f"{name:<34} {types:>12} {e.kind + ' k=' + str(e.rank):>16} {rel:>9} {noise:>13} {leak32:>9} {leak:>8}")
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.action] = counts.get(t.action, 0) + 1
        leaks = [e.survival for t in self.tensors for e in t.edits if e.survival is not None]
        lines.append("")
        lines.append("tensors: " + ", ".join(f"{n} {a}" for a, n in sorted(counts.items())))
        if leaks:
            lines.append(f"leakage (removed component surviving requantization): median {np.median(leaks):.4f}, max {max(leaks):.4f}")
        lines.append(f"size: {self.model_bytes / 2**20:.1f} MiB -> {self.output_bytes / 2**20:.1f} MiB; "
                     f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB; threads {self.threads}")
        lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        return "\n".join(lines)


def _imatrix_for(name: str, cols: int, dst: Q, imatrix: Imatrix | None) -> np.ndarray | None:
    vec = None if imatrix is None else imatrix.get(name)
    if vec is not None and vec.shape != (cols,):
        raise UnsupportedTypeError(f"importance matrix entry for {name} has {vec.shape[0]} values; the tensor has {cols} columns")
    needs = (dst in _NEEDS_IMATRIX and name not in _NO_IMATRIX_TENSORS) or ggml.requires_imatrix(dst)
    if needs and vec is None:
        where = "no --imatrix was given" if imatrix is None else "the importance matrix has no entry for it"
        raise UnsupportedTypeError(
            f"tensor {name} would be quantized to {dst.name}, which needs an importance matrix, but {where}; "
            "make one with llama-imatrix, or choose a type such as Q4_K_M"
        )
    return vec


def bits_per_weight(qtype: gguf.GGMLQuantizationType) -> float:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return 8.0 * size / block


def _floor(qtype: gguf.GGMLQuantizationType, floor: gguf.GGMLQuantizationType | None) -> gguf.GGMLQuantizationType:
    if floor is None or bits_per_weight(qtype) >= bits_per_weight(floor):
        return qtype
    return floor


def _work_list(model: ModelFile, src: Path, plan: EditPlan | None, opts: ApplyOptions
               ) -> tuple[list[tuple[OutTensor, TensorEntry, list[Edit]]], dict[str, np.ndarray | None]]:
    """(output tensor, source entry, edits) for every tensor of the output, in the source's order and then the
    tensors the plan creates (a tied model's output layer); and the importance-matrix rows of every tensor that is
    requantized. Refuses a plan that does not fit and a type llama.cpp cannot write for a tensor's shape."""
    shapes = {n: t.shape for n, t in model.tensors.items() if len(t.ne) == 2}
    if plan is not None:
        plan.validate()
        plan.check_fits(model.arch, shapes)
    targets = {n: t.qtype for n, t in model.tensors.items()}
    if opts.ftype is not None:
        mix = llama_cpp_type_mix(src, opts.ftype)
        missing = set(targets) - set(mix)
        if missing:
            raise GGUFFileError(f"llama.cpp's quantization plan does not cover tensors {sorted(missing)[:5]}")
        targets = {n: mix[n] for n in targets}
    imatrix = load_imatrix(opts.imatrix) if opts.imatrix is not None else None
    work: list[tuple[OutTensor, TensorEntry, list[Edit]]] = []
    edits_by_tensor = {n: plan.for_tensor(n) for n in plan.tensors} if plan is not None else {}
    for name, entry in model.tensors.items():
        edits = edits_by_tensor.pop(name, [])
        qtype = _floor(targets[name], opts.edited_floor) if edits else targets[name]
        work.append((OutTensor(name, qtype, entry.ne, nbytes(qtype, entry.ne)), entry, edits))
    for name, edits in edits_by_tensor.items():  # tensors the plan creates (tied output layer)
        source_name = edits[0].source
        assert source_name is not None  # check_fits refuses an absent tensor without a source
        source = model.tensors[source_name]
        qtype = _floor(targets[source.name], opts.edited_floor)
        work.append((OutTensor(name, qtype, source.ne, nbytes(qtype, source.ne)), source, edits))
    imatrices: dict[str, np.ndarray | None] = {}
    for out, entry, edits in work:
        if edits or out.qtype != entry.qtype:
            try:
                _core.check_quantizable(int(out.qtype), entry.cols)
            except _core.NativeError as exc:
                raise UnsupportedTypeError(f"tensor {out.name}: {exc}") from None
            imatrices[out.name] = _imatrix_for(out.name, entry.cols, out.qtype, imatrix)
    return work, imatrices


def _metadata(src: Path, plan: EditPlan | None, plan_sha: str | None, opts: ApplyOptions
              ) -> dict[str, tuple[Any, gguf.GGUFValueType]]:
    """The provenance keys the output carries (the source's sha256 is filled in when its hash is done)."""
    metadata: dict[str, tuple[Any, gguf.GGUFValueType]] = {
        KEY_TOOL: (__version__, V.STRING),
        KEY_SOURCE_NAME: (src.name, V.STRING),
        KEY_SOURCE_SHA256: (sha_placeholder(), V.STRING),
    }
    if opts.ftype is not None:
        metadata[gguf.Keys.General.FILE_TYPE] = (int(opts.ftype), V.UINT32)
        metadata[KEY_TARGET_TYPE] = (ggml.ftype_name(opts.ftype), V.STRING)
    if plan is not None:
        metadata[KEY_PLAN_METHOD] = (plan.method, V.STRING)
        metadata[KEY_PLAN_PARAMS] = (json.dumps(plan.params, sort_keys=True), V.STRING)
        if plan_sha is not None:
            metadata[KEY_PLAN_SHA256] = (plan_sha, V.STRING)
    return metadata


def _copy(model: ModelFile, writer: AtomicGGUFWriter, out: OutTensor, entry: TensorEntry, src: Path,
          validate: bool) -> TensorReport:
    """An untouched tensor, byte for byte: read once, checked with llama.cpp's row validation, and written from the
    same buffer (or copied file to file unchecked when `validate` is off)."""
    if validate:
        raw = model.read(entry)
        if not _core.validate_row_data(raw, int(entry.qtype)):
            raise GGUFFileError(f"{src}: tensor {entry.name!r} holds NaN/inf values or corrupt "
                                f"{entry.qtype.name} block scales; the file is damaged (nothing was "
                                "written; ApplyOptions.validate_copies=False copies it as it is)")
        writer.write(out.name, raw)
    else:
        writer.copy_from(out.name, model.fileno(), entry.offset, entry.n_bytes)
    return TensorReport(out.name, "copy", entry.qtype.name, out.qtype.name, out.n_bytes)


def apply_plan(
    plan: EditPlan | None,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    options: ApplyOptions | None = None,
    plan_path: str | os.PathLike[str] | None = None,
) -> ApplyReport:
    """Write `dst`: the model at `src` with `plan` applied (or only requantized when plan is None)."""
    opts = options or ApplyOptions()
    src, dst = Path(src), Path(dst)
    t_start = time.perf_counter()
    timings = dict.fromkeys(("plan", "read", "dequantize", "edit", "quantize", "verify", "write", "hash_wait"), 0.0)
    threads = opts.threads or default_threads()
    ggml.load()
    if not (opts.max_edit > 0 and np.isfinite(opts.max_edit)):
        raise PydetoxError(f"max_edit must be a finite number > 0, got {opts.max_edit}")
    Outputs([src, plan_path, opts.imatrix], force=opts.overwrite).claim(dst, "output")

    with ModelFile(src) as model:
        hasher = BackgroundHash(src)
        work, imatrices = _work_list(model, src, plan, opts)
        plan_sha = sha256_file(plan_path) if plan_path is not None else None
        metadata = _metadata(src, plan, plan_sha, opts)
        timings["plan"] = time.perf_counter() - t_start

        reports: list[TensorReport] = []
        total = sum(out.n_bytes for out, _, _ in work)
        with AtomicGGUFWriter(dst, model, [w[0] for w in work], metadata) as writer, tqdm(
            total=total, unit="B", unit_scale=True, desc=f"apply -> {dst.name}", disable=not opts.progress, leave=False
        ) as bar:
            for out, entry, edits in work:
                if not edits and out.qtype == entry.qtype and out.name == entry.name:
                    t0 = time.perf_counter()
                    reports.append(_copy(model, writer, out, entry, src, opts.validate_copies))
                    timings["write"] += time.perf_counter() - t0
                else:
                    reports.append(_process(model, writer, out, entry, edits, imatrices.get(out.name), threads, opts.verify,
                                            timings, opts.max_edit))
                bar.update(out.n_bytes)
            t0 = time.perf_counter()
            source_sha = hasher.result()
            timings["hash_wait"] = time.perf_counter() - t0
            writer.set_source_sha256(source_sha)
            t0 = time.perf_counter()
            writer.commit()
            timings["write"] += time.perf_counter() - t0
        _core.release_workspace()
        timings["total"] = time.perf_counter() - t_start
        return ApplyReport(
            input=str(src),
            output=str(dst),
            plan=None if plan_path is None else str(plan_path),
            plan_sha256=plan_sha,
            source_sha256=source_sha,
            target_type=None if opts.ftype is None else ggml.ftype_name(opts.ftype),
            threads=threads,
            model_bytes=model.size,
            output_bytes=dst.stat().st_size,
            peak_rss_bytes=peak_rss_bytes(),
            timings={k: round(v, 4) for k, v in timings.items()},
            tensors=reports,
        )


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (VmHWM; getrusage's ru_maxrss would include a parent's peak, since
    Linux carries it over fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb if sys.platform == "darwin" else kb * 1024)  # bytes on macOS, KiB elsewhere


def _process(
    model: ModelFile,
    writer: AtomicGGUFWriter,
    out: OutTensor,
    entry: TensorEntry,
    edits: list[Edit],
    imatrix: np.ndarray | None,
    threads: int,
    verify: bool,
    timings: dict[str, float],
    max_edit: float = MAX_EDIT,
) -> TensorReport:
    t0 = time.perf_counter()
    raw = model.read(entry)
    timings["read"] += time.perf_counter() - t0
    try:
        # The native core writes the result into the output file itself, from a buffer it reuses.
        _, st = _core.process_tensor(
            raw, int(entry.qtype), entry.rows, entry.cols, [e.native() for e in edits], int(out.qtype),
            imatrix, threads, verify, writer.fd, writer.offsets[out.name],
        )
    except _core.NativeIOError as exc:
        raise OutputError(f"cannot write {writer.dest}: {exc}") from None
    except _core.NativeError as exc:
        raise type(exc)(f"tensor {out.name}: {exc}") from None
    for key in ("dequantize", "edit", "quantize", "verify", "write"):
        timings[key] += getattr(st, key + "_s")
    if edits and st.norm_orig > 0:
        exact = verify and st.norm_delta > 0
        size = (st.norm_delta if exact else abs(st.norm_edited - st.norm_orig)) / st.norm_orig
        if size > max_edit:
            raise PlanError(f"tensor {out.name}: the plan changes it by {size:.3g} times its own norm "
                            f"({'' if exact else 'at least; '}||W_edited - W|| / ||W||), over the bound of {max_edit:g} "
                            "(ApplyOptions.max_edit, apply's --max-edit): a corrupt plan, or one scaled far beyond its "
                            "discovered strength; nothing was written")
    action = "create" if out.name != entry.name else ("edit" if edits else "requantize")
    report = TensorReport(out.name, action, entry.qtype.name, out.qtype.name, out.n_bytes)
    if edits and verify:
        delta = st.norm_delta
        report.rel_edit = delta / st.norm_orig if st.norm_orig > 0 else None
        report.quant_noise_to_edit = st.norm_quant_err / delta if delta > 0 else None
        for e, s in zip(edits, st.ops, strict=True):
            removed = s.removed
            projection = e.kind.value.startswith("project")
            report.edits.append(
                EditReport(
                    e.kind.value,
                    e.rank,
                    s.survived_f32 / removed if projection and removed > 0 else None,
                    s.survived / removed if projection and removed > 0 else None,
                )
            )
    elif edits:
        report.edits = [EditReport(e.kind.value, e.rank, None, None) for e in edits]
    return report
