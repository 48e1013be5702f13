"""What a distill teacher moves: KL(teacher || unedited) per position and the tokens that lose the most probability,
over the teacher's own top-k (a token the teacher lowers far enough leaves it, so per-token shares undercount those:
calibrator_lowers.py measures at the unedited model's top 32 instead).
Usage: python moved_mass.py STAGES/teacher-KEY.npz STAGES/f16-KEY.gguf N_SEQUENCES (a random draw, seed 0)."""

import collections
import sys

import numpy as np

from pydetox.discover.distill.teacher import _Targets
from pydetox.runtime import LlamaRuntime

z = np.load(sys.argv[1])
model = sys.argv[2]
nseq = int(sys.argv[3])
t = _Targets.from_arrays(z, "t_")
rng = np.random.default_rng(0)
pick = rng.choice(len(t), nseq, replace=False)
drop = collections.Counter()
gain = collections.Counter()
kl = []
with LlamaRuntime(model, n_ctx=256, n_batch=256) as rt:
    for s in pick:
        lb = rt.logprobs(t.seqs[s]).astype(np.float64)
        ids, lp, rest = t.ids[s], t.logp[s].astype(np.float64), t.rest[s].astype(np.float64)
        lu = np.take_along_axis(lb, ids, axis=1)
        pu, pt = np.exp(lu), np.exp(lp)
        # KL(teacher || unedited) over the top-k and the rest bucket
        ru = np.maximum(1e-12, 1 - pu.sum(1))
        kl += list((pt * (lp - lu)).sum(1) + np.exp(rest) * (rest - np.log(ru)))
        for row, d in zip(ids, pu - pt, strict=True):
            for a, b in zip(row, d, strict=True):
                if b > 0:
                    drop[int(a)] += b
                else:
                    gain[int(a)] -= b
    tot = sum(drop.values())
    print(
        f"positions {len(kl)}, mean KL(teacher || unedited) {np.mean(kl):.4f} (median {np.median(kl):.4f}),"
        f" probability moved per position {tot / len(kl):.4f}"
    )
    for name, c, n in (("LOWERED", drop, 60), ("RAISED", gain, 40)):
        print(f"{name} (share of the probability moved, %):")
        print(" | ".join(f"{rt.detokenize([a])!r} {b / tot * 100:.2f}" for a, b in c.most_common(n)))
    print("top-50 lowered share", round(sum(b for _, b in drop.most_common(50)) / tot, 4))
