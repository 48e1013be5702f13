"""The default detox: calibration-model fusion distilled into a low-rank edit, end to end, in stages that are cached.

    F16 of the source -> calibrator (pydetox.calibrate) -> fused teacher + distill (pydetox.discover.distill)
    -> strength fitted to a KL budget on held-out clean text (pydetox.fit) -> the plan `pydetox detox` applies

Each stage's artefact lives in `OUT/stages/` under a name that carries a hash of everything it depends on (the source
file's path, size and modification time, the stage's settings, the artefacts before it). A stage whose artefact is
there is not run again: a rerun, or a run interrupted and started again, resumes at the first missing stage, and a
changed setting reruns only the stages that depend on it. Artefacts are written under temporary names and renamed
when complete, so an interrupted stage leaves nothing that looks finished.

The settings (`RecipeSettings`, DEFAULT_CALIBRATOR, DEFAULT_DISTILL) keep the amount of work the effect needs and take
the speed levers that do not cut it; docs/speed-distill.md gives what each lever costs and buys. Calibrators are kept
in the user's cache (CACHE/calibrators), trained once per source model and settings and reused by every run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import gguf

from pydetox import heap
from pydetox.calibrate import WATCHING, CalibrateSettings
from pydetox.discover.distill import Distill
from pydetox.errors import PydetoxError
from pydetox.plan import EditPlan

# `pydetox calibrate train`'s settings with bfloat16 autocast and the softmax over the training rows' tokens: the same
# held-out loss in half the time. Fewer steps and less clean text gave a calibrator that, fused, writes junk, and a
# teacher that taught nothing (docs/speed-distill.md).
# Validation every 100 steps, not 25: twelve fewer passes over the held-out rows (each 17 forward batches; in one run
# the 400 steps took 393 s against 406 s), and the calibrator is the same (`WATCHING`).
DEFAULT_CALIBRATOR = CalibrateSettings(precision="bfloat16", restrict_vocab=True, eval_every=100)
# The student (DistillParams overrides): a third of DistillParams' 450 steps, with what keeps the edit's effect and
# its helpfulness at that length: benign sentence starts continued by the unedited model join the clean anchor
# (`benign_starts`; at half DistillParams' `clean_weight`, so that the larger anchor does not cancel the cut), and
# the update loses its direct push on end-of-generation tokens (`eog_free`), which shortened benign answers and cost
# chat answers (docs/speed-distill.md, docs/results/default-recipe-seeds.md). The student computes under bfloat16
# autocast (the update and Adam's state stay float32): a step 1.8x faster on CPUs with AMX / AVX-512 BF16, and over
# three training seeds the same cut, perplexity and KL as float32 within their spread. The other per-step levers (a
# restricted softmax, batches by length) cost the edit its effect in single runs, so neither is on. The held-out
# diagnostics are computed on 48 sequences of each kind (they do not change the training). 300 training-wiki
# sentences asked as user turns in the model's chat template and answered by the unedited model join the clean anchor
# (`chat_starts`; none is a chat-check question): an anchor of prose alone let the edit cost SmolLM2 2-3 of the chat
# check's 113 answers (three training seeds); with them the three seeds' mean kept them all, and cut more at the same
# KL budget (docs/results/chat-anchor.md).
# The teacher is one-sided (`one_sided`): the unedited model's distribution, lowered where the fused model is lower.
# Taught the fused distribution itself, the student escaped toxic contexts into runs of no-break spaces and loops of
# 'the first time' (58.6% of its greedy continuations broken; unedited 16.1%); one-sided it cut as much at F16 over
# three training seeds (less at Q4_K_M), its broken text near the unedited model's (docs/results/teacher-junk.md).
# The edited layers' activations are recomputed in the backward pass (`recompute`; the same gradients): they were the
# student's largest memory on SmolLM2 (its stage: peak 2.68 -> 2.16 GB, the same update, training 6:36 -> 8:30) and a
# third of a Qwen2.5-0.5B step's (docs/results/discovery-memory.md); a run with memory to spare can turn it off.
DEFAULT_DISTILL: dict[str, str] = {"held_out": "48", "steps": "150", "benign_starts": "600", "clean_weight": "4",
                                   "eog_free": "1", "precision": "bfloat16", "chat_starts": "300", "one_sided": "1",
                                   "recompute": "1"}
# DEFAULT_DISTILL's additions for a source of one architecture (GGUF `general.architecture`), under what a run sets
# itself: distill's own table (`Distill.arch_defaults`, which `pydetox discover --method distill` reads too; the
# reasons are there). The recipe adds them to the student's settings itself, so that they are in its stage key.
# Its keys are none of DEFAULT_DISTILL's: a run's settings hold those, and would win over an entry here (test).
ARCH_DISTILL: dict[str, dict[str, str]] = Distill.arch_defaults


def arch_distill(source: Path, distill: dict[str, str]) -> dict[str, str]:
    """`distill` (DistillParams overrides) with ARCH_DISTILL's for the architecture of the GGUF `source` beneath it."""
    from pydetox.gguf_io import ModelFile

    with ModelFile(source) as model:
        return {**ARCH_DISTILL.get(model.arch, {}), **distill}


