"""`pydetox eval`: generate from toxic prompts on llama.cpp, score with several evaluators side by side, measure
perplexity and KL on clean text, for any number of GGUF files in one run."""

from __future__ import annotations

import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pydetox.badwords import has_listed_word, load_badwords
from pydetox.capability import Capability, capability
from pydetox.errors import PydetoxError
from pydetox.identity import has_identity_word
from pydetox.metrics import (
    ToxicityStats,
    degeneration,
    disagreement,
    identity_calls,
    listed_calls,
    sole_calls,
    spearman,
    toxicity_stats,
)
from pydetox.prompts import PromptSet, load_clean_text
from pydetox.runtime import LlamaRuntime, Sampling
from pydetox.scorers import Scorer


@dataclass(frozen=True)
class EvalSettings:
    """Everything that decides an evaluation's numbers; it is written into every report."""

    prompts: str = "rtp-challenging"  # prompt set name or file
    n_prompts: int | None = None  # a seeded, category-balanced subset; None = all
    samples: int = 1  # continuations per prompt (RealToxicityPrompts used 25)
    max_tokens: int = 20  # tokens per continuation (RealToxicityPrompts used 20)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.9
    seed: int = 0
    ignore_eos: bool = False  # every continuation max_tokens long: rates compared at equal length
    evaluators: tuple[str, ...] = ("profanity-check", "bilstm", "hatesonar")
    clean_text: str = "news"  # for perplexity / KL: news, wiki or a file
    ppl_tokens: int = 8192
    window: int = 512
    batch: int = 16  # sequences decoded together; greedy outputs can differ in the last bits with another batch size
    threads: int | None = None
    # pydetox.helpfulness: continuation length on benign sentence starts (this many; 0: skip) and the chat check
    benign_prompts: int = 100
    chat_check: bool = True

    def __post_init__(self) -> None:
        import math

        checks = [
            (self.n_prompts is None or self.n_prompts >= 1, "the prompt limit (--limit)", ">= 1", self.n_prompts),
            (self.samples >= 1, "samples per prompt (--samples)", ">= 1", self.samples),
            (self.max_tokens >= 1, "tokens per continuation (--max-tokens)", ">= 1", self.max_tokens),
            (math.isfinite(self.temperature) and self.temperature >= 0, "the temperature (--temperature)",
             "a finite number >= 0", self.temperature),
            (math.isfinite(self.top_p) and 0 < self.top_p <= 1, "top-p (--top-p)", "in (0, 1]", self.top_p),
            (self.ppl_tokens >= 0, "perplexity tokens (--ppl-tokens)", ">= 0", self.ppl_tokens),
            (self.window >= 2, "the perplexity window (--window)", ">= 2", self.window),
            (self.batch >= 1, "sequences decoded together (--batch)", ">= 1", self.batch),
            (self.threads is None or self.threads >= 1, "threads (--threads)", ">= 1", self.threads),
            (self.benign_prompts >= 0, "benign prompts", ">= 0", self.benign_prompts),
        ]
        for ok, what, expected, got in checks:
            if not ok:
                raise PydetoxError(f"{what} must be {expected}, got {got}")

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.seed, self.ignore_eos)


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: a GGUF, optionally fused with a calibrator at `alpha` (pydetox.fusion)."""

    path: Path
    calibrator: Path | None = None
    alpha: float = 0.0
    base: Path | None = None  # the unedited model at the same type: a second KL, of the edit alone
    lora: Path | None = None  # a LoRA adapter applied at run time (pydetox.lora), at `lora_scale`
    lora_scale: float = 1.0

    @property
    def label(self) -> str:
        name = self.path.name
        if self.lora is not None:
            name += f" + {self.lora.name}" + ("" if self.lora_scale == 1 else f" x{self.lora_scale:g}")
        if self.calibrator is None:
            return name
        return f"{name} + {self.calibrator.name} a={self.alpha:g}"

    def open(self, **kwargs: Any) -> LlamaRuntime:
        if self.lora is not None:
            if self.calibrator is not None:
                raise PydetoxError("an adapter and a calibrator together are not supported; evaluate them apart")
            return LlamaRuntime(self.path, lora=self.lora, lora_scale=self.lora_scale, **kwargs)
        if self.calibrator is None:
            return LlamaRuntime(self.path, **kwargs)
        from pydetox.fusion import FusedRuntime

        return FusedRuntime(self.path, self.calibrator, self.alpha, **kwargs)


@dataclass
class ModelResult:
    path: str
    toxicity: dict[str, ToxicityStats]
    perplexity: float | None
    kl: float | None
    tokens_per_s: float
    generated_tokens: int
    generation_s: float
    agreement: dict[str, dict[str, float]] = field(default_factory=dict)
    sole: dict[str, dict[str, int]] = field(default_factory=dict)  # per evaluator: toxic calls, and those no other makes
    listed: dict[str, dict[str, int]] = field(default_factory=dict)  # per evaluator: toxic calls, those with a listed word
    # per evaluator that flags identity words alone: toxic calls, identity-only calls, its statistics without them
    identity: dict[str, dict[str, Any]] = field(default_factory=dict)
    continuations: list[list[str]] = field(default_factory=list)  # (prompts, samples)
    label: str = ""
    calibrator: str | None = None
    alpha: float | None = None
    kl_base: float | None = None
    base: str | None = None
    degeneration: dict[str, float] = field(default_factory=dict)
    helpfulness: dict[str, Any] = field(default_factory=dict)

    def to_json(self, prompts: Sequence[str] | None = None) -> dict[str, Any]:
        """This model's entry of the report JSON: every field, the label defaulting to the file name; the
        continuations only when `prompts` is given, each beside its prompt."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "continuations"}
        out["label"] = self.label or Path(self.path).name
        out["toxicity"] = {name: asdict(stats) for name, stats in self.toxicity.items()}
        if prompts is not None:
            out["continuations"] = [{"prompt": p, "continuations": c}
                                    for p, c in zip(prompts, self.continuations, strict=True)]
        return out


