import numpy as np, gguf
from pathlib import Path
from pydetox.discover.distill import _Targets
z = np.load('/tmp/w/g7q/teacher.npz'); t = _Targets.from_arrays(z, "t_")
a = np.load('/tmp/w/g7q/teacher.anti.npz')["logp"]; e = np.load('/tmp/w/g7q/teacher.expert.npz')["logp"]
spare=np.array([1,0,2,3,106,107])
r = gguf.GGUFReader('/tmp/w/base.Q4_K_M.gguf')
f = r.fields['tokenizer.ggml.tokens']; toks = [bytes(f.parts[i]).decode('utf-8','replace') for i in f.data]
ids = np.concatenate(t.ids); lp = np.concatenate(t.logp).astype(np.float64); rr = np.concatenate(t.rest).astype(np.float64)
old = np.exp(lp); ro = np.exp(rr)
la = a[1].astype(np.float64); le = e[1].astype(np.float64); lu = a[0].astype(np.float64)
print("positions", len(lp), "unedited rows equal:", np.abs(a[0]-e[0]).max())
for beta, tau in [(1, 3), (1, 10), (1, 30), (2, 10), (0.5, 3)]:
    pen = beta * np.minimum(0.0, le - la + np.log(tau)); pen[np.isin(ids, spare)] = 0; pen[lp < -1e3] = 0
    new = lp + pen; zz = np.logaddexp(np.logaddexp.reduce(new, axis=1), rr)
    new = np.exp(new - zz[:, None]); rn = np.exp(rr - zz)
    kl = (new * (np.log(np.maximum(new,1e-30)) - np.log(np.maximum(old,1e-30)))).sum(1) + rn*(np.log(rn)-np.log(ro))
    print(f"log-ratio beta {beta} tau {tau}: mean KL {kl.mean():.4f} median {np.median(kl):.5f} argmax changed {(old.argmax(1) != new.argmax(1)).mean():.4f}")
    lost = np.bincount(ids.ravel(), weights=(old - new).ravel(), minlength=len(toks))
    top = np.argsort(-lost)[:45]
    print("  lost:", ", ".join(f"{toks[i]!r} {lost[i]:.1f}" for i in top), flush=True)