@dataclass(frozen=True)
class RecipeSettings:
    calibrator: CalibrateSettings = DEFAULT_CALIBRATOR
    distill: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_DISTILL))  # DistillParams overrides
    calibrator_file: Path | None = None  # use this calibrator instead of training one
    # Where trained calibrators are kept (None: CACHE/calibrators, $PYDETOX_CACHE or ~/.cache/pydetox): one is
    # trained once per source model and settings, then reused by every output folder.
    calibrators: Path | None = None
    # nats/token of KL(unedited || edited) on `fit_text`. On held-out news the same edit's KL runs ~1.5x its KL on
    # the news the report measures (SmolLM2 1.51x, Qwen2.5 1.55x, 4,096 tokens each), so 0.060 aims the report's F16
    # KL at ~0.04, leaving room for Q4_K_M's (1.05-1.2x F16's) under 0.05. On held-out wiki, the fit's text before this,
    # the report's KL ran 1.5x the fit's on SmolLM2 but 2.0x on Qwen2.5, so one wiki budget put Qwen's report at
    # 0.058 (docs/results/kl-budget-text.md).
    kl_budget: float = 0.060
    fit_text: str = "news-held-out"  # a clean-text set or file (prompts.load_clean_text); never `news`, the report's
    fit_tokens: int = 4096
    fit_steps: int = 4
    # the fit may scale the student's edit up to this strength when its KL at 1 leaves budget unused (1: never above)
    max_strength: float = 2.0
    edited_type: str | None = "Q8_0"  # floor of the edited tensors while fitting (as `pydetox detox` applies them)
    # the model type at which the KL budget is measured (the edit applied with it, against the unedited model at it);
    # "F16" measures on the F16 source. "lowest": the least precise of the types the run ships (`pydetox detox
    # --types`; Q4_K_M, the lowest default type, for the recipe on its own), so that the budget holds at every type
    # shipped: the report's KL at Q4_K_M ran 1.17-1.24x its F16 KL on SmolLM2, and a fit at F16 put it at 0.051
    # over three seeds. On held-out news the same edit's Q4_K_M KL is 1.05-1.10x its F16 KL (on wiki ~1.5x), so the
    # fit at Q4_K_M costs 2.5-6% of strength (docs/results/kl-budget-text.md).
    fit_type: str = "lowest"
    # Also ban the word filter's tokens (pydetox.discover.wordfilter, its defaults: output rows of the listed bad
    # words and the pair-attested pieces scaled to 0), merged after the student's edit. The filter is all or nothing,
    # so the fit scales the student alone with the filter in every trial: the KL budget holds both. "auto": where the
    # model has an output layer of its own (Qwen2.5-Coder-0.5B), where the filter costs no bytes and the edit stays
    # a LoRA adapter; not where the output layer is the token embedding (SmolLM2, Gemma-3), where it would add a
    # whole output tensor (SmolLM2: +21% at F16, +35% at Q4_K_M) and rule out the adapter. Nor where no listed word
    # is a token of the vocabulary. True / False (1 / 0 on the command line): always (an error if nothing is
    # banned) / never.
    word_filter: bool | str = "auto"
    seed: int = 0  # the student's seed (DistillParams.seed); the calibrator's is calibrator.seed
    # torch device of the calibrator's training and the student ("auto": CUDA when torch sees a GPU). Not part of any
    # stage's key: the results agree within numerical tolerance, and a stage made on one device is reused on another.
    device: str = "auto"
    # llama.cpp threads of the fit (None: every core this process may run on); like `device`, in no stage's key
    threads: int | None = None
    # Run the torch stages (calibrator, teacher, student) each in a child process (pydetox.child), so that what they
    # leave in memory goes when they end and the llama.cpp stages after them peak at their own need; False: in this
    # process (where a debugger or a profiler sees them). In no stage's key.
    isolate: bool = True

    def __post_init__(self) -> None:
        from pydetox.prompts import CLEAN_TEXTS

        if self.fit_text == "news":
            raise PydetoxError("recipe:fit_text: expected news-held-out, wiki or a text file, found news: the report "
                               "measures perplexity and KL there, so a budget fitted on it would be judged on its own text")
        if self.fit_text not in CLEAN_TEXTS and not Path(self.fit_text).is_file():
            raise PydetoxError(f"recipe:fit_text: expected news-held-out, wiki or a text file, found {self.fit_text!r}")
        if not isinstance(self.word_filter, bool) and self.word_filter != "auto":
            from pydetox.discover.base import BOOL_WORDS

            flag = BOOL_WORDS.get(str(self.word_filter).lower())
            if flag is None:
                raise PydetoxError(f"recipe:word_filter: expected auto, 1 or 0, found {self.word_filter!r}")
            object.__setattr__(self, "word_filter", flag)
        if self.fit_type != "lowest":
            from pydetox import ggml

            ggml.parse_ftype(self.fit_type)  # an unknown model type is refused here, naming the known ones

    def for_types(self, types: Sequence[str]) -> RecipeSettings:
        """These settings with `fit_type` "lowest" resolved to the least precise of `types` (model types as `pydetox
        detox --types` takes them); any other `fit_type` is kept."""
        from pydetox import ggml

        if self.fit_type != "lowest":
            return self
        return replace(self, fit_type=ggml.least_precise(types))


