"""`pydetox calibrate train`: the calibration model of output-layer fusion (see `pydetox.fusion`), trained in torch on
CPU and written as a GGUF that llama.cpp loads, with its alignment file beside it.

The calibrator is the target's first `layers` transformer layers (3, as in the paper) with the target's token
embedding, tokenizer and final norm: initialised from the target, so its hidden space starts out as the target's.
Training, on non-toxic text only for a calibrator (the neutral side of the ParaDetox pairs, and Wikipedia paragraphs;
never the `news` text perplexity is measured on, nor the evaluation prompts); `side` "toxic" with no clean text trains
distill's anti-expert on the toxic side instead, and "neutral" with no clean text its expert:

1. Alignment. A linear map A (d_target x d_cal) from the calibrator's hidden space to the target's, learned with a
   contrastive (InfoNCE) loss over the shared vocabulary: the calibrator's representation of token v, mapped by A,
   must be closer to the target's output embedding of v than to those of the other tokens of the batch.
2. Language modelling through the target's frozen output layer W, on the non-toxic text, training the calibrator's
   layers, A and g (LN(u) = g * u / rms(u)), with the contrastive loss kept as a regulariser of A. Objective
   `fused` (default): the cross-entropy of the fused model, W (alpha LN(A h_c) + (1 - alpha) h_t), with the frozen
   target in the loop (its final hidden states h_t computed once for all rows) and alpha drawn per step from
   `train_alpha`: the calibrator learns what to add to the target so that it continues like non-toxic text.
   Objective `standalone`: the calibrator alone, W LN(A h_c), a small non-toxic language model (cheaper, and it
   costs more perplexity once fused: docs/results/fusion.md). The queries and keys of the attention (q_proj, k_proj) stay
   the target's: the calibrator keeps the target's attention patterns, and llama.cpp's row permutation of those
   matrices never has to be undone.

Output: `CAL.gguf` (token embedding copied byte for byte from the target; trained layers at `output_type`; its
output tensor W' = W diag(g) A, so that llama.cpp computes the calibrator's half of the fused logits), `CAL.align.gguf`
(A, g), `CAL.train.json` (settings and loss curves) and `CAL.loss.png`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tqdm import tqdm

from pydetox import ggml, heap, kernels, keys, splits
from pydetox.errors import PydetoxError
from pydetox.fusion import Alignment, alignment_path, vocab_fingerprint
from pydetox.gguf_io import AtomicGGUFWriter, ModelFile, OutTensor, nbytes
from pydetox.output import atomic, write_text

KEY_TARGET = keys.CALIBRATOR_TARGET
KEY_LAYERS = keys.CALIBRATOR_LAYERS
_ROWS = 32768  # output-layer rows made float32 at once where the whole layer is used (Gemma-3 has 262,144)


@dataclass(frozen=True)
class CalibrateSettings:
    layers: int = 3  # transformer layers of the calibrator (the paper uses 3)
    steps: int = 400  # language-modelling steps
    batch: int = 16  # sequences per step
    seq_len: int = 64  # tokens per sequence (texts are packed, separated by EOS)
    lr: float = 3e-4  # AdamW, linear warm-up over 20 steps, cosine decay
    weight_decay: float = 0.0
    align_steps: int = 100  # contrastive steps that fit A before language modelling
    contrastive_weight: float = 0.1  # weight of the contrastive loss during language modelling
    tau: float = 0.05  # InfoNCE temperature
    vocab_sample: int = 2048  # tokens per contrastive batch
    pairs: str = "paradetox-3000"  # ParaDetox pairs; the `side` side is used
    # "neutral": a calibrator (with clean_tokens 0: distill's expert). "toxic": an anti-expert, the same model trained
    # on the toxic side of the pairs (set clean_tokens to 0), for a teacher that moves away from what it adds
    # (DExperts, Liu et al. ACL 2021; see `pydetox.discover.distill`'s `anti` and `expert`).
    side: str = "neutral"
    clean_text: str = "wiki"  # non-toxic clean text (not `news`: perplexity is measured there)
    clean_tokens: int = 300_000
    val_fraction: float = 0.05
    eval_every: int = 25  # validation every this many steps (how training is watched: not in what it makes)
    # "fused": the loss is the cross-entropy of the fused model, alpha LN(A h_c) + (1 - alpha) h_t through W, with the
    # frozen target in the loop (its hidden states computed once), alpha drawn per step from `train_alpha`: the
    # calibrator learns what to add to the target on non-toxic text. "standalone": the calibrator alone through W.
    objective: str = "fused"
    train_alpha: tuple[float, float] = (0.2, 0.6)
    output_type: str = "Q8_0"  # type of the calibrator's output tensor W diag(g) A (token_embd keeps the target's)
    # Type of the trained layers' matrices. F16, not Q8_0: llama.cpp quantizes the activations to Q8_0 as well when the
    # weights are Q8_0, and on Gemma-3's large residual activations that moved the calibrator's hidden states by 1.1%
    # (untrained) to 4.8% (trained) rel. RMS from torch's; F16 layers give 0.03%. Three layers cost little either way.
    layer_type: str = "F16"
    # "bfloat16": forward and backward passes under torch's CPU autocast (oneDNN's AVX-512 BF16 kernels where the
    # CPU has them), weights and optimizer state kept in float32.
    precision: str = "float32"
    # Train the language-modelling softmax over the tokens the training rows contain instead of the whole vocabulary
    # (a sampled softmax: every target is inside it). The output layer is most of a step's cost.
    restrict_vocab: bool = False
    seed: int = 0
    threads: int | None = None


# Settings that change how training is watched, not the calibrator it makes (validation draws nothing from the
# generator and runs without gradients): left out of the keys calibrators are cached under.
WATCHING = ("eval_every",)


@dataclass
class CalibrateResult:
    calibrator: Path
    alignment: Path
    log: Path
    plot: Path | None
    train_loss: float
    val_loss: float
    val_loss_start: float
    seconds: float


def training_texts(settings: CalibrateSettings) -> tuple[list[str], list[str], str]:
    """The `side` of the pairs (neutral for a calibrator), then clean-text paragraphs; evaluation prompts excluded."""
    from pydetox.discover.data import usable_pairs
    from pydetox.prompts import load_clean_text

    if settings.side not in ("neutral", "toxic"):
        raise PydetoxError(f"side is 'neutral' (a calibrator) or 'toxic' (an anti-expert), not {settings.side!r}")
    rows, source = usable_pairs(settings.pairs, set(splits.evaluation_prompts()))
    sentences = [r[settings.side] for r in rows]
    clean: list[str] = []
    if settings.clean_tokens > 0:
        if settings.clean_text == "news":
            raise PydetoxError("the calibrator must not train on `news`: that is where perplexity is measured; use wiki or a file")
        clean = load_clean_text(settings.clean_text)
        if settings.clean_text == "wiki":
            clean = splits.training_wiki()  # the first paragraphs are for measuring
    desc = f"{len(sentences)} {settings.side} sentences of {source} + {settings.clean_text} (up to {settings.clean_tokens} tokens)"
    return sentences, clean, desc


def pack(tokenizer: Any, texts: list[str], n_sentences: int, clean_tokens: int, seq_len: int) -> np.ndarray:
    """Token rows of `seq_len`: each text tokenized without special tokens and followed by EOS, concatenated, cut."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    stream: list[int] = []
    clean_used = 0
    for i, t in enumerate(texts):
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if i >= n_sentences:
            if clean_used >= clean_tokens:
                break
            clean_used += len(ids)
        stream += ids + ([eos] if eos is not None else [])
    body = seq_len - (1 if bos is not None else 0)
    n = len(stream) // body
    if n < 2:
        raise PydetoxError(f"{len(stream)} training tokens make fewer than two rows of {seq_len}")
    rows = np.asarray(stream[: n * body], dtype=np.int64).reshape(n, body)
    if bos is not None:
        rows = np.concatenate([np.full((n, 1), bos, np.int64), rows], axis=1)
    return rows


