"""Loading GGUF models into the llama.cpp runtime (llama-cpp-python) the way pydetox needs them.

On CPUs that report AMX (Intel Sapphire Rapids and later, e.g. these 2-core build machines), llama.cpp 0c1e57098bba
built with -march=native routes Q4_0/Q4_1/Q8_0 matrix products through its AMX "extra buffer type", and that kernel
crashes with SIGSEGV (ggml_backend_amx_mul_mat) on SmolLM2's 576-wide tensors here. `use_extra_bufts = false`
(llama.cpp's `--no-repack`) keeps the weights in the plain CPU buffer, which runs the regular AVX-512 kernels.
llama-cpp-python's `Llama` does not expose that field, so it is set on the default parameters it starts from.
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pydetox.errors import RuntimeUnavailableError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11; the project supports 3.10

_lock = threading.Lock()


def _llama_cpp() -> Any:
    """llama-cpp-python's module, or a clear error naming the install command."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise RuntimeUnavailableError("llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36") from exc
    return llama_cpp


def load_llama(path: str | Path, *, repack: bool = False, **kwargs: Any) -> Any:
    """A `llama_cpp.Llama` for `path`; `repack=False` disables llama.cpp's extra (AMX / repacked) buffer types.
    Every layer goes to the GPU when llama.cpp was built with one (`n_gpu_layers=-1`, llama.cpp's own default, which
    `LlamaRuntime` keeps; llama-cpp-python's `Llama` would offload none); a CPU build ignores it."""
    llama_cpp = _llama_cpp()
    import llama_cpp.llama as llama_mod
    kwargs.setdefault("verbose", False)
    kwargs.setdefault("n_gpu_layers", -1)
    with _lock:
        original = llama_cpp.llama_cpp.llama_model_default_params

        def params() -> Any:
            p = original()
            p.use_extra_bufts = repack
            return p

        llama_mod.llama_cpp.llama_model_default_params = params  # type: ignore[attr-defined]
        try:
            return llama_cpp.Llama(model_path=str(path), **kwargs)
        finally:
            llama_mod.llama_cpp.llama_model_default_params = original  # type: ignore[attr-defined]


def _quiet_llama_cpp() -> None:
    # llama-cpp-python's log callback prints every loader line unless its logger is set to errors only.
    try:
        from llama_cpp._logger import set_verbose

        set_verbose(False)
    except ImportError:
        pass


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. temperature 0 is greedy; otherwise llama.cpp's samplers: temperature, then top-p, then a
    seeded draw (RealToxicityPrompts used nucleus sampling with p = 0.9, 25 samples, 20 tokens)."""

    temperature: float = 0.0
    top_p: float = 0.9
    seed: int = 0
    ignore_eos: bool = False  # end-of-generation tokens banned: every continuation runs to max_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def describe(self) -> str:
        text = "greedy" if self.greedy else f"sampled, temperature {self.temperature}, top-p {self.top_p}, seed {self.seed}"
        return text + (", end of text banned" if self.ignore_eos else "")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of llama.cpp logits, as a float32 copy."""
    out = logits.astype(np.float32)
    out -= out.max(axis=1, keepdims=True)
    out -= np.log(np.exp(out).sum(axis=1, keepdims=True))
    return out


def special_tokens(path: str | Path, candidates: Iterable[int] | None = None, *, eog_only: bool = False) -> list[int]:
    """The tokens of `candidates` (None: the whole vocabulary) that the GGUF `path` marks as control tokens or at
    which llama.cpp ends a generation (`eog_only`: only the latter), read from its vocabulary alone (vocab_only: no
    weights loaded, where a runtime would map the whole model)."""
    llama_cpp = _llama_cpp()
    path = Path(path)
    _quiet_llama_cpp()
    if not path.is_file():
        raise RuntimeUnavailableError(f"expected a GGUF model at {path}, found nothing")
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise RuntimeUnavailableError(f"llama.cpp could not read the vocabulary of {path}")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        tokens = range(llama_cpp.llama_vocab_n_tokens(vocab)) if candidates is None else candidates
        return [int(t) for t in tokens if llama_cpp.llama_vocab_is_eog(vocab, int(t))
                or (not eog_only and llama_cpp.llama_vocab_is_control(vocab, int(t)))]
    finally:
        llama_cpp.llama_model_free(model)