# the model types `pydetox detox` writes and evaluates unless --types names others; `fit_type` "lowest" picks from
# them when no run names its types
DEFAULT_TYPES = ("F16", "Q8_0", "Q4_K_M")
# RecipeSettings fields that an override in the `recipe` namespace may set (`--param recipe:KEY=VALUE`, a sweep's
# `recipe:KEY`); the calibrator and the student have their own namespaces (`calibrator:`, `distill:`).
RECIPE_SCALARS = ("kl_budget", "fit_text", "fit_tokens", "fit_steps", "max_strength", "fit_type", "word_filter")
NAMESPACES = ("recipe", "distill", "calibrator")


def with_overrides(base: RecipeSettings, overrides: dict[str, dict[str, str]], seed: int | None = None) -> RecipeSettings:
    """`base` with overrides by namespace (strings, as the command line gives them): `recipe` (RECIPE_SCALARS),
    `distill` (DistillParams; `calibrator` there names a calibrator file to use instead of training one) and
    `calibrator` (CalibrateSettings), and the student's seed. Every key is checked against its owner's."""
    from pydetox.discover.base import get_method, make_params, override

    unknown = sorted(set(overrides) - set(NAMESPACES))
    if unknown:
        raise PydetoxError(f"no parameter namespace {unknown[0]!r}; the recipe's are: {', '.join(NAMESPACES)}")
    extra = dict(overrides.get("distill", {}))
    cal = extra.pop("calibrator", None)
    fit = overrides.get("recipe", {})
    stray = sorted(set(fit) - set(RECIPE_SCALARS))
    if stray:
        raise PydetoxError(f"recipe has no parameter {stray[0]!r}; it has: {', '.join(sorted(RECIPE_SCALARS))}")
    out = override(base, fit, "recipe")
    out = replace(out, distill={**out.distill, **extra}, seed=out.seed if seed is None else seed,
                  calibrator_file=Path(cal) if cal else out.calibrator_file,
                  calibrator=override(out.calibrator, overrides.get("calibrator", {}), "calibrator"))
    make_params(get_method("distill"), {**out.distill, "calibrator": "-"})  # every student key known, every value read
    return out


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from pydetox.output import write_text

    write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def _in_stage(recipe: RecipeSettings, function: str, **kwargs: Any) -> dict[str, Any]:
    """This module's `function(**kwargs)` (a stage's work, returning what to remember about it), in a child process
    when `recipe.isolate`, with the child's peak resident memory added as `peak_rss_gb`."""
    if not recipe.isolate:
        out: dict[str, Any] = globals()[function](**kwargs)
        return out
    from pydetox import child

    done = child.call(f"{__name__}:{function}", **kwargs)
    return {**done.value, "peak_rss_gb": round(done.peak_rss / 1e9, 2)}