def _truncate(fp: Any, layers: int) -> None:
    model = fp.model
    n = len(model.model.layers)
    if not 1 <= layers < n:
        raise PydetoxError(f"a calibrator takes 1..{n - 1} of the target's {n} layers, not {layers}")
    model.model.layers = model.model.layers[:layers]
    cfg = model.config
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]


def _trainable(name: str) -> bool:
    if "embed_tokens" in name or "lm_head" in name:
        return False
    if ".q_proj." in name or ".k_proj." in name:
        return False  # see the module docstring
    return name.startswith(("model.layers.", "model.norm."))


def _check_paths(target: Path, out: Path) -> None:
    if out.suffix != ".gguf":
        raise PydetoxError(f"the calibrator is written as a GGUF: expected an output name ending in .gguf, got {out.name}")
    if not out.parent.is_dir():
        raise PydetoxError(f"output folder {out.parent} does not exist")
    if out.resolve() == target.resolve():
        raise PydetoxError("the calibrator would overwrite its target; choose another output name")


def _float_rows(W: Any) -> Any:
    """The rows of the output layer `W` as float32 blocks of _ROWS rows (never the whole layer in float32)."""
    return (W[j : j + _ROWS].float() for j in range(0, len(W), _ROWS))


class _Trainer:
    """The calibrator being trained: the target's first layers (trainable), the alignment A (d_target x d_cal) and
    gain g into the target's frozen output layer W, the training and validation rows, and the target's own final
    hidden states on them (objective "fused")."""

    def __init__(self, fp: Any, settings: CalibrateSettings, rng: np.random.Generator, progress: bool) -> None:
        from pydetox.discover.model import autocast, store_float32

        torch = fp.torch
        self.torch, self.fp, self.settings, self.rng = torch, fp, settings, rng
        dev = self.dev = fp.device
        model = self.model = fp.model
        sentences, clean, self.data_desc = training_texts(settings)
        rows = pack(fp.tokenizer, sentences + clean, len(sentences), settings.clean_tokens, settings.seq_len)
        order = rng.permutation(len(rows))
        n_val = max(1, int(len(rows) * settings.val_fraction))
        # At most steps x batch training rows: a row no step draws would only cost its target hidden states.
        n_train = min(len(rows) - n_val, settings.steps * settings.batch)
        self.val_rows = torch.from_numpy(rows[order[:n_val]]).to(dev)
        self.train_rows = torch.from_numpy(rows[order[n_val : n_val + n_train]]).to(dev)
        self.bf16 = autocast(settings.precision, "calibrate", dev)
        # (V, d_target): the target's output layer, frozen (embeddings are not trained), kept as the model stores it
        # (a half type after the recipe's f16 stage) with float32 rows made where a use needs them: a float32 copy of
        # the whole is 671 MB on Gemma-3's 262k vocabulary, and only the restricted softmax's rows are used per step.
        self.W = fp.model.get_output_embeddings().weight.detach()
        self.H_train = self.H_val = None
        self.used = torch.from_numpy(np.unique(rows)).to(dev)
        # H_train's row of each training row (-1: none; a row no step draws needs no hidden states)
        self.slot = torch.full((len(self.train_rows),), -1, dtype=torch.long, device=dev)
        if settings.objective == "fused":
            # The target's final hidden states once, of the rows the steps will draw (71% of them at the defaults):
            # the fused loss needs them at every step.
            drawn = _drawn_rows(rng, settings, len(self.train_rows), len(self.used))
            self.slot[torch.from_numpy(drawn).to(dev)] = torch.arange(len(drawn), device=dev)
            # computing_in: the decoder's weights in the autocast type while the states are computed (no cast at
            # every call), read back before the kept layers become float32 trainable ones
            with fp.computing_in(settings.precision), self.bf16:
                # on the CPU in a temporary file (`_DiskStates`); a GPU's states stay in its memory
                self.H_train = _target_hidden(model, self.train_rows[torch.from_numpy(drawn).to(dev)], settings.batch,
                                              progress, on_disk=dev == "cpu")
                self.H_val = _target_hidden(model, self.val_rows, settings.batch, progress)
        elif settings.objective != "standalone":
            raise PydetoxError(f"objective is 'fused' or 'standalone', not {settings.objective!r}")
        _truncate(fp, settings.layers)
        store_float32(model.model.layers.modules())  # the kept layers are trained: float32 whatever the target's storage
        heap.release()  # the dropped layers and the kept ones' half-type weights, back to the system
        params = dict(model.named_parameters())
        for n, p in params.items():
            p.requires_grad_(_trainable(n))
        self.trained = {n: p for n, p in params.items() if p.requires_grad}
        self.initial = {n: p.detach().clone() for n, p in self.trained.items()}
        d_t, d_c = self.W.shape[1], model.config.hidden_size
        self.A = torch.nn.Parameter(torch.eye(d_t, d_c, device=dev))
        # LN(A h_c) ~ h_c at the start needs g = rms(h_c), measured on training rows. The rms of the final norm's
        # gain is no substitute: on Gemma-3 it is far from uniform, and a fused model would start tens of nats off.
        with torch.no_grad():
            h0 = model.model(input_ids=self.train_rows[: settings.batch]).last_hidden_state
            self.g = torch.nn.Parameter(torch.full((d_t,), float(h0.pow(2).mean(-1).sqrt().mean()), device=dev))
        self.eps = 1e-6
        self.E_cal = model.get_input_embeddings().weight.detach()
        # The softmax's rows: the whole output layer, or only the tokens of the training data (targets re-indexed).
        self.W_lm = (self.W[self.used] if settings.restrict_vocab else self.W).float()
        self.index = torch.full((self.W.shape[0],), -1, dtype=torch.long, device=dev)
        self.index[self.used] = torch.arange(len(self.used), device=dev)
        lo, hi = settings.train_alpha
        self.val_alpha = 0.5 * (lo + hi)

    def targets(self, batch: Any) -> Any:
        return self.index[batch[:, 1:]] if self.settings.restrict_vocab else batch[:, 1:]

    def contrastive(self) -> Any:
        """InfoNCE between the calibrator's input embeddings mapped by A and the target's output rows, on a sample
        of the training data's tokens."""
        F, s, used = self.torch.nn.functional, self.settings, self.used
        pick = self.rng.choice(len(used), min(s.vocab_sample, len(used)), replace=False)
        ids = used[self.torch.from_numpy(pick).to(self.dev)]
        c = F.normalize(self.E_cal[ids].float() @ self.A.T, dim=1)
        t = F.normalize(self.W[ids].float(), dim=1)
        return F.cross_entropy(c @ t.T / s.tau, self.torch.arange(len(ids), device=self.dev))

    def lm_loss(self, batch: Any, h_t: Any, alpha: float) -> Any:
        """Next-token cross-entropy of the calibrator (fused with the target's states `h_t` at weight `alpha`)."""
        h = self.model.model(input_ids=batch).last_hidden_state  # after the final norm
        u = h @ self.A.T
        z = self.g * u * self.torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + self.eps)
        if h_t is not None:
            z = alpha * z + (1.0 - alpha) * h_t
        logits = z[:, :-1] @ self.W_lm.T
        return self.torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                      self.targets(batch).reshape(-1))

    def validate(self) -> float:
        b, rows, H = self.settings.batch, self.val_rows, self.H_val
        self.model.eval()
        with self.torch.no_grad(), self.bf16:
            losses = [float(self.lm_loss(rows[i : i + b], None if H is None else H[i : i + b], self.val_alpha))
                      for i in range(0, len(rows), b)]
        return float(np.mean(losses))

    def target_alone(self) -> float:
        """The target's own validation loss (what fusion has to keep)."""
        torch, H, W, rows = self.torch, self.H_val, self.W, self.val_rows
        assert H is not None
        losses = []
        with torch.no_grad():
            for i in range(0, len(rows), 16):
                h, y = H[i : i + 16, :-1].reshape(-1, H.shape[-1]), rows[i : i + 16, 1:].reshape(-1)
                # the cross-entropy over the whole vocabulary, a block of float32 output rows at a time
                lse = torch.stack([torch.logsumexp(h @ w.T, dim=-1) for w in _float_rows(W)]).logsumexp(0)
                losses.append(float((lse - (h * W[y].float()).sum(-1)).mean()))
        return float(np.mean(losses))

    def align(self, log: dict[str, Any], progress: bool) -> None:
        """Stage 1: A alone, by the contrastive loss."""
        opt = self.torch.optim.Adam([self.A], lr=1e-3)
        for step in tqdm(range(self.settings.align_steps), desc="align", disable=not progress, leave=False):
            loss = self.contrastive()
            opt.zero_grad()
            loss.backward()
            opt.step()
            log["align"].append([step, float(loss.detach())])

    def language_model(self, log: dict[str, Any], progress: bool) -> float | None:
        """Stage 2: the kept layers, A and g by language modelling (fused at a random alpha per step), with warm-up
        and cosine decay; validation every `eval_every` steps. Returns the final moving average of the loss."""
        torch, s, rng = self.torch, self.settings, self.rng
        lo, hi = s.train_alpha
        weights = [*self.trained.values(), self.A, self.g]
        opt = torch.optim.AdamW(weights, lr=s.lr, weight_decay=s.weight_decay)

        def lr_at(step: int) -> float:
            warm = 20
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, s.steps - warm)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        ema = None
        bar = tqdm(range(s.steps), desc="calibrate", disable=not progress)
        for step in bar:
            self.model.train()
            idx = torch.from_numpy(rng.integers(0, len(self.train_rows), s.batch)).to(self.dev)
            alpha = float(rng.uniform(lo, hi))
            h_t = None
            if self.H_train is not None:
                slot = self.slot[idx]
                if bool((slot < 0).any()):  # the draws differ from _drawn_rows': a change there or here broke the replay
                    raise PydetoxError(f"calibrator step {step}: a training row without the target's hidden states")
                h_t = self.H_train[slot]
            with self.bf16:
                lm = self.lm_loss(self.train_rows[idx], h_t, alpha)
                loss = lm + s.contrastive_weight * self.contrastive() if s.contrastive_weight > 0 else lm
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(weights, 1.0)
            opt.step()
            sched.step()
            heap.trim()  # this step's freed arrays back to the system, as the student does
            lm_value = float(lm.detach())
            ema = lm_value if ema is None else 0.9 * ema + 0.1 * lm_value
            log["train"].append([step + 1, lm_value])
            if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
                log["val"].append([step + 1, self.validate()])
            bar.set_postfix(loss=f"{ema:.3f}", val=f"{log['val'][-1][1]:.3f}")
        bar.close()
        self.model.eval()
        for w in weights:
            w.grad = None  # nothing reads them after training; the optimizer's state goes with `opt`
        return ema

    def write(self, target: Path, out: Path) -> dict[str, Any]:
        """The calibrator GGUF at `out`, and how its hidden states in llama.cpp compare with torch's on one row."""
        s = self.settings
        with self.torch.no_grad():
            # (V, d_cal): W diag(g) A, a block of float32 rows of W at a time into one array (a list joined at the
            # end would hold it twice: 545 MB each on Qwen2.5's 151,936 x 896)
            W_fused = self.torch.empty((self.W.shape[0], self.A.shape[1]), device=self.dev)
            for j, w in zip(range(0, len(self.W), _ROWS), _float_rows(self.W), strict=True):
                W_fused[j : j + len(w)] = (w * self.g[None, :]) @ self.A
            deltas = {n: (p.detach() - self.initial[n]).cpu().numpy() for n, p in self.trained.items()}
        with ModelFile(target) as src:
            write_calibrator(src, out, self.fp.arch, s.layers, deltas, W_fused.cpu().numpy(), s.output_type,
                             threads=s.threads, layer_type=s.layer_type)
        with self.torch.no_grad():
            row = self.val_rows[0]
            h_torch = self.model.model(input_ids=row[None]).last_hidden_state[0].cpu().numpy()
        h_llama = calibrator_hidden(out, row.tolist(), threads=s.threads)
        return {"tokens": len(row), "max_abs_diff": float(np.abs(h_llama - h_torch).max()),
                "rel_rms_diff": float(np.sqrt(((h_llama - h_torch) ** 2).mean() / (h_torch**2).mean()))}


