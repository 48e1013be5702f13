"""The model's own text: wiki sentence starts (8 tokens) continued by the model, temperature 1, top-p 0.9, 64 tokens.
Usage: python own_text.py F16.gguf OUT.txt N_SEQUENCES."""

import sys
import time
from pathlib import Path

from pydetox.prompts import load_clean_text
from pydetox.runtime import LlamaRuntime, Sampling

model, out, n_seqs = sys.argv[1], sys.argv[2], int(sys.argv[3])
docs = load_clean_text("wiki")
B, NEW, START = 32, 64, 8
with LlamaRuntime(model, n_ctx=B * (START + NEW), n_seq=B, n_batch=512) as rt:
    starts = []
    for d in docs:
        t = rt.tokenize(d)
        if len(t) >= START + 4:
            starts.append(t[:START])
        if len(starts) >= n_seqs:
            break
    t0 = time.time()
    texts = []
    ntok = 0
    for i in range(0, len(starts), B):
        chunk = starts[i : i + B]
        gen = rt.generate(
            chunk, NEW, Sampling(temperature=1.0, top_p=0.9, ignore_eos=True), [1000 + i + j for j in range(len(chunk))]
        )
        for s, g in zip(chunk, gen, strict=True):
            texts.append(rt.detokenize(s + g).strip())
            ntok += len(g)
        print(i + len(chunk), ntok, f"{ntok / (time.time() - t0):.1f} tok/s", flush=True)
Path(out).write_text("\n\n".join(t.replace("\n\n", "\n") for t in texts) + "\n")