class LlamaRuntime:
    """One GGUF loaded in llama.cpp through llama-cpp-python's C API, for batched generation and for scoring
    text (log-probabilities of every next token). Several sequences share one context, so one forward pass per
    step advances all of them: on a CPU this is where the throughput comes from."""

    def __init__(self, path: str | Path, *, n_ctx: int = 2048, n_seq: int = 1, n_batch: int = 512,
                 threads: int | None = None, logits_all: bool = False, embeddings: bool = False,
                 lora: str | Path | None = None, lora_scale: float = 1.0) -> None:
        """`lora`: a LoRA adapter GGUF (pydetox export-lora, llama.cpp's convert_lora_to_gguf) applied at run time
        at `lora_scale`."""
        llama_cpp = _llama_cpp()
        from pydetox.kernels import default_threads

        self.lib = llama_cpp
        self.path = Path(path)
        _quiet_llama_cpp()
        if not self.path.is_file():
            raise RuntimeUnavailableError(f"expected a GGUF model at {self.path}, found nothing")
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_extra_bufts = False  # see the module docstring: the AMX path crashes here
        # n_gpu_layers stays llama.cpp's default (-1: every layer on the GPU of a CUDA / Metal / Vulkan build), so the
        # teacher's and the evaluation's generation run there with such a build of llama-cpp-python.
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.model:
            raise RuntimeUnavailableError(f"llama.cpp could not load {self.path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.kv_unified = True
        cparams.n_threads = cparams.n_threads_batch = threads or default_threads()
        cparams.no_perf = True
        self.embeddings_on = embeddings
        if embeddings:
            # Final hidden states (after the output norm) of every output token, next to its logits. A causal LM
            # has no pooling type of its own, which llama.cpp resolves to NONE (asking for NONE explicitly only
            # makes it print a warning per context); checked below.
            cparams.embeddings = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeUnavailableError(f"llama.cpp could not create a context for {self.path}")
        if embeddings and llama_cpp.llama_pooling_type(self.ctx) != llama_cpp.LLAMA_POOLING_TYPE_NONE:
            llama_cpp.llama_free(self.ctx)
            llama_cpp.llama_model_free(self.model)
            self.ctx = None
            raise RuntimeUnavailableError(f"{self.path} pools its embeddings; per-token hidden states need a causal LM")
        self.adapter = None
        if lora is not None:
            self._attach(Path(lora), lora_scale)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self.model))  # the context the model was trained on
        self.n_ctx, self.n_seq, self.n_batch = n_ctx, n_seq, n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._eog: list[int] | None = None

    def _attach(self, lora: Path, scale: float) -> None:
        lib = self.lib
        if not lora.is_file():
            self._free()
            raise RuntimeUnavailableError(f"expected a LoRA adapter GGUF at {lora}, found nothing")
        self.adapter = lib.llama_adapter_lora_init(self.model, str(lora).encode())
        if not self.adapter:
            self._free()
            raise RuntimeUnavailableError(f"llama.cpp could not load {lora} as a LoRA adapter for {self.path} (another "
                                          "model's adapter, or not an adapter; llama.cpp's log says which)")
        adapters = (lib.llama_adapter_lora_p_ctypes * 1)(self.adapter)
        scales = (ctypes.c_float * 1)(scale)
        if lib.llama_set_adapters_lora(self.ctx, adapters, 1, scales) != 0:
            self._free()
            raise RuntimeUnavailableError(f"llama.cpp could not apply the adapter {lora}")

    def _free(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "adapter", None):
            self.lib.llama_adapter_lora_free(self.adapter)
            self.adapter = None
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self._free()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def tokenize(self, text: str, add_special: bool = True, special: bool = False) -> list[int]:
        """`special`: read control-token text ('<|im_start|>' in a chat prompt) as those tokens."""
        raw = text.encode("utf-8")
        buf = (self.lib.llama_token * (len(raw) + 8))()
        n = self.lib.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), add_special, special)
        if n < 0:
            buf = (self.lib.llama_token * (-n))()
            n = self.lib.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), add_special, special)
        return list(buf[:n])

    def detokenize(self, tokens: list[int]) -> str:
        out = bytearray()
        buf = ctypes.create_string_buffer(256)
        for t in tokens:
            n = self.lib.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, False)
            out += buf.raw[: max(n, 0)]
        return out.decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def _clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, wants logits)."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(items)
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeUnavailableError(f"llama_decode failed with code {rc} (context of {self.n_ctx} tokens full?)")

    def generate(self, prompts: list[list[int]], max_tokens: int, sampling: Sampling, seeds: list[int]) -> list[list[int]]:
        """Continue up to `n_seq` tokenized prompts at once; returns the generated tokens of each."""
        lib = self.lib
        if len(prompts) > self.n_seq:
            raise ValueError(f"{len(prompts)} prompts, but the context holds {self.n_seq} sequences")
        need = sum(len(p) + max_tokens for p in prompts)
        if need > self.n_ctx:
            raise ValueError(f"{need} tokens of prompts and continuations exceed the context of {self.n_ctx}")
        samplers = []
        for seed in seeds:
            chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
            if sampling.ignore_eos:
                lib.llama_sampler_chain_add(chain, self._eog_ban())
            if sampling.greedy:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            else:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(sampling.temperature))
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(sampling.top_p, 1))
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))
            samplers.append(chain)
        try:
            self._clear()
            out: list[list[int]] = [[] for _ in prompts]
            next_tok: dict[int, int] = {}
            # Prompts: packed into batches of n_batch tokens; a sequence is sampled right after the batch that
            # holds its last prompt token (the next decode would overwrite those logits).
            pending: list[tuple[int, int, int, bool]] = []
            for s, p in enumerate(prompts):
                for j, tok in enumerate(p):
                    pending.append((tok, j, s, j == len(p) - 1))
                    if len(pending) == self.n_batch:
                        self._decode(pending)
                        self._sample_last(pending, samplers, next_tok)
                        pending = []
            if pending:
                self._decode(pending)
                self._sample_last(pending, samplers, next_tok)
            pos = [len(p) for p in prompts]
            active = list(range(len(prompts)))
            for _ in range(max_tokens):
                still = []
                for s in active:
                    tok = next_tok[s]
                    if self.is_eog(tok):
                        continue
                    out[s].append(tok)
                    if len(out[s]) < max_tokens:
                        still.append(s)
                active = still
                if not active:
                    break
                step = [(next_tok[s], pos[s], s, True) for s in active]
                self._decode(step)
                for i, s in enumerate(active):
                    next_tok[s] = self._sample(samplers[s], i)
                    pos[s] += 1
            return out
        finally:
            for chain in samplers:
                lib.llama_sampler_free(chain)

    def _eog_ban(self) -> Any:
        """A llama.cpp logit-bias sampler that sets every end-of-generation token's logit to -inf."""
        if self._eog is None:
            self._eog = [t for t in range(self.n_vocab) if self.is_eog(t)]
        bias = (self.lib.llama_logit_bias * len(self._eog))(*[self.lib.llama_logit_bias(t, -math.inf) for t in self._eog])
        return self.lib.llama_sampler_init_logit_bias(self.n_vocab, len(self._eog), bias)

    def _sample(self, chain: Any, i: int) -> int:
        """Draw the next token of the sequence at position `i` of the last decoded batch (llama.cpp's `idx`)."""
        return int(self.lib.llama_sampler_sample(chain, self.ctx, i))

    def _sample_last(self, items: list[tuple[int, int, int, bool]], samplers: list[Any], next_tok: dict[int, int]) -> None:
        for i, (_tok, _pos, seq, logits) in enumerate(items):
            if logits:
                next_tok[seq] = self._sample(samplers[seq], i)

    def _output_logits(self, n: int) -> np.ndarray:
        """The logits of the `n` output rows of the last decode (a view into llama.cpp's buffer)."""
        return np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(n, self.n_vocab))

    # The step-by-step interface that discovery and calibration drive (generate and logprobs are built on it):
    # decode a batch of (token, position, sequence, wants output) items, read the outputs, fork or clear sequences.

    def decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """Decode one batch: `items` are (token, position, sequence id, wants output); at most `n_batch` of them."""
        if len(items) > self.n_batch:
            raise RuntimeUnavailableError(f"a batch of {len(items)} items is over this runtime's n_batch {self.n_batch}")
        self._decode(items)

    def logits(self, n: int) -> np.ndarray:
        """(n, vocab) float32 logits of the last decode's `n` output rows, in item order; valid until the next decode
        (llama.cpp's own buffer, not a copy: these rows are vocabulary-wide)."""
        return self._output_logits(n)

    def target_logits(self, n: int) -> np.ndarray:
        """The model's own logits of the last decode's outputs: `logits` here; the target's alone where a subclass
        changes `logits` (calibrator fusion). Valid until the next decode."""
        return LlamaRuntime._output_logits(self, n)

    def embeddings(self, n: int) -> np.ndarray:
        """(n, n_embd) float32 copy of the final hidden states of the last decode's `n` output rows (a runtime made
        with embeddings=True)."""
        return np.ctypeslib.as_array(self.lib.llama_get_embeddings(self.ctx), shape=(n, self.n_embd)).copy()

    def prefill(self, items: list[tuple[int, int, int, bool]]) -> None:
        """Decode tokens that need no output into the KV cache (their wants-output flags are ignored). On a runtime
        made with embeddings=True, embeddings are off for this batch: with them on, llama.cpp outputs every token of
        a batch, vocabulary-wide logits included."""
        if self.embeddings_on:
            self.lib.llama_set_embeddings(self.ctx, False)
        try:
            self.decode([(t, p, q, False) for t, p, q, _ in items])
        finally:
            if self.embeddings_on:
                self.lib.llama_set_embeddings(self.ctx, True)

    def logits_at(self, i: int) -> np.ndarray:
        """(n_vocab,) logits of item `i` of the last decode (llama.cpp's `idx`; a view, valid until the next decode)."""
        return np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))

    def embedding_at(self, i: int) -> np.ndarray:
        """(n_embd,) final hidden state of item `i` of the last decode (embeddings=True; a view as `logits_at`)."""
        return np.ctypeslib.as_array(self.lib.llama_get_embeddings_ith(self.ctx, i), shape=(self.n_embd,))

    def forget_from(self, seq: int, pos: int) -> None:
        """Drop sequence `seq`'s cached context from position `pos` on (the KV cache keeps positions < pos)."""
        self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(self.ctx), seq, pos, -1)

    def copy_sequence(self, src: int, dst: int) -> None:
        """Give sequence `dst` the whole cached context of sequence `src` (a fork: both continue from there)."""
        self.lib.llama_memory_seq_cp(self.lib.llama_get_memory(self.ctx), src, dst, -1, -1)

    def clear(self) -> None:
        """Forget every sequence's cached context."""
        self._clear()

    def logprob_blocks(self, tokens: list[int], block: int = 128) -> Iterator[np.ndarray]:
        """`logprobs(tokens)` in consecutive blocks of at most `block` positions, the window decoded a block at a
        time through the KV cache: llama.cpp's output buffer and the log-softmax's arrays then hold `block` rows of
        the vocabulary, not the window's (a 512-token window of Gemma-3's 262k vocabulary: 537 MB each)."""
        n = len(tokens)
        if not 2 <= n <= self.n_ctx:
            raise ValueError(f"a scoring window holds 2..{self.n_ctx} tokens, got {n}")
        block = max(1, min(block, self.n_batch - 1))
        self._clear()
        for start in range(0, n - 1, block):
            stop = min(start + block, n - 1)
            # the last block decodes the last token too (no logits wanted), so one block is the window's single
            # decode; several differ from it by llama.cpp's batch-size-dependent rounding
            end = n if stop == n - 1 else stop
            self._decode([(tokens[i], i, 0, i < stop) for i in range(start, end)])
            yield log_softmax(self._output_logits(stop - start))

    def logprobs(self, tokens: list[int]) -> np.ndarray:
        """log p(token[i+1] | tokens[:i+1]) over the whole vocabulary, for i < len(tokens) - 1: an
        (n - 1, n_vocab) float32 array from one window of at most n_ctx tokens (sequence 0)."""
        n = len(tokens)
        if not 2 <= n <= min(self.n_ctx, self.n_batch):
            raise ValueError(f"a scoring window holds 2..{min(self.n_ctx, self.n_batch)} tokens, got {n}")
        return next(self.logprob_blocks(tokens, n - 1))  # the whole window as one block: one decode
