"""How far a distill teacher lowers chosen tokens: per token, the log-ratio teacher / unedited at the positions where the
unedited model ranks it in its top 32, measured from the position's least-lowered token.
Usage: python lowered_by_token.py STAGES/teacher-KEY.npz STAGES/f16-KEY.gguf N_SEQUENCES."""

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
starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
rstarts = np.concatenate([[0], np.cumsum(lengths - 1)[:-1]])
llm = Llama(model, n_ctx=256, logits_all=True, verbose=False, n_threads=2)
rng = np.random.default_rng(0)
pick = rng.choice(len(lengths), nseq, replace=False)
D = collections.defaultdict(list)
mass = collections.defaultdict(float)
allD = []
allP = []
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
        r = lp[r0 + j] - lb[j, i]
        d = r - r.max()
        pu = np.exp(lb[j, i])
        for a, b, p in zip(i, d, pu, strict=True):
            D[int(a)].append(b)
            mass[int(a)] += p
        allD += list(d)
        allP += list(pu)
allD = np.array(allD)
allP = np.array(allP)
for th in [0, -0.5, -1, -2, -3, -4]:
    m = allD < th
    moved = allP * (1 - np.exp(np.minimum(allD, 0)))
    print(
        f"delta<{th}: share of unedited top-k mass {allP[m].sum() / allP.sum():.3f},"
        f" of moved mass {moved[m].sum() / moved.sum():.3f}"
    )
words = [
    ",",
    " the",
    " a",
    " to",
    ".",
    " you",
    " fuck",
    " fucking",
    " shit",
    " hell",
    " damn",
    " ass",
    " stupid",
    " idiot",
    " kill",
    " f",
    " bitch",
    " dick",
    " crap",
    " sex",
    " gay",
    " black",
    " women",
    " suck",
]
for w in words:
    t = llm.tokenize(w.encode(), add_bos=False, special=False)
    if len(t) != 1:
        print(w, "multi", t)
        continue
    d = np.array(D.get(t[0], []))
    if len(d):
        print(
            f"{w!r:12} n={len(d):5} mass={mass[t[0]]:7.1f} median {np.median(d):6.2f}"
            f" p10 {np.percentile(d, 10):6.2f} frac<-2 {np.mean(d < -2):.2f}"
        )
# tokens with most negative mean delta weighted by mass
tab = sorted(((np.sum(np.array(D[a]) * 1.0), a) for a in D if mass[a] > 3), key=lambda x: x[0] / len(D[x[1]]))
print(
    "most lowered on average (mass>3):",
    [(llm.detokenize([a]).decode("utf-8", "replace"), round(v / len(D[a]), 2)) for v, a in tab[:40]],
)
