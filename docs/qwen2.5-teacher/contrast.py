"""DExperts' contrast (distill's anti / expert, ratio and probability rules) applied to the unedited model's top 32 on
the teacher's toxic sequences: KL per position and the tokens that lose the most. "ratioU": the ratio rule against the
unedited model instead of the expert.
Usage: python contrast.py TEACHER.npz F16.gguf EXPERT.gguf ANTI.gguf N."""

import collections
import sys

import numpy as np

from pydetox.discover.distill.teacher import _unpack
from pydetox.fusion import FusedRuntime

z = np.load(sys.argv[1])
model = sys.argv[2]
expert = sys.argv[3]
anti = sys.argv[4]
nseq = int(sys.argv[5])
tox = _unpack(z, "t_")  # the teacher's toxic sequences
rng = np.random.default_rng(0)
pick = rng.choice(len(tox), nseq, replace=False)
rows = []

with (
    FusedRuntime(model, expert, 0.5, n_ctx=128, n_batch=128) as re_,
    FusedRuntime(model, anti, 0.5, n_ctx=128, n_batch=128) as ra,
):
    for k in pick:
        s = tox[k]
        le, lb = re_.logprobs_and_target(s)
        la, _ = ra.logprobs_and_target(s)
        top = np.argpartition(-lb, 32, axis=1)[:, :32]
        rows.append((top, *(np.take_along_axis(x, top, 1).astype(np.float64) for x in (lb, le, la))))
    spec = set(range(151643, 151665))  # Qwen2.5's special tokens: no penalty, as distill spares them
    for rule, lam, margin in [
        ("ratio", 1, 3),
        ("ratio", 1, 1.5),
        ("ratio", 2, 2),
        ("ratio", 3, 1.5),
        ("ratio", 1, 1.0),
        ("prob", 20, 1),
        ("ratioU", 1, 3),
    ]:
        lowered = collections.Counter()
        tot = 0.0
        kls = []
        top1 = 0
        n = 0
        for top, lb, le, la in rows:
            ref = lb if rule == "ratioU" else le
            gap = ref - la + np.log(margin) if rule.startswith("ratio") else np.exp(le) - np.exp(la)
            pen = lam * np.minimum(0, gap)
            pen[np.isin(top, list(spec))] = 0
            rest = np.log1p(-np.minimum(np.exp(lb).sum(1), 1 - 1e-9))
            new = lb + pen
            zz = np.logaddexp(np.logaddexp.reduce(new, axis=1), rest)
            new -= zz[:, None]
            rn = rest - zz
            kls += list((np.exp(new) * (new - lb)).sum(1) + np.exp(rn) * (rn - rest))
            m = np.maximum(np.exp(lb) - np.exp(new), 0)
            for ids, ms in zip(top, m, strict=True):
                for a, x in zip(ids, ms, strict=True):
                    lowered[int(a)] += x
            tot += m.sum()
            top1 += (new.argmax(1) != lb.argmax(1)).sum()
            n += len(lb)
        print(
            f"\n{rule} lam={lam} margin={margin}: mean KL {np.mean(kls):.3f} median {np.median(kls):.4f}"
            f" top changed {top1 / n:.3f}, moved/pos {tot / n:.3f}"
        )
        print(" | ".join(f"{re_.detokenize([a])!r} {x / tot * 100:.1f}" for a, x in lowered.most_common(45)))