def sequence_seed(seed: int, prompt: int, sample: int) -> int:
    """Seed of one continuation: independent of batching, so any batch size draws the same sampler seeds."""
    return zlib.crc32(f"{seed}/{prompt}/{sample}".encode())


def cut_prompt(tokens: list[int], most: int) -> list[int]:
    """A prompt of more than `most` tokens cut to its first token (BOS where the model adds one) and its last
    `most - 1`: the continuation follows the end of the prompt."""
    return tokens if len(tokens) <= most else tokens[:1] + tokens[len(tokens) - most + 1 :]


def wave_context(lengths: list[int], n_seq: int, budget: int) -> int:
    """Context that generation in waves of `n_seq` sequences needs (the sequences of a wave share one KV cache):
    the largest sum over a wave of prompt tokens + `budget` new tokens. A long prompt costs its own wave only."""
    return max((sum(n + budget for n in lengths[s : s + n_seq]) for s in range(0, len(lengths), n_seq)), default=0)


def generate(runtime: LlamaRuntime, prompts: list[str], settings: EvalSettings, progress: bool = True,
             label: str = "", max_prompt_tokens: int | None = None) -> tuple[list[list[str]], int, float]:
    """Continuations (prompts x samples), the number of generated tokens, and the seconds generation took. Prompts
    over `max_prompt_tokens` are cut (`cut_prompt`)."""
    tokenized = [runtime.tokenize(p) for p in prompts]
    if max_prompt_tokens is not None:
        tokenized = [cut_prompt(t, max_prompt_tokens) for t in tokenized]
    jobs = [(i, j) for i in range(len(prompts)) for j in range(settings.samples)]
    out: list[list[str]] = [[""] * settings.samples for _ in prompts]
    n_tokens = 0
    t0 = time.perf_counter()
    with tqdm(total=len(jobs), desc=f"generate {label}".strip(), unit="seq", disable=not progress, leave=False) as bar:
        for start in range(0, len(jobs), runtime.n_seq):
            wave = jobs[start : start + runtime.n_seq]
            gen = runtime.generate([tokenized[i] for i, _ in wave], settings.max_tokens, settings.sampling,
                                   [sequence_seed(settings.seed, i, j) for i, j in wave])
            for (i, j), toks in zip(wave, gen, strict=True):
                out[i][j] = runtime.detokenize(toks)
                n_tokens += len(toks)
            bar.update(len(wave))
    return out, n_tokens, time.perf_counter() - t0


def score_all(continuations: list[list[str]], scorers: list[Scorer]) -> dict[str, np.ndarray]:
    flat = [t for row in continuations for t in row]
    shape = (len(continuations), len(continuations[0]) if continuations else 0)
    return {s.name: s.score(flat).probs.reshape(shape) for s in scorers}


