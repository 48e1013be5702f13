"""What a distill teacher moves: KL(teacher || unedited) per position and the tokens that lose the most probability.
Usage: python moved_mass.py STAGES/teacher-KEY.npz STAGES/f16-KEY.gguf N_SEQUENCES (a random draw, seed 0)."""

import collections
import sys

import numpy as np
from llama_cpp import Llama

z = np.load(sys.argv[1])
model = sys.argv[2]
nseq = int(sys.argv[3])
lengths = z["t_lengths"]
toks = z["t_tokens"]
ids = z["t_ids"]
lp = z["t_logp"]
rest = z["t_rest"]
starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
rstarts = np.concatenate([[0], np.cumsum(lengths - 1)[:-1]])
llm = Llama(model, n_ctx=256, logits_all=True, verbose=False, n_threads=2)
rng = np.random.default_rng(0)
pick = rng.choice(len(lengths), nseq, replace=False)
drop = collections.Counter()
gain = collections.Counter()
kl = []
npos = 0
for s in pick:
    seq = toks[starts[s] : starts[s] + lengths[s]].tolist()
    llm.reset()
    llm.eval(seq)
    logits = np.array(llm.scores[: len(seq) - 1], dtype=np.float64)
    logits -= logits.max(1, keepdims=True)
    lb = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    r0 = rstarts[s]
    for j in range(len(seq) - 1):
        i = ids[r0 + j]
        t = lp[r0 + j].astype(np.float64)
        pu = np.exp(lb[j, i])
        pt = np.exp(t)
        # KL(teacher || unedited) over the top-k plus rest bucket
        ru = max(1e-12, 1 - pu.sum())
        rt = np.exp(rest[r0 + j])
        kl.append((pt * (t - lb[j, i])).sum() + rt * (rest[r0 + j] - np.log(ru)))
        d = pu - pt
        for a, b in zip(i, d, strict=True):
            if b > 0:
                drop[int(a)] += b
            else:
                gain[int(a)] -= b
        npos += 1
tot = sum(drop.values())
print(
    "positions",
    npos,
    "mean KL(teacher||unedited) on top-k",
    np.mean(kl),
    "median",
    np.median(kl),
    "mass moved per position",
    tot / npos,
)


def show(c, n=60):
    for a, b in c.most_common(n):
        print(repr(llm.detokenize([a]).decode("utf-8", "replace")), round(b / tot * 100, 2), end=" | ")
    print()


print("LOWERED (share of mass moved, %):")
show(drop)
print("RAISED:")
show(gain, 40)
top = sum(b for _, b in drop.most_common(50)) / tot
print("top-50 lowered share", top)
