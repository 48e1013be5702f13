"""Calibration-model fusion at the output layer, on llama.cpp (arXiv 2506.01266, "Detoxification of Large Language
Models through Output-layer Fusion with a Calibration Model").

A small calibration model (its own GGUF, a few transformer layers with the target's tokenizer, trained on non-toxic
text: `pydetox.calibrate`) runs next to the target, token for token. At every position its final hidden state h_c is
mapped into the target's hidden space by a learned linear alignment A and normalised, then mixed with the target's
final hidden state h_t before the target's output layer W:

    h = alpha * LN(A h_c) + (1 - alpha) * h_t,        LN(u) = g * u / rms(u),        logits = W h

Both models run in llama.cpp. Nothing is computed at the vocabulary size in Python: since W is linear,

    W h = (1 - alpha) * (W h_t) + alpha * (W diag(g) A) h_c / rms(A h_c)

W h_t is the target's own logits, and W' = W diag(g) A is stored as the calibration GGUF's output tensor, so llama.cpp
computes W' h_c with its quantized matrix kernels; only rms(A h_c) (d x d per token) is done here, from the
calibrator's final hidden states (llama.cpp embeddings, no pooling). Sampling goes through llama.cpp's own samplers on
the fused logits, so alpha = 0 draws exactly the tokens the target alone draws.

The alignment (A, g, eps, and what the calibrator was trained for) is a small file beside the calibration GGUF:
`CAL.gguf` -> `CAL.align.gguf`, a GGUF container like edit plans (no pickle).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt

from pydetox import keys
from pydetox.errors import PydetoxError
from pydetox.gguf_io import ModelFile, write_small_gguf
from pydetox.runtime import LlamaRuntime, log_softmax

ALIGN_TYPE = keys.ALIGNMENT_TYPE
ALIGN_VERSION = 1
KEY_VERSION = keys.ALIGNMENT_VERSION
KEY_INFO = keys.ALIGNMENT_INFO
KEY_VOCAB = keys.ALIGNMENT_VOCAB
KEY_EPS = keys.ALIGNMENT_EPS

FloatArray = npt.NDArray[np.float32]


class FusionError(PydetoxError):
    """A calibrator, its alignment and a target that do not go together."""


def alignment_path(calibrator: str | os.PathLike[str]) -> Path:
    """Where the alignment of a calibration GGUF lives: `cal.gguf` -> `cal.align.gguf`."""
    p = Path(calibrator)
    return p.with_name(p.name.removesuffix(".gguf") + ".align.gguf")


def vocab_fingerprint(model: ModelFile) -> str:
    """sha256 of a GGUF's token list: a calibrator only fits targets with the same tokenizer."""
    tokens = model.get_field("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise FusionError(f"{model.path} has no tokenizer.ggml.tokens list; a calibrator needs the target's tokenizer")
    h = hashlib.sha256()
    for t in tokens:
        h.update(str(t).encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


@dataclass
class Alignment:
    """A (d_target, d_cal) maps calibrator hidden states into the target's space; g (d_target,) is the gain of LN."""

    A: FloatArray
    g: FloatArray
    eps: float
    vocab_sha256: str
    info: dict[str, Any] = field(default_factory=dict)  # target, layers, training settings, losses

    def validate(self) -> None:
        if self.A.ndim != 2 or self.g.shape != (self.A.shape[0],):
            raise FusionError(f"alignment arrays do not fit: A is {self.A.shape}, g is {self.g.shape}; "
                              f"expected A (d_target, d_cal) and g (d_target,)")
        if not (np.isfinite(self.A).all() and np.isfinite(self.g).all()) or not self.eps > 0:
            raise FusionError("alignment arrays hold NaN/inf, or eps is not positive")

    def save(self, path: str | os.PathLike[str]) -> Path:
        self.validate()

        def fill(writer: gguf.GGUFWriter) -> None:
            writer.add_type(ALIGN_TYPE)
            writer.add_uint32(KEY_VERSION, ALIGN_VERSION)
            writer.add_string(KEY_VOCAB, self.vocab_sha256)
            writer.add_float32(KEY_EPS, float(self.eps))
            writer.add_string(KEY_INFO, json.dumps(self.info, sort_keys=True))
            writer.add_tensor("align.A", np.ascontiguousarray(self.A, dtype=np.float32))
            writer.add_tensor("align.g", np.ascontiguousarray(self.g, dtype=np.float32))

        return write_small_gguf(path, "pydetox", fill)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Alignment:
        path = Path(path)
        if not path.is_file():
            raise FusionError(f"expected the calibrator's alignment file at {path}, found nothing "
                              "(`pydetox calibrate train` writes it beside the calibration GGUF)")
        try:
            reader = gguf.GGUFReader(path, "r")
            fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
            if fields.get(gguf.Keys.General.TYPE) != ALIGN_TYPE:
                raise FusionError(f"{path} is not a calibrator alignment (general.type is {fields.get(gguf.Keys.General.TYPE)!r})")
            version = int(fields[KEY_VERSION])
            if not 1 <= version <= ALIGN_VERSION:
                raise FusionError(f"{path} is alignment format version {version}; this pydetox reads 1..{ALIGN_VERSION}")
            arrays = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
            d_t = arrays["align.g"].shape[0]
            out = cls(A=arrays["align.A"].reshape(d_t, -1), g=arrays["align.g"], eps=float(fields[KEY_EPS]),
                      vocab_sha256=str(fields[KEY_VOCAB]), info=json.loads(fields.get(KEY_INFO, "{}")))
        except FusionError:
            raise
        except Exception as exc:
            raise FusionError(f"{path} is not a readable calibrator alignment ({type(exc).__name__}: {exc})") from exc
        out.validate()
        return out


def fuse(target_logits: FloatArray, cal_logits: FloatArray, cal_hidden: FloatArray, align: Alignment,
         alpha: float, *, overwrite: bool = False) -> FloatArray:
    """(1 - alpha) W h_t + alpha W LN(A h_c) from the target's logits W h_t, the calibrator's logits W' h_c (its output
    tensor is W' = W diag(g) A) and its hidden states h_c; rows are positions. `overwrite`: `cal_logits` may be
    scaled in place (one vocabulary-wide array fewer; the same result)."""
    u = cal_hidden.astype(np.float32) @ align.A.T
    scale = alpha / np.sqrt((u.astype(np.float64) ** 2).mean(axis=1) + align.eps)
    out = target_logits * np.float32(1.0 - alpha)
    if overwrite:
        cal_logits *= scale.astype(np.float32)[:, None]
        out += cal_logits
    else:
        out += cal_logits * scale.astype(np.float32)[:, None]
    return out


class _TokenData(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int32), ("logit", ctypes.c_float), ("p", ctypes.c_float)]


_CANDIDATE = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


def open_calibrator(target: Path, calibrator: str | os.PathLike[str]) -> Alignment:
    """The calibrator's alignment, after checking that calibrator, alignment and target share one tokenizer."""
    cal = Path(calibrator)
    if not cal.is_file():
        raise FusionError(f"expected a calibration GGUF at {cal}, found nothing")
    align = Alignment.load(alignment_path(cal))
    with ModelFile(target) as t, ModelFile(cal) as c:
        fp_t, fp_c = vocab_fingerprint(t), vocab_fingerprint(c)
        if fp_c != align.vocab_sha256:
            raise FusionError(f"{alignment_path(cal)} was not written for {cal.name} (tokenizer fingerprints differ)")
        if fp_t != fp_c:
            raise FusionError(f"{cal.name} was trained for another tokenizer than {target.name}'s; "
                              f"a calibrator fits only targets with the tokenizer it was trained with")
        emb = t.get_field(f"{t.arch}.embedding_length")
        if emb is not None and int(emb) != align.A.shape[0]:
            raise FusionError(f"the alignment maps into a {align.A.shape[0]}-wide hidden space; {target.name} has {emb}")
    return align


def _one_blas_thread() -> Any:
    """Limit numpy's BLAS to one thread while fused decoding runs. The small products here (16 x 576 x 576) would
    otherwise wake OpenBLAS's thread pool, whose threads spin after each call and take the 2 cores from the next
    llama.cpp decode: measured (bench/bench_fusion.py), fused generation ran at 48% of the target's tokens/s with
    them and 86% without."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _outputs_come_last(items: list[tuple[int, int, int, bool]]) -> bool:
    """True when, in every sequence, the tokens that need no output all precede the ones that do."""
    last_plain: dict[int, int] = {}
    first_out: dict[int, int] = {}
    for _tok, pos, seq, out in items:
        if out:
            first_out[seq] = min(pos, first_out.get(seq, pos))
        else:
            last_plain[seq] = max(pos, last_plain.get(seq, pos))
    return all(p < first_out.get(seq, p + 1) for seq, p in last_plain.items())


class FusedRuntime(LlamaRuntime):
    """The target and its calibrator in two llama.cpp contexts that see the same batches; logits are fused as in
    the module docstring. Same interface as LlamaRuntime (generate, logprobs), so evaluation code is shared."""

    def __init__(self, path: str | os.PathLike[str], calibrator: str | os.PathLike[str], alpha: float, *,
                 n_ctx: int = 2048, n_seq: int = 1, n_batch: int = 512, threads: int | None = None) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise FusionError(f"alpha must lie in [0, 1], got {alpha}")
        self.align = open_calibrator(Path(path), calibrator)
        super().__init__(Path(path), n_ctx=n_ctx, n_seq=n_seq, n_batch=n_batch, threads=threads)
        try:
            self.cal = LlamaRuntime(Path(calibrator), n_ctx=n_ctx, n_seq=n_seq, n_batch=n_batch, threads=threads,
                                    embeddings=True)
        except BaseException:
            super().close()
            raise
        if self.cal.n_vocab != self.n_vocab or self.cal.n_embd != self.align.A.shape[1]:
            self.close()
            raise FusionError(f"calibrator has {self.cal.n_vocab} tokens and width {self.cal.n_embd}; expected "
                              f"{self.n_vocab} tokens and the alignment's width {self.align.A.shape[1]}")
        self.alpha = float(alpha)
        self.calibrator = Path(calibrator)
        self._blas = _one_blas_thread()
        self._fused: FloatArray = np.zeros((0, self.n_vocab), np.float32)
        self._rows: dict[int, int] = {}
        self._cand = np.zeros(self.n_vocab, dtype=_CANDIDATE)
        self._ids = np.arange(self.n_vocab, dtype=np.int32)

    def close(self) -> None:
        cal = getattr(self, "cal", None)
        if cal is not None:
            cal.close()
        blas = getattr(self, "_blas", None)
        if blas is not None:
            blas.restore_original_limits()
            self._blas = None
        super().close()

    def _clear(self) -> None:
        super()._clear()
        self.cal.clear()

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        # the last decode's fused rows are not kept beside this one's (a slice of them would be a view that keeps
        # the whole array alive)
        self._fused = np.zeros((0, self.n_vocab), np.float32)
        super()._decode(items)
        rows = [i for i, it in enumerate(items) if it[3]]
        self._rows = {i: r for r, i in enumerate(rows)}
        n = len(rows)
        cal = self.cal
        # Prompt tokens that need no output go through the calibrator first without embeddings; only the outputs pay
        # for the vocabulary-wide logits.
        if not rows:
            cal.prefill(items)
            return
        if len(rows) < len(items) and _outputs_come_last(items):
            cal.prefill([it for it in items if not it[3]])
            cal.decode([items[i] for i in rows])
            idx = list(range(n))
        else:
            cal.decode([(t, p, q, True) for t, p, q, _ in items])  # llama.cpp outputs them all anyway
            idx = rows
        zt = self.target_logits(n)
        zc = np.empty((n, self.n_vocab), np.float32)
        h = np.empty((n, cal.n_embd), np.float32)
        for r, i in enumerate(idx):
            zc[r] = cal.logits_at(i)
            h[r] = cal.embedding_at(i)
        self._fused = fuse(zt, zc, h, self.align, self.alpha, overwrite=True)

    def _output_logits(self, n: int) -> FloatArray:
        return self._fused[:n]

    def copy_sequence(self, src: int, dst: int) -> None:
        super().copy_sequence(src, dst)
        self.cal.copy_sequence(src, dst)

    def logprobs_and_target(self, tokens: list[int]) -> tuple[FloatArray, FloatArray]:
        """`logprobs(tokens)` of the fused model and of the target alone, from one decode: the target's logits stay
        in its own llama.cpp context while the calibrator decodes in another."""
        fused = self.logprobs(tokens)
        return fused, log_softmax(self.target_logits(len(tokens) - 1))

    def _sample(self, chain: Any, i: int) -> int:
        cand = self._cand
        cand["id"] = self._ids
        cand["logit"] = self._fused[self._rows[i]]
        cand["p"] = 0.0
        arr = self.lib.llama_token_data_array(
            data=cand.ctypes.data_as(ctypes.POINTER(self.lib.llama_token_data)),
            size=self.n_vocab, selected=-1, sorted=False,
        )
        self.lib.llama_sampler_apply(chain, ctypes.byref(arr))
        if not 0 <= arr.selected < self.n_vocab:
            raise FusionError(f"llama.cpp's sampler selected no token (index {arr.selected})")
        token = int(cand["id"][arr.selected])
        self.lib.llama_sampler_accept(chain, token)
        return token


class FusionLogitsProcessor:
    """Calibrator fusion for llama-cpp-python's `Llama` (chat): a `logits_processor` that keeps the calibrator's
    KV cache in step with the tokens the target has seen and returns the fused logits of the last position."""

    def __init__(self, target: Path, calibrator: str | os.PathLike[str], alpha: float, n_ctx: int = 4096,
                 threads: int | None = None) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise FusionError(f"alpha must lie in [0, 1], got {alpha}")
        self.align = open_calibrator(target, calibrator)
        self.cal = LlamaRuntime(Path(calibrator), n_ctx=n_ctx, n_batch=512, threads=threads, embeddings=True)
        self.alpha = float(alpha)
        self.seen: list[int] = []
        self._blas = _one_blas_thread()

    def close(self) -> None:
        self.cal.close()
        self._blas.restore_original_limits()

    def __call__(self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        ids = [int(t) for t in input_ids]
        keep = 0
        for a, b in zip(self.seen, ids[:-1], strict=False):  # the last token must be decoded again for its logits
            if a != b:
                break
            keep += 1
        if keep < len(self.seen):
            self.cal.forget_from(0, keep)
            self.seen = self.seen[:keep]
        for start in range(keep, len(ids) - 1, self.cal.n_batch):  # all but the last token: no output needed
            chunk = ids[start : min(start + self.cal.n_batch, len(ids) - 1)]
            self.cal.prefill([(t, start + j, 0, False) for j, t in enumerate(chunk)])
        self.cal.decode([(ids[-1], len(ids) - 1, 0, True)])
        self.seen = ids
        zc = self.cal.logits(1)
        h = self.cal.embeddings(1)
        fused = fuse(np.asarray(scores, np.float32)[None, :], zc, h, self.align, self.alpha)[0]
        result: npt.NDArray[np.single] = fused.astype(scores.dtype, copy=False)
        return result