def train(target: str | Path, out: str | Path, settings: CalibrateSettings = CalibrateSettings(),
          progress: bool = True, plot: bool = True, device: str = "auto") -> CalibrateResult:
    """Train a calibrator for the GGUF `target` and write `out` (a GGUF), its alignment, log and loss plot. `device`:
    the torch device to train on ("cpu", "cuda", or "auto": see `pydetox.discover.model.resolve_device`)."""
    from pydetox.extras import require

    torch = require("torch", "calibrator training")

    from pydetox.discover.model import FullPrecisionModel

    t_start = time.perf_counter()
    target, out = Path(target), Path(out)
    _check_paths(target, out)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    t = _Trainer(FullPrecisionModel(target, progress=progress, device=device), settings, rng, progress)
    log: dict[str, Any] = {"settings": asdict(settings), "device": t.dev, "target": str(target), "data": t.data_desc,
                           "rows": {"train": len(t.train_rows), "val": len(t.val_rows), "seq_len": settings.seq_len,
                                    "target_states": 0 if t.H_train is None else len(t.H_train)},
                           "val_alpha": t.val_alpha if t.H_val is not None else None, "align": [], "train": [], "val": []}
    if t.H_val is not None:
        log["val_target_alone"] = t.target_alone()
    t.align(log, progress)
    val_start = t.validate()
    log["val"].append([0, val_start])
    ema = t.language_model(log, progress)
    if isinstance(t.H_train, _DiskStates):
        t.H_train.close()
    t.H_train = t.H_val = None  # the target's states are done with: memory for writing the calibrator
    heap.release()
    check = log["llama_cpp_check"] = t.write(target, out)
    with ModelFile(out) as cal:
        fingerprint = vocab_fingerprint(cal)
    info = {"llama_cpp_check": check, "target": target.name, "layers": settings.layers, "data": t.data_desc,
            "train_loss_final": ema, "val_loss": log["val"][-1][1], "val_loss_start": val_start, "steps": settings.steps}
    align_file = Alignment(t.A.detach().cpu().numpy(), t.g.detach().cpu().numpy(), t.eps, fingerprint,
                           info).save(alignment_path(out))
    seconds = time.perf_counter() - t_start
    log["seconds"] = seconds
    log_file = write_text(log_path(out), json.dumps(log, indent=1) + "\n")
    plot_file = plot_losses(log, plot_path(out)) if plot else None
    return CalibrateResult(out, align_file, log_file, plot_file, float(ema or 0.0), log["val"][-1][1], val_start, seconds)


