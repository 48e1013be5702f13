"""What a calibrator lowers, one-sided as distill's teacher takes it: at the unedited model's 32 likeliest tokens on a teacher's
toxic sequences, the fused model's log-ratio to the unedited one per token (from the position's least lowered token) and
each token's share of the probability taken away. Usage: python calibrator_lowers.py TEACHER.npz F16.gguf CAL.gguf ALPHA N [MARGIN]
[--gate FROM] (MARGIN: each log-ratio measured from the position's median over the 32 plus MARGIN first, as
`one_sided_center` at MARGIN 0; the per-token log-ratios printed are then those of the centred shift. --gate: each
token's lowering weighted as distill's `toxic_gate` with `toxic_gate_from` FROM)."""

import collections
import sys

import numpy as np

from pydetox.discover.distill.teacher import _unpack, toxic_gate
from pydetox.fusion import FusedRuntime

gate_from = None
if "--gate" in sys.argv:
    at = sys.argv.index("--gate")
    gate_from = float(sys.argv[at + 1])
    del sys.argv[at : at + 2]
z = np.load(sys.argv[1])
model = sys.argv[2]
cal = sys.argv[3]
alpha = float(sys.argv[4])
nseq = int(sys.argv[5])
center = float(sys.argv[6]) if len(sys.argv) > 6 else None
tox = _unpack(z, "t_")  # the teacher's toxic sequences
rng = np.random.default_rng(0)
pick = rng.choice(len(tox), nseq, replace=False)
low = collections.Counter()
D = collections.defaultdict(list)
tot = 0.0
kl = []
with FusedRuntime(model, cal, alpha, n_ctx=128, n_batch=128) as rt:
    gate = None if gate_from is None else toxic_gate(rt, gate_from)
    for k in pick:
        la, lb = rt.logprobs_and_target(tox[k])
        top = np.argpartition(-lb, 32, axis=1)[:, :32]
        lbt = np.take_along_axis(lb, top, 1).astype(np.float64)
        r = np.take_along_axis(la, top, 1) - lbt
        if center is not None:
            r = r - np.median(r, axis=1, keepdims=True) + center
        d = np.minimum(r, 0)
        if gate is not None:
            d = d * gate[top]
        new = lbt + d
        new -= np.logaddexp.reduce(new, axis=1, keepdims=True)
        lbn = lbt - np.logaddexp.reduce(lbt, axis=1, keepdims=True)
        kl += list((np.exp(new) * (new - lbn)).sum(1))
        m = np.exp(lbt) * (1 - np.exp(d))
        tot += m.sum()
        for ids, ms, dd in zip(top, m, d - d.max(1, keepdims=True), strict=True):
            for a, x, y in zip(ids, ms, dd, strict=True):
                low[int(a)] += x
                D[int(a)].append(y)
    print(f"one-sided KL over top-32 {np.mean(kl):.3f}, moved per position {tot / len(kl):.3f}")
    ranked = [a for a, _ in low.most_common()]
    print(" | ".join(f"{rt.detokenize([a])!r} {x / tot * 100:.2f}" for a, x in low.most_common(40)))
    for w in [
        ",",
        " the",
        " a",
        " fuck",
        " fucking",
        " shit",
        " hell",
        " ass",
        " stupid",
        " idiot",
        " sex",
        " dick",
        " bitch",
    ]:
        t = rt.tokenize(w, add_special=False)
        if len(t) == 1 and t[0] in D:
            print(
                f"{w!r:10} rank {ranked.index(t[0]) + 1:5} share {low[t[0]] / tot * 100:.2f}%"
                f" median log-ratio {np.median(D[t[0]]):6.2f} n={len(D[t[0]])}"
            )
