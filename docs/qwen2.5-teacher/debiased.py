"""The one-sided teacher with each token's mean fused log-ratio on clean text (weighted by the unedited probability)
subtracted: which tokens would still lose the most. Usage: python debiased.py TEACHER.npz F16.gguf CAL.gguf ALPHA N."""

import collections
import sys

import numpy as np

from pydetox.discover.distill.teacher import _unpack
from pydetox.fusion import FusedRuntime

z = np.load(sys.argv[1])
model = sys.argv[2]
cal = sys.argv[3]
alpha = float(sys.argv[4])
nseq = int(sys.argv[5])
clean = _unpack(z, "clean_")
tox = _unpack(z, "t_")
rng = np.random.default_rng(0)
with FusedRuntime(model, cal, alpha, n_ctx=128, n_batch=128) as rt:
    V = rt.n_vocab
    num = np.zeros(V)
    den = np.zeros(V)
    for k in rng.choice(len(clean), min(nseq, len(clean)), replace=False):
        s = clean[k][:128]
        la, lb = rt.logprobs_and_target(s)
        pu = np.exp(lb.astype(np.float64))
        num += (pu * (la - lb)).sum(0)
        den += pu.sum(0)
    print("clean positions done; tokens with den>1:", (den > 1).sum())
    b = num / (den + 1.0)  # one unit of probability mass at log-ratio 0 pulls rarely seen tokens toward no shift
    lowered = {"raw": collections.Counter(), "debiased": collections.Counter()}
    tot = {"raw": 0.0, "debiased": 0.0}
    for k in rng.choice(len(tox), min(nseq, len(tox)), replace=False):
        s = tox[k]
        la, lb = rt.logprobs_and_target(s)
        top = np.argpartition(-lb, 32, axis=1)[:, :32]
        lbt = np.take_along_axis(lb, top, 1).astype(np.float64)
        d = np.take_along_axis(la, top, 1) - lbt
        pu = np.exp(lbt)
        for name, dd in (("raw", d), ("debiased", d - b[top])):
            m = pu * (1 - np.exp(np.minimum(dd, 0)))
            for ids, ms in zip(top, m, strict=True):
                for a, x in zip(ids, ms, strict=True):
                    lowered[name][int(a)] += x
            tot[name] += m.sum()
    for name in lowered:
        print(name, "mass lowered per position-ish", tot[name])
        print(" | ".join(f"{rt.detokenize([a])!r} {x / tot[name] * 100:.2f}" for a, x in lowered[name].most_common(60)))