def log_path(calibrator: Path) -> Path:
    """Where `train` writes the training log of the calibrator `calibrator`."""
    return calibrator.with_name(calibrator.name.removesuffix(".gguf") + ".train.json")


def plot_path(calibrator: Path) -> Path:
    """Where `train` writes the loss plot of the calibrator `calibrator`."""
    return calibrator.with_name(calibrator.name.removesuffix(".gguf") + ".loss.png")


def write_calibrator(src: ModelFile, out: Path, arch: str, layers: int, deltas: dict[str, np.ndarray],
                     output: np.ndarray, output_type: str, threads: int | None = None, layer_type: str = "F16") -> Path:
    """The target's token embedding (bytes as they are), its first `layers` blocks plus the trained deltas (matrices
    at `layer_type`), its final norm plus delta, and `output` as the output tensor at `output_type`, with the target's
    metadata and `block_count` = layers."""
    qtype = ggml.parse_type(output_type)
    ltype = ggml.parse_type(layer_type)
    try:
        arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    except StopIteration:
        raise PydetoxError(f"no GGUF tensor map for architecture {arch!r}") from None
    tmap = gguf.get_tensor_name_map(arch_enum, layers)
    by_gguf: dict[str, np.ndarray] = {}
    for hf_name, delta in deltas.items():
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PydetoxError(f"no GGUF name for the trained parameter {hf_name!r}")
        by_gguf[name] = delta
    keep: list[tuple[str, Any]] = []
    for name, entry in src.tensors.items():
        if name.startswith("blk."):
            if int(name.split(".")[1]) < layers:
                keep.append((name, entry))
        elif name != "output.weight":
            keep.append((name, entry))  # token_embd, output_norm, rope tables
    missing = set(by_gguf) - {n for n, _ in keep}
    if missing:
        raise PydetoxError(f"trained parameters without a tensor in {src.path.name}: {sorted(missing)}")
    plan: list[tuple[OutTensor, Any, np.ndarray | None]] = []
    for name, entry in keep:
        found = by_gguf.get(name)
        if found is None:
            plan.append((OutTensor(name, entry.qtype, entry.ne, entry.n_bytes), entry, None))
            continue
        W = kernels.dequantize(src.read(entry), entry.qtype, entry.rows, entry.cols, threads=threads)
        W = W + found.reshape(W.shape).astype(np.float32)
        t = ltype if len(entry.ne) == 2 and entry.cols % gguf.GGML_QUANT_SIZES[ltype][0] == 0 else gguf.GGMLQuantizationType.F32
        plan.append((OutTensor(name, t, entry.ne, nbytes(t, entry.ne)), entry, W))
    out_ne = (output.shape[1], output.shape[0])
    # as given when already float32 (astype copies by default: 545 MB more on Qwen2.5's output layer)
    plan.append((OutTensor("output.weight", qtype, out_ne, nbytes(qtype, out_ne)), None,
                 output.astype(np.float32, copy=False)))
    V = gguf.GGUFValueType
    metadata = {
        f"{arch}.block_count": (layers, V.UINT32),
        gguf.Keys.General.NAME: (f"{src.get_str(gguf.Keys.General.NAME) or src.path.stem} calibrator ({layers} layers)", V.STRING),
        KEY_TARGET: (src.path.name, V.STRING),
        KEY_LAYERS: (layers, V.UINT32),
    }
    with AtomicGGUFWriter(out, src, [p[0] for p in plan], metadata) as writer:
        for ot, entry, data in plan:
            if data is None:
                writer.copy_from(ot.name, src.fileno(), entry.offset, entry.n_bytes)
            elif ot.qtype == gguf.GGMLQuantizationType.F32:
                writer.write(ot.name, np.ascontiguousarray(data, np.float32))
            else:
                writer.write(ot.name, kernels.quantize(data.reshape(ot.ne[1], ot.ne[0]) if data.ndim == 2 else data,
                                                       ot.qtype, threads=threads))
        writer.commit()
    return out