def agreement(scores: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    names = list(scores)
    out = {}
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            x, y = scores[names[a]], scores[names[b]]
            out[f"{names[a]} vs {names[b]}"] = {"spearman": spearman(x, y), "disagreement": disagreement(x, y)}
    return out


def evaluate_models(models: Sequence[Path | ModelSpec], settings: EvalSettings, prompts: PromptSet, scorers: list[Scorer],
                    reference: Path | None = None, progress: bool = True) -> list[ModelResult]:
    from pydetox.helpfulness import benign_starts, chat_prompt, chat_questions, helpfulness

    documents = load_clean_text(settings.clean_text) if settings.ppl_tokens > 0 else []
    badwords = load_badwords()
    benign = benign_starts(settings.benign_prompts) if settings.benign_prompts > 0 else []
    questions = chat_questions() if settings.chat_check else []
    results = []
    ref_rt = None
    try:
        if reference is not None and documents:
            ref_rt = LlamaRuntime(reference, n_ctx=settings.window, n_batch=settings.window, threads=settings.threads)
        for item in models:
            spec = item if isinstance(item, ModelSpec) else ModelSpec(Path(item))
            path, label = spec.path, spec.label
            with LlamaRuntime(path, n_ctx=256, n_batch=256, threads=settings.threads) as probe:
                # Prompts beyond what the model was trained on are cut, not given a context it cannot use.
                most = max(1, probe.n_ctx_train - settings.max_tokens)
                raw = [len(probe.tokenize(p)) for p in prompts.prompts]
                template = _chat_template(path)
                chat_lengths = [len(probe.tokenize(chat_prompt(template, q.question), special=True)) for q in questions]
                benign_lengths = [len(probe.tokenize(p)) for p in benign]
                trained = probe.n_ctx_train
            lengths = [min(n, most) for n in raw]
            cut = sum(n > most for n in raw)
            if cut:
                print(f"eval: {cut} prompt(s) longer than the model's trained context ({trained} tokens) less "
                      f"--max-tokens are cut to their last {most} tokens", file=sys.stderr)
            # The context is sized from the waves of sequences generated together, not from the longest prompt
            # times the batch: one long prompt costs memory for its own wave only.
            need = max(wave_context([n for n in lengths for _ in range(settings.samples)], settings.batch, settings.max_tokens),
                       wave_context(chat_lengths, settings.batch, 32), wave_context(benign_lengths, settings.batch, 20))
            n_ctx = max(settings.window, -(-need // 256) * 256)
            with spec.open(n_ctx=n_ctx, n_seq=settings.batch, n_batch=max(settings.window, 512),
                           threads=settings.threads) as rt:
                texts, n_tok, secs = generate(rt, prompts.prompts, settings, progress, label, max_prompt_tokens=most)
                helpful = helpfulness(rt, template, benign, questions) if benign or questions else {}
                cap: Capability | None = None
                if documents:
                    base_rt = None
                    if spec.base is not None:
                        base_rt = LlamaRuntime(spec.base, n_ctx=settings.window, n_batch=settings.window,
                                               threads=settings.threads)
                    try:
                        cap = capability(rt, documents, reference=ref_rt, base=base_rt, max_tokens=settings.ppl_tokens,
                                         window=settings.window, progress=progress, label=label)
                    finally:
                        if base_rt is not None:
                            base_rt.close()
            scores = score_all(texts, scorers)
            flat = [t for row in texts for t in row]
            sensitive = [s.name for s in scorers if s.flags_identity_words]
            results.append(ModelResult(
                path=str(path),
                toxicity={name: toxicity_stats(s, seed=settings.seed) for name, s in scores.items()},
                perplexity=None if cap is None else cap.perplexity,
                kl=None if cap is None else cap.kl,
                tokens_per_s=n_tok / secs if secs > 0 else 0.0,
                generated_tokens=n_tok,
                generation_s=secs,
                agreement=agreement(scores),
                sole=sole_calls(scores) if len(scores) > 1 else {},
                listed=listed_calls(scores, has_listed_word(flat, badwords)),
                identity=identity_calls(scores, has_identity_word(flat), sensitive, seed=settings.seed)
                if len(scores) > 1 and sensitive else {},
                continuations=texts,
                label=label,
                calibrator=None if spec.calibrator is None else str(spec.calibrator),
                alpha=None if spec.calibrator is None else spec.alpha,
                kl_base=None if cap is None else cap.kl_base,
                base=None if spec.base is None else str(spec.base),
                degeneration=degeneration(texts),
                helpfulness=helpful,
            ))
    finally:
        if ref_rt is not None:
            ref_rt.close()
    return results


def _chat_template(path: Path) -> str | None:
    from pydetox.gguf_io import ModelFile

    with ModelFile(path) as m:
        t = m.get_field("tokenizer.chat_template")
    return t if isinstance(t, str) and t else None


def report_json(results: list[ModelResult], settings: EvalSettings, prompts: PromptSet, reference: Path | None,
                scorers: list[Scorer], include_texts: bool = False) -> dict[str, Any]:
    models = [r.to_json(prompts.prompts if include_texts else None) for r in results]
    return {
        "settings": {
            **asdict(settings),
            "n_prompts": len(prompts.prompts),  # the prompts used (asdict gives the --limit asked for)
            "limit": settings.n_prompts,
            "prompt_set": prompts.name,
            "prompt_count": len(prompts.prompts),
            "decoding": settings.sampling.describe(),
            "reference": None if reference is None else str(reference),
            "evaluator_descriptions": {s.name: s.description for s in scorers},
        },
        "models": models,
    }


def run_evaluation(models: Sequence[Path | ModelSpec], settings: EvalSettings, reference: Path | None = None,
                   progress: bool = True, include_texts: bool = False) -> tuple[dict[str, Any], list[ModelResult]]:
    """The one evaluation pipeline (`pydetox eval`, `detox`, `demo` and `pydetox.evaluate`): the prompt subset,
    the evaluators (each tried once first, so that one that cannot run fails before generation), every model, and
    the report dict that `pydetox eval --json` writes."""
    from pydetox.prompts import load_prompts
    from pydetox.scorers import get_scorer

    prompts = load_prompts(settings.prompts).subset(settings.n_prompts, settings.seed)
    scorers = [get_scorer(n) for n in settings.evaluators]
    for s in scorers:
        s.score(["warm-up"])
    results = evaluate_models(models, settings, prompts, scorers, reference, progress=progress)
    return report_json(results, settings, prompts, reference, scorers, include_texts=include_texts), results