class Stages:
    """Cached stage artefacts in one folder, and how long each stage took."""

    def __init__(self, folder: Path, progress: bool = True) -> None:
        self.folder = folder
        self.progress = progress
        folder.mkdir(parents=True, exist_ok=True)
        self.timing: dict[str, dict[str, Any]] = {}

    def run(self, name: str, key: str, suffix: str, make: Callable[[Path], dict[str, Any]],
            empty_ok: bool = False) -> tuple[Path, dict[str, Any]]:
        """The artefact of stage `name` for `key`: made by `make(path)` (which writes `path` and returns what to
        remember about it) unless it is there already. With `empty_ok`, `make` may write nothing and return
        `empty`: True (a stage that found nothing to do); the record says so and `path` does not exist."""
        path = self.folder / f"{name}-{key}{suffix}"
        meta_path = self.folder / f"{name}-{key}.stage.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if meta is not None and (path.exists() or (empty_ok and meta.get("empty"))):
            self.timing[name] = {"seconds": 0.0, "cached": True, "made_in_s": meta["seconds"]}
            if self.progress:
                print(f"[{name}] cached: {path.name if path.exists() else 'nothing to keep'} "
                      f"(made in {meta['seconds']:.0f} s)", flush=True)
            return path, meta
        if self.progress:
            print(f"[{name}] running ...", flush=True)
        t0 = time.perf_counter()
        info = make(path)
        seconds = time.perf_counter() - t0
        if not path.exists() and not (empty_ok and info.get("empty")):
            raise PydetoxError(f"stage {name} finished without writing {path}")
        meta = {"stage": name, "key": key, "seconds": round(seconds, 2), **info}
        _write_json(meta_path, meta)
        self.timing[name] = {"seconds": round(seconds, 2), "cached": False,
                             **({"peak_rss_gb": info["peak_rss_gb"]} if "peak_rss_gb" in info else {})}
        if self.progress:
            print(f"[{name}] done in {seconds:.0f} s -> {path.name if path.exists() else 'nothing to keep'}", flush=True)
        return path, meta


def shared_calibrators() -> Path:
    from pydetox.paths import cache_dir

    return cache_dir() / "calibrators"


def calibrator_key(src_key: str, settings: CalibrateSettings) -> str:
    """The key a calibrator trained on the source of `src_key` with `settings` is cached under: every setting that
    changes the calibrator, none that only watches its training (`pydetox.calibrate.WATCHING`)."""
    return _key("calibrator", src_key, {k: v for k, v in asdict(settings).items() if k not in WATCHING})


def _calibrator(stages: Stages, f16: Path, src_key: str, settings: RecipeSettings, progress: bool) -> tuple[Path, str]:
    """The given calibrator, or the one trained for this source and settings (kept in the shared folder, reused by
    every output folder); and its key."""
    if settings.calibrator_file is not None:
        cal = settings.calibrator_file
        if not cal.is_file():
            raise PydetoxError(f"expected a calibrator GGUF at {cal}, found nothing")
        return cal, _key("calibrator-file", _file_stamp(cal))
    # `seed` is the student's (its data draw, held-out split and initialisation): the calibrator, a property of
    # the model trained once, keeps its own (`calibrator.seed`), so runs over several seeds share it.
    cal_settings = settings.calibrator
    cal_key = calibrator_key(src_key, cal_settings)

    def make_cal(path: Path) -> dict[str, Any]:
        tmp = path.with_name(path.name.removesuffix(".gguf") + ".partial.gguf")
        info = _in_stage(settings, "_train_calibrator", f16=f16, out=tmp, settings=cal_settings, progress=progress,
                         device=settings.device)
        # the alignment and log live beside the GGUF under its name; rename them first, the GGUF last
        from pydetox.fusion import alignment_path

        alignment_path(tmp).replace(alignment_path(path))
        Path(info.pop("log")).replace(path.with_name(path.name.removesuffix(".gguf") + ".train.json"))
        tmp.replace(path)
        return info

    shared = Stages(settings.calibrators or shared_calibrators(), progress)
    cal, _ = shared.run("calibrator", cal_key, ".gguf", make_cal)
    stages.timing["calibrator"] = shared.timing["calibrator"]
    return cal, cal_key


