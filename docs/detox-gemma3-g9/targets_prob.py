# the expert's log-probabilities at the teacher's top-k ids, into g7q's cache sibling (as distill would), then stats
import sys, time
from pathlib import Path
import numpy as np, gguf
from pydetox.discover.distill import _Targets, _side_logp, _debiased
cache = Path('/tmp/w/g7q/teacher.npz')
z = np.load(cache); key = str(z['key']); t = _Targets.from_arrays(z, "t_")
src = Path('/tmp/w/base.Q4_K_M.gguf')
t0 = time.time()
anti, h1 = _side_logp(src, 'anti', '/tmp/w/anti/antigemma.gguf', 0.5, t, key, cache, True)
exp, h2 = _side_logp(src, 'expert', '/tmp/w/expert/expgemma.gguf', 0.5, t, key, cache, True)
print("anti from cache", h1, "expert from cache", h2, f"{time.time()-t0:.0f} s", flush=True)
spare = np.array([1, 0, 2, 3, 106, 107])
r = gguf.GGUFReader(str(src))
f = r.fields['tokenizer.ggml.tokens']; toks = [bytes(f.parts[i]).decode('utf-8', 'replace') for i in f.data]
ids = np.concatenate(t.ids)
old = np.exp(np.concatenate(t.logp).astype(np.float64)); ro = np.exp(np.concatenate(t.rest).astype(np.float64))
def report(name, s):
    new = np.exp(np.concatenate(s.logp).astype(np.float64)); rn = np.exp(np.concatenate(s.rest).astype(np.float64))
    kl = (new * (np.log(np.maximum(new, 1e-30)) - np.log(np.maximum(old, 1e-30)))).sum(1) + rn * (np.log(rn) - np.log(ro))
    print(f"{name}: mean KL {kl.mean():.4f} median {np.median(kl):.5f} argmax changed {(old.argmax(1) != new.argmax(1)).mean():.4f}")
    lost = np.bincount(ids.ravel(), weights=(old - new).ravel(), minlength=len(toks))
    top = np.argsort(-lost)[:40]
    print("  lost:", ", ".join(f"{toks[i]!r} {lost[i]:.1f}" for i in top), flush=True)
both = [np.stack([e[1], a[1]]) for e, a in zip(exp, anti)]
for lam in (20, 50, 100, 200):
    report(f"expert vs anti, prob rule, lam {lam}", _debiased(t, both, lam, spare))
report("unedited vs anti, prob rule, lam 50 (g8)", _debiased(t, anti, 50, spare))
