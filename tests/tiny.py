"""Tiny llama-architecture GGUF models written inside the tests: real files that llama.cpp loads and runs."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

T = gguf.MODEL_TENSOR


def tensor_name(kind: gguf.MODEL_TENSOR, bid: int | None = None) -> str:
    name = gguf.TENSOR_NAMES[kind]
    return (name.format(bid=bid) if bid is not None else name) + ".weight"


def _vocab(size: int = 0) -> tuple[list[str], list[float], list[int]]:
    # A SentencePiece-style vocabulary: unk, bos, eos, the 256 byte tokens, then a few words; padded with filler
    # pieces to `size` tokens (a real model's output-layer shape) when `size` is larger.
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    words = ["▁the", "▁a", "▁cat", "▁dog", "▁is", "▁was", "▁and", "▁of", "▁to", "▁in", "e", "t", "a", "o", "n", "s"]
    filler = [f"▁w{i}" for i in range(max(0, size - len(tokens) - len(words)))]
    words += filler
    tokens += words
    types += [gguf.TokenType.NORMAL] * len(words)
    scores = [0.0] * 259 + [-float(i) for i in range(len(words))]
    return tokens, scores, [int(t) for t in types]


def write_tiny_llama(
    path: Path,
    *,
    d: int = 256,
    ff: int = 512,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    tied: bool = False,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    seed: int = 0,
    eos: int = 2,
    vocab_size: int = 0,
) -> Path:
    """A random llama model (end-of-text token `eos`); 2-D weights stored as `qtype` (F32, F16 or Q8_0, quantized by
    gguf-py), norms F32; its vocabulary padded to `vocab_size` tokens when that is larger than the 275 of its own."""
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab(vocab_size)
    vocab = len(tokens)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama-test")
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d // heads)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == gguf.GGMLQuantizationType.F32 else gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(eos)
    w.add_unk_token_id(0)

    def matrix(name: str, rows: int, cols: int) -> None:
        data = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    kv = d // heads * kv_heads
    matrix(tensor_name(T.TOKEN_EMBD), vocab, d)
    for b in range(layers):
        norm(tensor_name(T.ATTN_NORM, b), d)
        matrix(tensor_name(T.ATTN_Q, b), d, d)
        matrix(tensor_name(T.ATTN_K, b), kv, d)
        matrix(tensor_name(T.ATTN_V, b), kv, d)
        matrix(tensor_name(T.ATTN_OUT, b), d, d)
        norm(tensor_name(T.FFN_NORM, b), d)
        matrix(tensor_name(T.FFN_GATE, b), ff, d)
        matrix(tensor_name(T.FFN_UP, b), ff, d)
        matrix(tensor_name(T.FFN_DOWN, b), d, ff)
    norm(tensor_name(T.OUTPUT_NORM), d)
    if not tied:
        matrix(tensor_name(T.OUTPUT), vocab, d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