def _student_overrides(stages: Stages, f16: Path, cal: Path, cal_key: str,
                       settings: RecipeSettings) -> tuple[dict[str, str], str, str]:
    """distill's overrides for this recipe on `f16` (`arch_distill`; the teacher's targets cached in the stages
    folder as the "teacher" stage's artefact, under a key of what they depend on), that key, and the student plan's
    key."""
    from pydetox.discover.base import get_method, make_params
    from pydetox.discover.distill.teacher import TEACHER_FORMAT, TEACHER_KEYS

    overrides = {**arch_distill(f16, settings.distill), "calibrator": str(cal), "seed": str(settings.seed)}
    # Keys from the settings as distill resolves them (a default given explicitly is the same setting); the teacher's
    # targets depend on fewer settings than the student, so a student setting changed reuses them.
    resolved = asdict(make_params(get_method("distill"), overrides))
    teacher = _key(cal_key, TEACHER_FORMAT, {k: resolved[k] for k in TEACHER_KEYS if k != "calibrator"})
    overrides["cache"] = str(stages.folder / f"teacher-{teacher}.npz")
    plan_key = _key("distill", cal_key, TEACHER_FORMAT, {k: v for k, v in resolved.items() if k not in ("calibrator", "cache")})
    return overrides, teacher, plan_key


def _teacher(stages: Stages, f16: Path, overrides: dict[str, str], teacher_key: str, settings: RecipeSettings,
             progress: bool) -> None:
    """The "teacher" stage: the teacher's targets and the unedited model's continuations (llama.cpp), in a process of
    their own that never loads the torch model, at the npz distill reads them from (`overrides["cache"]`). The
    student's process then holds the torch model alone; in one process the teacher's llama.cpp model and buffers sat
    beside it."""

    def make_targets(path: Path) -> dict[str, Any]:
        info = _in_stage(settings, "_teacher_only", f16=f16, overrides=overrides, progress=progress)
        if not path.exists():
            raise PydetoxError(f"distill did not write its teacher cache {path}")
        return info

    stages.run("teacher", teacher_key, ".npz", make_targets)


def _distill(stages: Stages, f16: Path, cal: Path, cal_key: str, settings: RecipeSettings,
             progress: bool) -> tuple[Path, str]:
    """The student's plan (strength 1), its teacher's targets cached beside it; and the plan's key."""
    overrides, teacher_key, plan_key = _student_overrides(stages, f16, cal, cal_key, settings)
    _teacher(stages, f16, overrides, teacher_key, settings, progress)

    def make_plan(path: Path) -> dict[str, Any]:
        return _in_stage(settings, "_student_plan", f16=f16, overrides=overrides, out=path, progress=progress,
                         device=settings.device)

    raw, _ = stages.run("distill", plan_key, ".plan.gguf", make_plan)
    return raw, plan_key


# The torch stages' work, called by `_in_stage` (in a child process by default): arguments and results picklable.

def _train_calibrator(f16: Path, out: Path, settings: CalibrateSettings, progress: bool, device: str) -> dict[str, Any]:
    from pydetox.calibrate import train

    result = train(f16, out, settings, progress=progress, plot=False, device=device)
    return {"val_loss_start": result.val_loss_start, "val_loss": result.val_loss, "log": str(result.log)}


def _student_plan(f16: Path, overrides: dict[str, str], out: Path, progress: bool, device: str) -> dict[str, Any]:
    from pydetox.discover import Discovery

    plan = Discovery(f16, progress=progress, device=device).plan("distill", overrides)
    plan.save(out)
    d = plan.params["diagnostics"]
    return {"held_out_before": d["held_out_before"], "held_out_after": d["held_out_after"],
            "teacher_from_cache": d["teacher_from_cache"]}


def _word_filter_plan(f16: Path, out: Path, progress: bool, device: str, required: bool) -> dict[str, Any]:
    """The word filter's plan for `f16` saved at `out`; when nothing is banned, an error if `required`, else no
    file and `empty` in the stage's record."""
    from pydetox.discover import Discovery
    from pydetox.errors import NothingToBanError

    try:
        plan = Discovery(f16, progress=progress, device=device).plan("wordfilter")
    except NothingToBanError:
        if required:
            raise
        return {"banned_tokens": 0, "empty": True}
    plan.save(out)
    return {"banned_tokens": plan.params["diagnostics"]["banned_tokens"]}