def _drawn_rows(rng: np.random.Generator, settings: CalibrateSettings, n_train: int, n_used: int) -> np.ndarray:
    """The training rows `_Trainer.language_model` will draw, sorted: its draws and align's, which come first from
    the same generator, replayed on a copy (`rng` itself is not advanced). Mirrors `contrastive`'s and
    `language_model`'s calls in order; a step drawing a row not found here stops with an error."""
    import copy

    sim = copy.deepcopy(rng)
    k = min(settings.vocab_sample, n_used)
    for _ in range(settings.align_steps):
        sim.choice(n_used, k, replace=False)
    lo, hi = settings.train_alpha
    drawn = []
    for _ in range(settings.steps):
        drawn.append(sim.integers(0, n_train, settings.batch))
        sim.uniform(lo, hi)
        if settings.contrastive_weight > 0:
            sim.choice(n_used, k, replace=False)
    return np.unique(np.concatenate(drawn)) if drawn else np.zeros(0, np.int64)


class _DiskStates:
    """(n, T, d) float32 rows in an anonymous temporary file (unlinked at creation, gone when closed), written and
    read back a block of rows at a time with plain file reads: the target's states for the training steps are the
    calibrator's largest array (3,640 rows x 64 tokens x 896 floats, 0.84 GB, at the default's settings on Qwen2.5;
    x4.6 on a 7B model's 4,096 dimensions) and each step reads 16 rows of them. Not a memory map: pages of a mapped
    file that were read count as the process's resident memory; read this way they sit in the system's page cache,
    which gives them up under pressure. `H[idx]` with a tensor of row indices gives those rows as a CPU tensor."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        import tempfile

        self.shape = shape
        self.row_bytes = shape[1] * shape[2] * 4
        self.file = tempfile.TemporaryFile(prefix="pydetox-states-")  # noqa: SIM115  (owned until close())
        self.file.truncate(shape[0] * self.row_bytes)

    def __len__(self) -> int:
        return self.shape[0]

    def write(self, start: int, block: Any) -> None:
        data = np.ascontiguousarray(block.detach().cpu().numpy(), np.float32)
        self.file.seek(start * self.row_bytes)
        self.file.write(memoryview(data).cast("B"))

    def __getitem__(self, index: Any) -> Any:
        import torch

        rows = index.tolist() if hasattr(index, "tolist") else list(index)
        out = np.empty((len(rows), *self.shape[1:]), np.float32)
        for k, i in enumerate(rows):
            if not 0 <= i < self.shape[0]:
                raise IndexError(f"row {i} of {self.shape[0]} target states")
            self.file.seek(i * self.row_bytes)
            if self.file.readinto(memoryview(out[k]).cast("B")) != self.row_bytes:
                raise PydetoxError(f"the target states' temporary file ends before row {i}")
        return torch.from_numpy(out)

    def close(self) -> None:
        self.file.close()


def _target_hidden(model: Any, rows: Any, batch: int, progress: bool, on_disk: bool = False) -> Any:
    """The full target's final hidden states (after its final norm) of token rows, (n, T, d) float32, written into
    one array as the batches come (a list of batches joined at the end held them twice), or with `on_disk` into a
    `_DiskStates` file."""
    import torch

    shape = (*rows.shape, model.config.hidden_size)
    out = _DiskStates(shape) if on_disk else torch.empty(shape, dtype=torch.float32, device=rows.device)
    with torch.no_grad():
        for i in tqdm(range(0, len(rows), batch), desc="target hidden states", disable=not progress, leave=False):
            h = model.model(input_ids=rows[i : i + batch]).last_hidden_state
            if on_disk:
                out.write(i, h)
            else:
                out[i : i + batch] = h
    return out


def calibrator_hidden(path: Path, tokens: list[int], threads: int | None = None) -> np.ndarray:
    """The calibrator's final hidden states for `tokens` as llama.cpp computes them, (n, d)."""
    from pydetox.runtime import LlamaRuntime

    with LlamaRuntime(path, n_ctx=max(64, len(tokens)), n_batch=max(64, len(tokens)), threads=threads,
                      embeddings=True) as rt:
        rt.decode([(t, i, 0, True) for i, t in enumerate(tokens)])
        return rt.embeddings(len(tokens))


def plot_losses(log: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tr = np.asarray(log["train"])
    if len(tr):
        k = max(1, len(tr) // 50)
        smooth = np.convolve(tr[:, 1], np.ones(k) / k, mode="valid")
        ax.plot(tr[:, 0], tr[:, 1], color="0.8", lw=0.8, label="train (per step)")
        ax.plot(tr[k - 1 :, 0], smooth, color="C0", label=f"train (mean of {k})")
    va = np.asarray(log["val"])
    fused = log.get("val_alpha") is not None
    if len(va):
        what = f"held-out, fused at alpha {log['val_alpha']:g}" if fused else "held-out"
        ax.plot(va[:, 0], va[:, 1], "o-", color="C1", label=what)
    if log.get("val_target_alone") is not None:
        ax.axhline(log["val_target_alone"], color="C2", ls="--", label="held-out, target alone")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    objective = "fused model" if fused else "calibrator alone"
    ax.set_title(f"calibrator for {Path(log['target']).name}: {objective} on non-toxic text", fontsize=10)
    ax.legend()
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)