def ties_output(model: Path) -> bool:
    """Whether the GGUF `model` has no output layer of its own (llama.cpp then uses the token embedding)."""
    from pydetox.gguf_header import read_header

    return all(t.name != "output.weight" for t in read_header(model).tensors)


def _teacher_only(f16: Path, overrides: dict[str, str], progress: bool) -> dict[str, Any]:
    from pydetox.discover.distill import teacher_targets

    return teacher_targets(f16, overrides, progress)


def _teacher_targets(f16: Path, overrides: dict[str, str], progress: bool, device: str) -> dict[str, Any]:
    from pydetox.discover import Discovery
    from pydetox.discover.distill import prepare_targets

    info: dict[str, Any] = prepare_targets(Discovery(f16, progress=progress, device=device).context, overrides)
    return info


def _word_filter(stages: Stages, f16: Path, src_key: str, settings: RecipeSettings,
                 progress: bool) -> tuple[Path, str] | None:
    """The "wordfilter" stage when `settings.word_filter` is on (True, or "auto" on a model with an output layer of
    its own): the word filter's plan at its defaults for this source, and its key; None when off, or "auto" found
    nothing to ban."""
    if settings.word_filter is False:
        return None
    if settings.word_filter == "auto" and ties_output(f16):
        if progress:
            print("[wordfilter] off: the output layer is the token embedding, so the filter would add an output "
                  "tensor (recipe:word_filter=1 to add it)", flush=True)
        return None
    from pydetox.discover.wordfilter import WordFilterParams

    required = settings.word_filter is True

    def make(path: Path) -> dict[str, Any]:
        return _in_stage(settings, "_word_filter_plan", f16=f16, out=path, progress=progress, device=settings.device,
                         required=required)

    key = _key("wordfilter", src_key, asdict(WordFilterParams()))
    path, meta = stages.run("wordfilter", key, ".plan.gguf", make, empty_ok=not required)
    return None if meta.get("empty") else (path, key)


def _fit(stages: Stages, f16: Path, raw: Path, plan_key: str, settings: RecipeSettings, progress: bool,
         fixed: tuple[Path, str] | None = None) -> Path:
    """The student's plan scaled to the largest strength (up to `max_strength`) within the KL budget on `fit_text`,
    measured in llama.cpp at `fit_type` with the edited tensors at their floor type; with `fixed` (a plan file and
    its key: the word filter) merged after it at strength 1 in every trial and in the plan it returns."""
    from pydetox import ggml

    fit_type = settings.for_types(DEFAULT_TYPES).fit_type
    ftype: gguf.LlamaFileType | None = ggml.parse_ftype(fit_type)  # None: measured on the F16 source as is
    if ftype == gguf.LlamaFileType.MOSTLY_F16:
        ftype = None

    def make_fit(path: Path) -> dict[str, Any]:
        from pydetox.fit import fit_strength, with_fixed
        from pydetox.prompts import load_clean_text

        plan = EditPlan.load(raw)
        extra = EditPlan.load(fixed[0]) if fixed else None
        floor = ggml.parse_type(settings.edited_type) if settings.edited_type else None
        fit = fit_strength(plan, f16, settings.kl_budget, load_clean_text(settings.fit_text),
                           max_tokens=settings.fit_tokens,
                           edited_floor=floor, steps=settings.fit_steps, max_strength=settings.max_strength,
                           ftype=ftype, threads=settings.threads, fixed=extra, progress=progress)
        if fit.strength == 0:
            raise PydetoxError(f"no strength tried keeps KL within {settings.kl_budget:g}: "
                               + ", ".join(f"{t.strength:g} -> {t.kl:.4f}" for t in fit.trials))
        trials = [{"strength": t.strength, "kl": round(t.kl, 5), "perplexity": round(t.perplexity, 3)} for t in fit.trials]
        scaled = plan.scaled(fit.strength, source=raw.name)
        both = with_fixed(scaled, extra)
        # the student's parameters stay on top (its strength, diagnostics); a merged plan's record of the parts beside
        both_params = {**scaled.params, **({"merged": both.params["merged"]} if extra else {})}
        fitted = EditPlan(scaled.arch, both.edits, both.method, {**both_params, "fit": {
            "kl_budget": settings.kl_budget, "clean_text": settings.fit_text, "tokens": settings.fit_tokens,
            "edited_type": settings.edited_type, "max_strength": settings.max_strength, "model_type": fit_type,
            "trials": trials}}, scaled.model)
        fitted.save(path)
        return {"strength": fit.strength, "trials": trials}

    # a ceiling of 1 (the search before max_strength existed) leaves the key as it was, so such fits stay valid
    # and so does a fit at F16 (the only type before fit_type existed)
    ceiling = () if settings.max_strength == 1.0 else (settings.max_strength,)
    at = () if ftype is None else (ggml.ftype_name(ftype),)
    # and so does a fit on wiki (the only text before fit_text existed); a file is keyed by its path, size and time
    text = () if settings.fit_text == "wiki" else (_text_stamp(settings.fit_text),)
    # and so does a fit without a fixed plan
    also = () if fixed is None else (fixed[1],)
    fitted, _ = stages.run("fit", _key("fit", plan_key, settings.kl_budget, settings.fit_tokens, settings.fit_steps,
                                          settings.edited_type, *ceiling, *at, *text, *also), ".plan.gguf", make_fit)
    return fitted


def _text_stamp(name: str) -> Any:
    from pydetox.prompts import CLEAN_TEXTS

    return name if name in CLEAN_TEXTS else _file_stamp(Path(name))


def _file_stamp(path: Path) -> Any:
    """A file outside the stages folder (the source, a calibrator or text file) as the recipe's keys see it: its
    path, size and modification time."""
    st = path.stat()
    return [path.resolve().as_posix(), st.st_size, st.st_mtime_ns]


def _shared_stages(source: Path, out: Path, settings: RecipeSettings,
                   progress: bool) -> tuple[Stages, Path, Path, str, str]:
    stages = Stages(out / "stages", progress)
    src_key = _key("source", _file_stamp(source))

    def make_f16(path: Path) -> dict[str, Any]:
        from pydetox import ggml
        from pydetox.apply import ApplyOptions, apply_plan

        apply_plan(None, source, path, ApplyOptions(ftype=ggml.parse_ftype("F16"), progress=False))
        return {"source": str(source)}

    f16, _ = stages.run("f16", src_key, ".gguf", make_f16)
    cal, cal_key = _calibrator(stages, f16, src_key, settings, progress)
    heap.release()
    return stages, f16, cal, cal_key, src_key


def prepare(source: Path, out: Path, settings: RecipeSettings = RecipeSettings(),
            progress: bool = True) -> dict[str, dict[str, Any]]:
    """Make the stages that runs of several student seeds or settings share (the F16, the calibrator, the teacher's
    targets and the unedited model's clean targets) without training a student, so that runs started side by side
    afterwards (a sweep's Ray tasks) read them instead of each computing them; returns each stage's time."""
    stages, f16, cal, cal_key, src_key = _shared_stages(source, out, settings, progress)
    overrides, teacher_key, _ = _student_overrides(stages, f16, cal, cal_key, settings)
    _teacher(stages, f16, overrides, teacher_key, settings, progress)
    _word_filter(stages, f16, src_key, settings, progress)
    # the unedited model's clean targets (torch), cached beside the teacher's; a no-op but for loading the model when
    # they are there already
    _in_stage(settings, "_teacher_targets", f16=f16, overrides=overrides, progress=progress, device=settings.device)
    heap.release()
    return stages.timing


def distill_plan(source: Path, out: Path, settings: RecipeSettings = RecipeSettings(),
                 progress: bool = True) -> tuple[EditPlan, Path, dict[str, dict[str, Any]]]:
    """Run (or resume) the recipe on the GGUF `source` with its stages under `out/stages`; returns the fitted plan,
    where it was saved, and each stage's time."""
    stages, f16, cal, cal_key, src_key = _shared_stages(source, out, settings, progress)
    raw, plan_key = _distill(stages, f16, cal, cal_key, settings, progress)
    fixed = _word_filter(stages, f16, src_key, settings, progress)
    heap.release()
    fitted = _fit(stages, f16, raw, plan_key, settings, progress, fixed)
    return EditPlan.load(fitted), fitted, stages.timing
