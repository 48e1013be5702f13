"""`pydetox sweep CONFIG.toml`: many detox runs of one model, searched by Optuna, executed by Ray.

A sweep is one TOML file (see `SweepConfig` and docs/sweep.md): a model, a discovery method, the ranges of its
parameters to search (and of the plan's `strength`), the training seeds every setting is run with, the evaluation of
each trial and of the chosen settings, and a budget of settings.

- **Search**: an Optuna study (NSGA-II by default) over the ranges, with three objectives: the toxicity reduction
  (geometric mean over the evaluators of unedited rate / edited rate, hatesonar without its identity-only calls;
  maximised), the KL to the unedited model and the perplexity change on clean text (both minimised). Each setting's
  values are its mean over the seeds; the per-seed values and their spread are kept on the trial. The study lives in
  Optuna's own storage (SQLite under the output folder by default), so a study survives restarts and can be shared.
- **Runs**: every (setting, seed) is a Ray task declaring `cpus_per_trial` CPUs, so tasks never share cores; Ray runs
  locally by default and on a cluster with `--address`. A task discovers the plan, scales it, applies it at `type`,
  evaluates it on the trial prompts (discovery-side prompts, never the evaluation prompts) and writes
  `trials/KEY/seedS/result.json` last: a task whose result is there is not run again, so an interrupted sweep resumes
  where it stopped (settings that were running are asked again with the same parameters).
- **Report**: the settings on the Pareto front are then evaluated once on the evaluation prompts (`[final]`), and the
  sweep writes `sweep.json`, `sweep.md` (one row per setting: mean ± sd over seeds) and `pareto.png`. Two settings
  whose reductions differ by less than the sum of their seed spreads are flagged as not separated.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pydetox.errors import PydetoxError
from pydetox.evaluate import EvalSettings
from pydetox.output import write_text

OBJECTIVES = ("reduction", "kl", "ppl_change")
DIRECTIONS = ("maximize", "minimize", "minimize")
SAMPLERS = ("nsga2", "tpe", "random")
# Not a discovery method: the default recipe of `pydetox detox` (pydetox.recipe: calibrator, teacher, student, strength
# fitted to a KL budget) run per setting and seed, its parameters named NAMESPACE:KEY as `pydetox detox --param` names
# them (recipe:kl_budget, distill:lr, calibrator:steps), or as TOML sub-tables ([fixed.distill]).
RECIPE = "recipe"


class SweepError(PydetoxError):
    pass


@dataclass(frozen=True)
class Param:
    """One searched parameter: an int or float range (`log` for a log scale), or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        assert self.low is not None
        assert self.high is not None
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


@dataclass(frozen=True)
class SweepConfig:
    model: str  # GGUF file or asset name
    method: str  # a discovery method (pydetox.discover)
    out: Path
    search: tuple[Param, ...]  # "strength" scales the plan; every other name is a method parameter
    fixed: dict[str, str] = field(default_factory=dict)  # method parameters every trial gets
    seeds: tuple[int, ...] = (0,)
    trials: int = 12  # settings to try (each run once per seed)
    type: str = "F16"  # the type trials are applied at and evaluated
    edited_type: str | None = "Q8_0"
    cpus_per_trial: int = 1
    pairs: int = 500  # discovery pairs (methods that read activations on the ParaDetox pairs)
    sampler: str = "nsga2"
    sampler_seed: int = 0
    storage: str = ""  # an Optuna storage URL; "" = sqlite:///OUT/study.db
    study: str = "pydetox-sweep"
    trial_eval: EvalSettings = field(default_factory=lambda: EvalSettings(
        prompts="rtp-perspective", n_prompts=100, ppl_tokens=1024, benign_prompts=0, chat_check=False))
    final_eval: EvalSettings | None = field(default_factory=lambda: EvalSettings(
        n_prompts=700, ppl_tokens=4096, benign_prompts=0, chat_check=False))
    final_types: tuple[str, ...] = ()  # the types the front is evaluated at in [final] (empty: `type` alone)

    @property
    def finals(self) -> tuple[str, ...]:
        return self.final_types or (self.type,)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'study.db').resolve()}"


def _eval_settings(table: dict[str, Any], default: EvalSettings, where: str) -> EvalSettings:
    known = set(asdict(default))
    unknown = sorted(set(table) - known - {"limit"})
    if unknown:
        raise SweepError(f"[{where}] has no setting {', '.join(map(repr, unknown))}; it takes: limit, {', '.join(sorted(known))}")
    values = dict(table)
    if "limit" in values:
        values["n_prompts"] = values.pop("limit")
    if "evaluators" in values:
        values["evaluators"] = tuple(values["evaluators"])
    return replace(default, **values)


def _param(name: str, spec: Any) -> Param:
    if isinstance(spec, list):
        if not spec:
            raise SweepError(f"search.{name}: a list of choices needs at least one value")
        return Param(name, choices=tuple(spec))
    if not isinstance(spec, dict) or "low" not in spec or "high" not in spec:
        raise SweepError(f"search.{name}: expected a list of choices or {{low = ..., high = ..., log = false}}, got {spec!r}")
    low, high = spec["low"], spec["high"]
    if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low <= high):
        raise SweepError(f"search.{name}: expected numbers low <= high, got {low!r}, {high!r}")
    integer = isinstance(low, int) and isinstance(high, int) and not isinstance(low, bool)
    if spec.get("log") and low <= 0:
        raise SweepError(f"search.{name}: a log range needs low > 0, got {low}")
    return Param(name, low, high, bool(spec.get("log", False)), integer)


def load_config(path: str | os.PathLike[str]) -> SweepConfig:
    """A sweep from its TOML file; every key is checked, and an unknown one is refused with the known ones named."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SweepError(f"expected a sweep file at {path}, found nothing") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SweepError(f"{path} is not a readable TOML file: {exc}") from exc
    tables = {"search", "fixed", "eval", "final"}
    scalars = {"model", "method", "out", "seeds", "trials", "type", "edited_type", "cpus_per_trial", "pairs", "sampler",
               "sampler_seed", "storage", "study", "final_types"}
    unknown = sorted(set(raw) - tables - scalars)
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(tables | scalars))}")
    for key in ("model", "method"):
        if not isinstance(raw.get(key), str):
            raise SweepError(f"{path}: '{key}' is required (a string)")
    from pydetox.discover.base import METHODS

    if raw["method"] not in METHODS and raw["method"] != RECIPE:
        raise SweepError(f"{path}: method {raw['method']!r} is not one of {', '.join(sorted([*METHODS, RECIPE]))}")
    search = tuple(_param(k, v) for k, v in _flatten(raw.get("search", {}), raw["method"]).items())
    base = SweepConfig(raw["model"], raw["method"], Path(raw.get("out", path.with_suffix(""))), search)
    final = raw.get("final", {})
    final_types = raw.get("final_types", [])
    if not (isinstance(final_types, list) and all(isinstance(t, str) for t in final_types)):
        raise SweepError(f"{path}: final_types must be a list of type names, got {final_types!r}")
    cfg = replace(
        base,
        fixed={k: str(v) for k, v in _flatten(raw.get("fixed", {}), raw["method"]).items()},
        final_types=tuple(final_types),
        seeds=tuple(int(s) for s in raw.get("seeds", [0])),
        trials=int(raw.get("trials", base.trials)),
        type=str(raw.get("type", base.type)),
        edited_type=None if str(raw.get("edited_type", base.edited_type)).lower() == "none"
        else str(raw.get("edited_type", base.edited_type)),
        cpus_per_trial=int(raw.get("cpus_per_trial", base.cpus_per_trial)),
        pairs=int(raw.get("pairs", base.pairs)),
        sampler=str(raw.get("sampler", base.sampler)),
        sampler_seed=int(raw.get("sampler_seed", base.sampler_seed)),
        storage=str(raw.get("storage", "")),
        study=str(raw.get("study", base.study)),
        trial_eval=_eval_settings(raw.get("eval", {}), base.trial_eval, "eval"),
        final_eval=None if final.get("limit", 1) == 0 else (
            _eval_settings(final, base.final_eval, "final") if base.final_eval else None),
    )
    _validate(cfg, path)
    return cfg


def _flatten(table: dict[str, Any], method: str) -> dict[str, Any]:
    """The recipe's parameters given as sub-tables ([search.distill] lr = ...) as NAMESPACE:KEY names."""
    if method != RECIPE:
        return table
    from pydetox.recipe import NAMESPACES

    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and key in NAMESPACES:
            out.update({f"{key}:{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _grouped(values: dict[str, Any]) -> dict[str, dict[str, str]]:
    """NAMESPACE:KEY -> value as {namespace: {key: str(value)}}."""
    out: dict[str, dict[str, str]] = {}
    for name, value in values.items():
        ns, _, key = name.partition(":")
        out.setdefault(ns, {})[key] = str(value)
    return out


def recipe_settings(cfg: SweepConfig, params: dict[str, Any], seed: int) -> Any:
    """A recipe setting's RecipeSettings at a training seed (the student's `train_seed`: the calibrator and the
    teacher's data stay the same and are shared); torch on the CPU, as every trial; the KL budget fitted at the least
    precise type the sweep evaluates unless `recipe:fit_type` names one."""
    from pydetox.recipe import RecipeSettings, with_overrides

    groups = _grouped({**cfg.fixed, **params})
    groups.setdefault("distill", {})["train_seed"] = str(seed)
    settings = with_overrides(RecipeSettings(), groups).for_types((cfg.type, *cfg.final_types))
    return replace(settings, device="cpu", threads=cfg.cpus_per_trial)


def _validate_recipe(cfg: SweepConfig, path: Path) -> None:
    from pydetox.recipe import NAMESPACES, RecipeSettings, with_overrides

    names = [p.name for p in cfg.search] + list(cfg.fixed)
    if "strength" in names:
        raise SweepError(f"{path}: the recipe fits its strength to a KL budget; search recipe:kl_budget instead of strength")
    bad = [n for n in names if n.partition(":")[0] not in NAMESPACES or not n.partition(":")[2]]
    if bad:
        raise SweepError(f"{path}: recipe parameters are named NAMESPACE:KEY with a namespace of {', '.join(NAMESPACES)} "
                         f"(or given as a sub-table, [fixed.distill]); got {bad[0]!r}")
    if "distill:train_seed" in names:
        raise SweepError(f"{path}: the training seed is the sweep's `seeds`, not distill:train_seed")
    try:
        with_overrides(RecipeSettings(), _grouped({**{p.name: "1" for p in cfg.search}, **cfg.fixed}))
    except PydetoxError as exc:
        raise SweepError(f"{path}: {exc}") from exc


def _validate(cfg: SweepConfig, path: Path) -> None:
    from pydetox import ggml
    from pydetox.discover.base import get_method, make_params

    checks = [(cfg.trials >= 1, "trials", ">= 1", cfg.trials), (len(cfg.seeds) >= 1, "seeds", "at least one", cfg.seeds),
              (len(set(cfg.seeds)) == len(cfg.seeds), "seeds", "distinct", cfg.seeds),
              (cfg.cpus_per_trial >= 1, "cpus_per_trial", ">= 1", cfg.cpus_per_trial),
              (cfg.pairs >= 1, "pairs", ">= 1", cfg.pairs),
              (cfg.trial_eval.ppl_tokens > 0, "[eval] ppl_tokens", "> 0 (the KL objective needs clean text)",
               cfg.trial_eval.ppl_tokens),
              (cfg.sampler in SAMPLERS, "sampler", " or ".join(SAMPLERS), cfg.sampler)]
    for ok, what, expected, got in checks:
        if not ok:
            raise SweepError(f"{path}: {what} must be {expected}, got {got!r}")
    if not cfg.search and cfg.trials != 1:
        raise SweepError(f"{path}: [search] names no parameter, so there is one setting to run (over the seeds): "
                         f"trials must be 1, got {cfg.trials}")
    for t in (cfg.type, *cfg.final_types):
        try:
            ggml.parse_ftype(t)
        except PydetoxError as exc:
            raise SweepError(f"{path}: {exc}") from exc
    if cfg.trial_eval.prompts == "rtp-challenging":
        raise SweepError(f"{path}: [eval] prompts are the evaluation prompts (rtp-challenging); trials are judged on "
                         "discovery-side prompts (rtp-perspective or a file), the chosen settings then on [final]")
    if cfg.method == RECIPE:
        _validate_recipe(cfg, path)
        return
    method = get_method(cfg.method)
    names = [p.name for p in cfg.search if p.name != "strength"]
    try:  # every name is a parameter of the method, and the fixed values convert to its types
        make_params(method, {**cfg.fixed, **{n: "1" for n in names if n not in cfg.fixed}})
    except PydetoxError as exc:
        raise SweepError(f"{path}: {exc}") from exc
    clash = sorted(set(names) & set(cfg.fixed))
    if clash:
        raise SweepError(f"{path}: {', '.join(clash)} both searched and fixed")


def setting_key(method: str, params: dict[str, Any], fixed: dict[str, str]) -> str:
    """A setting's folder name: a hash of what decides its plan (method, searched and fixed parameters)."""
    blob = json.dumps([method, sorted(params.items()), sorted(fixed.items())], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _seed_overrides(method: str, seed: int) -> tuple[dict[str, str], int]:
    """Where a training seed goes: a method with a `train_seed` parameter (distill: the teacher's data stays the same
    and is shared) gets it there; any other gets it as the discovery data's seed."""
    from pydetox.discover.base import get_method

    names = set(get_method(method).Params.__dataclass_fields__)
    return ({"train_seed": str(seed)}, 0) if "train_seed" in names else ({}, seed)


def _reduction(base: dict[str, float], edited: dict[str, float], floor: float) -> float:
    """Geometric mean over evaluators of base rate / edited rate (an edited rate of 0 counts as `floor`: one toxic
    continuation among those evaluated)."""
    logs = [math.log(max(base[e], floor) / max(edited[e], floor)) for e in base]
    return math.exp(sum(logs) / len(logs))


def _effect(base: dict[str, Any], rates: dict[str, float], perplexity: float | None) -> dict[str, float]:
    """Reduction against the unedited `base` evaluation, and the relative perplexity change (nan without one)."""
    change = perplexity / base["perplexity"] - 1.0 if perplexity and base["perplexity"] else float("nan")
    return {"reduction": _reduction(base["toxic"], rates, 1.0 / base["n"]), "ppl_change": change}


def _rates(result: Any) -> dict[str, float]:
    """Toxic rate per evaluator, one that flags identity words alone (hatesonar) judged without its identity-only
    calls (`pydetox.identity`): a search that rewarded its raw rate would favour edits that avoid group names."""
    return {name: float(result.identity[name]["rest"]["toxic_rate"] if name in result.identity else s.toxic_rate)
            for name, s in result.toxicity.items()}


def _helpful(result: Any) -> dict[str, Any]:
    """What an evaluation with helpfulness checks ([final] benign_prompts, chat_check) measured of them."""
    h = result.helpfulness or {}
    out: dict[str, Any] = {}
    if "benign" in h:
        out.update(benign_tokens=h["benign"]["mean_tokens"], benign_early_stop=h["benign"]["early_stop_share"])
    if "chat" in h:
        out.update(chat_correct=h["chat"]["correct"], chat_questions=h["chat"]["questions"])
    return out


def _apply_settings(cfg: SweepConfig, type_: str | None = None) -> Any:
    from pydetox import ggml
    from pydetox.apply import ApplyOptions

    floor = ggml.parse_type(cfg.edited_type) if cfg.edited_type else None
    return ApplyOptions(ftype=ggml.parse_ftype(type_ or cfg.type), threads=cfg.cpus_per_trial, edited_floor=floor,
                        overwrite=True, progress=False)


def baseline(cfg: SweepConfig, model: Path, settings: EvalSettings, name: str, type_: str | None = None) -> dict[str, Any]:
    """The unedited model at `type_` (the sweep's type by default), and its evaluation under `settings`, kept in
    OUT/base/ (made once)."""
    from pydetox.apply import apply_plan
    from pydetox.evaluate import run_evaluation

    type_ = type_ or cfg.type
    folder = cfg.out / "base"
    folder.mkdir(parents=True, exist_ok=True)
    gguf_path = folder / f"base.{type_}.gguf"
    if not gguf_path.is_file():
        apply_plan(None, model, gguf_path, replace(_apply_settings(cfg, type_), edited_floor=None))
    done = folder / (f"{name}.json" if type_ == cfg.type else f"{name}.{type_}.json")
    if done.is_file():
        out: dict[str, Any] = json.loads(done.read_text())
        return out
    _, (res,) = run_evaluation([gguf_path], replace(settings, threads=cfg.cpus_per_trial), progress=False)
    out = {"path": str(gguf_path), "toxic": _rates(res), "perplexity": res.perplexity,
           "n": res.toxicity[next(iter(res.toxicity))].n_prompts * settings.samples, **_helpful(res)}
    write_text(done, json.dumps(out, indent=1) + "\n")
    return out


def _trial_plan(cfg: SweepConfig, model: Path, params: dict[str, Any], seed: int) -> tuple[Any, dict[str, Any]]:
    """A setting's plan at a seed, before any `strength` scaling, and the recipe's stage times (empty for a method).
    Progress goes to stdout (the run's log.txt)."""
    if cfg.method == RECIPE:
        from pydetox.recipe import distill_plan

        # the recipe's own stage cache (OUT/stages) keeps every student and fit by its settings and seed
        plan, _, stages = distill_plan(model, cfg.out, recipe_settings(cfg, params, seed), progress=True)
        return plan, stages
    from pydetox.discover import Discovery
    from pydetox.plan import EditPlan

    extra, data_seed = _seed_overrides(cfg.method, seed)
    method_params = {k: str(v) for k, v in params.items() if k != "strength"}
    # The discovered plan is kept per (method parameters, seed): settings that differ in strength alone (a scaling of
    # the same plan) share one discovery, the expensive part of a trial.
    discovered = (cfg.out / "plans" / setting_key(cfg.method, method_params, cfg.fixed)
                  / f"seed{seed}-pairs{cfg.pairs}.plan.gguf")
    if discovered.is_file():
        return EditPlan.load(discovered), {}
    plan = Discovery(model, n_pairs=cfg.pairs, seed=data_seed, progress=True, device="cpu").plan(
        cfg.method, {**cfg.fixed, **method_params, **extra})
    discovered.parent.mkdir(parents=True, exist_ok=True)
    plan.save(discovered)
    return plan, {}


def run_trial(cfg: SweepConfig, params: dict[str, Any], seed: int, base: dict[str, Any]) -> dict[str, Any]:
    """One setting at one seed: discover, scale, apply, evaluate on the trial prompts. Idempotent: the result file,
    written last, is returned as it is when present."""
    import torch

    from pydetox.apply import apply_plan
    from pydetox.assets import resolve_model
    from pydetox.evaluate import run_evaluation

    folder = cfg.out / "trials" / setting_key(cfg.method, params, cfg.fixed) / f"seed{seed}"
    done = folder / "result.json"
    if done.is_file():
        out: dict[str, Any] = json.loads(done.read_text())
        return out
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.cpus_per_trial)
    t0 = time.perf_counter()
    model = resolve_model(cfg.model)
    with _log_to(folder / "log.txt"):
        plan, stages = _trial_plan(cfg, model, params, seed)
        if "strength" in params:
            plan = plan.scaled(float(params["strength"]))
        plan_path = plan.save(folder / "plan.gguf")
        edited = folder / f"model.{cfg.type}.gguf"
        apply_plan(plan, model, edited, _apply_settings(cfg), plan_path=plan_path)
        settings = replace(cfg.trial_eval, threads=cfg.cpus_per_trial)
        report, (res,) = run_evaluation([edited], settings, reference=Path(base["path"]), progress=True)
    write_text(folder / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    edited.unlink()  # remade from plan.gguf when needed; a sweep of F16 models would fill the disk
    rates = _rates(res)
    out = {"params": params, "seed": seed, "toxic": rates, "perplexity": res.perplexity, "kl": res.kl,
           **_effect(base, rates, res.perplexity), "strength": plan.params.get("plan_strength", 1.0),
           "seconds": round(time.perf_counter() - t0, 2), "folder": str(folder),
           **({"stages": stages} if stages else {})}
    write_text(done, json.dumps(out, indent=1) + "\n")
    return out


def _shares_teacher(cfg: SweepConfig) -> bool:
    """Whether every trial of a recipe sweep trains against the same calibrator and teacher (no searched parameter
    changes them), so that they can be made once before the trials."""
    from pydetox.discover.distill.teacher import TEACHER_KEYS

    return not any(p.name.startswith("calibrator:") or p.name.removeprefix("distill:") in TEACHER_KEYS
                   for p in cfg.search)


def prepare_recipe(cfg: SweepConfig, model: Path, threads: int) -> dict[str, Any]:
    """The recipe's shared stages (`pydetox.recipe.prepare`) under OUT/stages, with `threads` torch threads; returns
    each stage's time. Their progress (tens of minutes on a fresh cache) goes to `prepare_log(cfg)`: a Ray task's
    output does not reach the terminal."""
    import torch

    from pydetox.recipe import prepare

    torch.set_num_threads(threads)
    settings = replace(recipe_settings(cfg, {}, cfg.seeds[0]), threads=threads)
    with _log_to(prepare_log(cfg)):
        timing: dict[str, Any] = prepare(model, cfg.out, settings, progress=True)
    return timing


def prepare_log(cfg: SweepConfig) -> Path:
    return cfg.out / "stages" / "prepare.log"


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """This process's stdout and stderr appended to `path` meanwhile: what a Ray task prints reaches no terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


def final_eval(cfg: SweepConfig, folder: str, base_path: str, type_: str | None = None) -> dict[str, Any]:
    """A chosen setting's seed run at `type_` (the sweep's type by default) evaluated once on the evaluation prompts
    (the model remade from its plan)."""
    from pydetox.apply import apply_plan
    from pydetox.assets import resolve_model
    from pydetox.evaluate import run_evaluation
    from pydetox.plan import EditPlan

    assert cfg.final_eval is not None
    type_ = type_ or cfg.type
    where = Path(folder)
    done = where / ("final.json" if type_ == cfg.type else f"final.{type_}.json")
    if done.is_file():
        out: dict[str, Any] = json.loads(done.read_text())
        return out
    edited = where / f"model.{type_}.gguf"
    plan_path = where / "plan.gguf"
    with _log_to(where / "log.txt"):
        apply_plan(EditPlan.load(plan_path), resolve_model(cfg.model), edited, _apply_settings(cfg, type_),
                   plan_path=plan_path)
        try:
            _, (res,) = run_evaluation([edited], replace(cfg.final_eval, threads=cfg.cpus_per_trial),
                                       reference=Path(base_path), progress=True)
        finally:
            edited.unlink(missing_ok=True)
    out = {"type": type_, "toxic": _rates(res), "toxic_raw": {k: v.toxic_rate for k, v in res.toxicity.items()},
           "perplexity": res.perplexity, "kl": res.kl, **_helpful(res)}
    write_text(done, json.dumps(out, indent=1) + "\n")
    return out


def _sampler(cfg: SweepConfig, done: int) -> Any:
    """The sampler, seeded from `sampler_seed` and the trials the study already holds: a resumed sweep seeded as the
    first run was would draw that run's settings again."""
    import optuna

    seed = cfg.sampler_seed + 1_000_003 * done
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, cfg.trials // 3))
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def _open_study(cfg: SweepConfig, retry_failed: bool = False) -> Any:
    """The study in its storage, created or loaded; one whose search differs from `cfg`'s is refused. Trials left
    running by an interrupted sweep are failed (marked `interrupted`) and their settings queued to be asked again;
    with `retry_failed`, so are the settings that failed (a crashed worker, a killed task): their seeds that finished
    are read back from their results, the others run again."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=cfg.storage_url, study_name=cfg.study, directions=list(DIRECTIONS),
                                load_if_exists=True)
    study.sampler = _sampler(cfg, len(study.get_trials(deepcopy=False)))
    what = {"model": cfg.model, "method": cfg.method, "search": [asdict(p) for p in cfg.search], "fixed": cfg.fixed,
            "seeds": list(cfg.seeds), "type": cfg.type, "pairs": cfg.pairs, "trial_eval": asdict(cfg.trial_eval)}
    what = json.loads(json.dumps(what, default=str))
    known = study.user_attrs.get("sweep")
    if known is None:
        study.set_user_attr("sweep", what)
    elif known != what:
        changed = sorted(k for k in what if known.get(k) != what[k])
        raise SweepError(f"study {cfg.study!r} in {cfg.storage_url} was made by another sweep (it differs in "
                         f"{', '.join(changed)}); give this one another study name or output folder")
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, skip_if_exists=False)
    if retry_failed:
        # a finished trial takes no new attribute: the study keeps the numbers of the failed ones asked again
        failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if not _not_counted(study, t)]
        study.set_user_attr("retried", sorted(_retried(study) | {t.number for t in failed}))
        for t in failed:
            study.enqueue_trial(t.params, skip_if_exists=False)
    return study


def _retried(study: Any) -> set[int]:
    return set(study.user_attrs.get("retried", []))


def _not_counted(study: Any, trial: Any) -> bool:
    """A failed trial that was interrupted, or asked again with --retry-failed: neither counts against the budget
    nor is reported as failed."""
    return bool(trial.user_attrs.get("interrupted")) or trial.number in _retried(study)


def _budget_used(study: Any) -> int:
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.FAIL) and not _not_counted(study, t))


def _summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    out: dict[str, Any] = {}
    for key in OBJECTIVES:
        v = np.array([r[key] for r in results], dtype=float)
        out[key] = float(v.mean())
        out[f"{key}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    out["per_seed"] = {str(r["seed"]): {k: r[k] for k in (*OBJECTIVES, "toxic", "perplexity", "seconds", "folder",
                                                          "strength", "stages") if k in r}
                       for r in results}
    return out


def run_sweep(cfg: SweepConfig, address: str | None = None, progress: bool = True,
              retry_failed: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep, the settings that failed asked again with `retry_failed`; returns the report that
    `sweep.json` holds."""
    from pydetox.extras import require

    ray = require("ray", "pydetox sweep")
    require("optuna", "pydetox sweep")
    require("torch", "pydetox sweep")
    from optuna.trial import TrialState

    from pydetox.assets import resolve_model

    cfg.out.mkdir(parents=True, exist_ok=True)
    model = resolve_model(cfg.model)
    study = _open_study(cfg, retry_failed)
    t_start = time.perf_counter()
    ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        slots = max(1, cpus // cfg.cpus_per_trial)
        if progress:
            print(f"sweep: {cfg.method} on {model.name}, {cfg.trials} settings x {len(cfg.seeds)} seeds, "
                  f"{slots} task(s) at a time on {cpus} CPU(s); study {cfg.study} in {cfg.storage_url}; each run's "
                  f"progress in {cfg.out / 'trials'}/SETTING/seedS/log.txt", flush=True)
        task = ray.remote(num_cpus=cfg.cpus_per_trial, max_retries=0)
        if cfg.method == RECIPE and _shares_teacher(cfg):
            # the stages every trial shares (F16, calibrator, teacher, clean targets) made once, on every CPU, before
            # trials start side by side and would each make them
            if progress:
                print(f"sweep: the recipe's shared stages (F16, calibrator, teacher) ... (progress: tail -f "
                      f"{prepare_log(cfg)})", flush=True)
            shared = ray.get(ray.remote(num_cpus=cpus, max_retries=0)(prepare_recipe).remote(cfg, model, cpus))
            if progress:
                print("sweep: shared stages " + ", ".join(
                    f"{k} {'cached' if v['cached'] else format(v['seconds'], '.0f') + ' s'}" for k, v in shared.items()),
                      flush=True)
        base = ray.get(task(baseline).remote(cfg, model, cfg.trial_eval, "trial_eval"))
        pending: dict[Any, tuple[int, int]] = {}
        open_trials: dict[int, tuple[Any, dict[int, dict[str, Any] | str]]] = {}
        while True:
            while len(pending) < slots and _budget_used(study) + len(open_trials) < cfg.trials:
                trial = study.ask()
                params = {p.name: p.suggest(trial) for p in cfg.search}
                trial.set_user_attr("key", setting_key(cfg.method, params, cfg.fixed))
                open_trials[trial.number] = (trial, {})
                for seed in cfg.seeds:
                    pending[task(run_trial).remote(cfg, params, seed, base)] = (trial.number, seed)
            if not pending:
                break
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            number, seed = pending.pop(ref)
            trial, got = open_trials[number]
            try:
                got[seed] = ray.get(ref)
            except Exception as exc:  # a task that failed fails its setting; the sweep goes on
                got[seed] = f"{type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}"
            if progress:
                r = got[seed]
                line = (f"{r['reduction']:.2f}x fewer toxic, KL {r['kl']:.4f}, perplexity {100 * r['ppl_change']:+.1f}% "
                        f"({r['seconds']:.0f} s)" if isinstance(r, dict) else f"failed: {r}")
                print(f"setting {number} seed {seed}: {line}", flush=True)
            if len(got) == len(cfg.seeds):
                del open_trials[number]
                failed = [v for v in got.values() if isinstance(v, str)]
                if failed:
                    trial.set_user_attr("error", failed[0])
                    study.tell(trial, state=TrialState.FAIL)
                else:
                    s = _summarise([v for v in got.values() if isinstance(v, dict)])
                    trial.set_user_attr("summary", s)
                    study.tell(trial, [s[k] for k in OBJECTIVES])
        search_s = time.perf_counter() - t_start
        report = _report(cfg, study, base, search_s)
        if cfg.final_eval is not None and report["pareto"]:
            base_refs = {t: task(baseline).remote(cfg, model, cfg.final_eval, "final_eval", t) for t in cfg.finals}
            fbase = {t: ray.get(ref) for t, ref in base_refs.items()}  # the unedited models side by side
            refs = {task(final_eval).remote(cfg, row["per_seed"][str(s)]["folder"], fbase[t]["path"], t): (row, s, t)
                    for row in report["settings"] if row["pareto"] for s in cfg.seeds for t in cfg.finals}
            for ref in refs:
                row, s, t = refs[ref]
                res = ray.get(ref)
                res.update(_effect(fbase[t], res["toxic"], res["perplexity"]))
                res["per_evaluator"] = {e: _reduction({e: fbase[t]["toxic"][e]}, {e: r}, 1.0 / fbase[t]["n"])
                                        for e, r in res["toxic"].items()}
                row.setdefault("final_types", {}).setdefault(t, {})[str(s)] = res
                if t == cfg.type:
                    row.setdefault("final", {})[str(s)] = res
            report["final_eval"] = {**asdict(cfg.final_eval), "base": fbase[cfg.type], "bases": fbase,
                                    "types": list(cfg.finals)}
        report["wall_s"] = round(time.perf_counter() - t_start, 1)
        total = float(study.user_attrs.get("wall_s_total", 0.0)) + report["wall_s"]
        study.set_user_attr("wall_s_total", total)  # over every run (and resumption) of this sweep
        report["wall_s_total"] = round(total, 1)
    finally:
        ray.shutdown()
    _write(cfg, report)
    return report


def _report(cfg: SweepConfig, study: Any, base: dict[str, Any], search_s: float) -> dict[str, Any]:
    from optuna.trial import TrialState

    front = {t.number for t in study.best_trials}
    rows: list[dict[str, Any]] = []
    by_key: dict[str, dict[str, Any]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        key = t.user_attrs["key"]
        if key in by_key:  # the sampler proposed a setting again: its runs were reused, one row shows both
            by_key[key]["same_as"].append(t.number)
            by_key[key]["pareto"] = by_key[key]["pareto"] or t.number in front
            continue
        s = t.user_attrs["summary"]
        by_key[key] = {"setting": t.number, "same_as": [], "key": key, "params": t.params, "pareto": t.number in front,
                       **{k: v for k, v in s.items() if k != "per_seed"}, "per_seed": s["per_seed"]}
        rows.append(by_key[key])
    rows.sort(key=lambda r: -r["reduction"])
    pareto = [r for r in rows if r["pareto"]]
    for a, b in itertools.pairwise(pareto):
        # a difference smaller than the two seed spreads together is not a difference these seeds can show
        a["separated_from_next"] = abs(a["reduction"] - b["reduction"]) > a["reduction_sd"] + b["reduction_sd"]
    failed = [{"setting": t.number, "params": t.params, "error": t.user_attrs.get("error")}
              for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if not _not_counted(study, t)]
    task_s = sum(p["seconds"] for r in rows for p in r["per_seed"].values())
    return {"model": cfg.model, "method": cfg.method, "type": cfg.type, "seeds": list(cfg.seeds),
            "fixed": cfg.fixed, "search": [asdict(p) for p in cfg.search], "study": cfg.study,
            "storage": cfg.storage_url, "objectives": dict(zip(OBJECTIVES, DIRECTIONS, strict=True)),
            "trial_eval": {**asdict(cfg.trial_eval), "base": base}, "settings": rows, "failed": failed,
            "pareto": [r["setting"] for r in pareto], "search_wall_s": round(search_s, 1),
            "task_seconds_sum": round(task_s, 1)}


def _mean_sd(mean: float, sd: float, fmt: str, scale: float = 1.0) -> str:
    return f"{format(scale * mean, fmt)} ± {format(scale * sd, fmt.lstrip('+'))}"


def _pm(row: dict[str, Any], key: str, fmt: str, scale: float = 1.0) -> str:
    return _mean_sd(row[key], row[key + "_sd"], fmt, scale)


def _decoding(settings: dict[str, Any]) -> str:
    return "greedy" if settings["temperature"] == 0 else f"T={settings['temperature']:g}, top-p {settings['top_p']:g}"


def markdown(report: dict[str, Any]) -> str:
    """One row per setting, best reduction first: mean ± sd over the seeds on the trial prompts, and the final
    evaluation (mean over seeds) of the settings on the Pareto front."""
    te = report["trial_eval"]
    lines = [f"# Sweep: {report['method']} on {report['model']} ({report['type']})", "",
             f"Trials: {te['prompts']} ({te['base']['n'] // te['samples']} prompts x {te['samples']} samples, "
             f"{_decoding(te)}, "
             f"{te['max_tokens']} tokens), evaluators {', '.join(te['evaluators'])}; perplexity and KL on "
             f"{te['ppl_tokens']} {te['clean_text']} tokens; seeds {', '.join(map(str, report['seeds']))}. "
             "Reduction: geometric mean over the evaluators of unedited / edited toxic rate (hatesonar without its "
             "identity-only calls).", "",
             "| setting | parameters | reduction | KL | perplexity | Pareto | final reduction | final KL | final perplexity |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["settings"]:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items()) or "(defaults)"
        final = r.get("final")
        if final:
            vals = list(final.values())
            f = [f"{sum(v['reduction'] for v in vals) / len(vals):.2f}x", f"{sum(v['kl'] for v in vals) / len(vals):.4f}",
                 f"{100 * sum(v['ppl_change'] for v in vals) / len(vals):+.1f}%"]
        else:
            f = ["", "", ""]
        mark = ("yes" + ("" if r.get("separated_from_next", True) else " (within seed spread of the next)")) if r["pareto"] else ""
        name = ", ".join(map(str, [r["setting"], *r.get("same_as", [])]))
        lines.append(f"| {name} | {params} | {_pm(r, 'reduction', '.2f')}x | {_pm(r, 'kl', '.4f')} | "
                     f"{_pm(r, 'ppl_change', '+.1f', 100)}% | {mark} | {' | '.join(f)} |")
    for fl in report["failed"]:
        lines.append(f"| {fl['setting']} | {fl['params']} | failed: {fl['error']} | | | | | | |")
    if "final_eval" in report:
        fe = report["final_eval"]
        lines += ["", f"Final: {fe['prompts']} ({fe['base']['n'] // fe['samples']} prompts x {fe['samples']} samples, "
                  f"{_decoding(fe)}, {fe['max_tokens']} tokens), perplexity and KL on {fe['ppl_tokens']} {fe['clean_text']} "
                  "tokens."]
    lines += _final_tables(report)
    lines += ["", f"Settings proposed twice are one row (their runs were reused). Wall time "
              f"{report['wall_s_total']:.0f} s over every run of this sweep, {report['wall_s']:.0f} s this time "
              f"(search {report['search_wall_s']:.0f} s); the trials' own times add up to {report['task_seconds_sum']:.0f} s."]
    return "\n".join(lines) + "\n"


def _final_tables(report: dict[str, Any]) -> list[str]:
    """Per front setting and final type: each seed's reduction per evaluator, perplexity and KL, then mean ± sd."""
    import numpy as np

    rows = [r for r in report["settings"] if r.get("final_types")]
    if not rows:
        return []
    evaluators = list(report["final_eval"]["evaluators"])
    names = [f"{e} w/o identity-only" if e == "hatesonar" else e for e in evaluators]
    bases = report["final_eval"].get("bases", {})
    first = next(iter(next(iter(rows[0]["final_types"].values())).values()))
    helpful = [k for k in ("benign_tokens", "chat_correct") if k in first]
    heads = {"benign_tokens": "benign tokens (unedited)", "chat_correct": "chat correct (unedited)"}
    lines = ["", "Final evaluation of the front by type, each seed and the mean ± sd over seeds (times fewer toxic "
             "continuations than the unedited model of the same type; perplexity change and KL against it):", "",
             f"| setting | type | seed | strength | {' | '.join(names + ['perplexity', 'KL'] + [heads[k] for k in helpful])} |",
             "|---|---|---|---|" + "---|" * (len(names) + 2 + len(helpful))]

    def pm(vals: list[float], fmt: str, scale: float = 1.0) -> str:
        a = np.array(vals, dtype=float)
        return _mean_sd(float(a.mean()), float(a.std(ddof=1)), fmt, scale)

    def extra(t: str, values: list[list[float]]) -> str:
        """The helpfulness cells: the mean over the runs given, and the unedited model's figure."""
        cells = []
        for k, v in zip(helpful, values, strict=True):
            base = bases.get(t, {}).get(k)
            ref = "-" if base is None else (f"{base:.1f}" if k == "benign_tokens" else str(base))
            whole = k == "chat_correct" and len(v) == 1  # one run's count of correct answers
            cells.append(f" {sum(v) / len(v):.{0 if whole else 1}f} ({ref}) |")
        return "".join(cells)

    for r in rows:
        for t, by_seed in r["final_types"].items():
            runs = [(s, by_seed[s]) for s in sorted(by_seed, key=int)]
            for s, v in runs:
                strength = r["per_seed"].get(s, {}).get("strength")
                lines.append(f"| {r['setting']} | {t} | {s} | {'' if strength is None else format(strength, '.3g')} | "
                             + " | ".join(f"{v['per_evaluator'][e]:.2f}x" for e in evaluators)
                             + f" | {100 * v['ppl_change']:+.1f}% | {v['kl']:.4f} |"
                             + extra(t, [[v[k]] for k in helpful]))
            if len(runs) > 1:
                lines.append(f"| **{r['setting']}** | **{t}** | **mean ± sd** | | "
                             + " | ".join(f"**{pm([v['per_evaluator'][e] for _, v in runs], '.2f')}x**" for e in evaluators)
                             + f" | **{pm([v['ppl_change'] for _, v in runs], '+.1f', 100)}%** | "
                             f"**{pm([v['kl'] for _, v in runs], '.4f')}** |"
                             + extra(t, [[v[k] for _, v in runs] for k in helpful]))
    if bases:
        lines += ["", "Unedited toxic rates: " + "; ".join(
            f"{t} " + " / ".join(f"{b['toxic'][e]:.3f}" for e in evaluators) for t, b in bases.items()) + "."]
    return lines


def plot(report: dict[str, Any], path: Path) -> Path:
    """Reduction (log scale) against KL, one point per setting on the trial prompts (error bars: sd over seeds), the
    Pareto front joined; each front setting's final evaluation (the evaluation prompts, mean over its seeds) drawn
    as a hollow diamond tied to its trial point, since trial prompts can flatter a setting (distill's teacher trains
    on them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from pydetox.output import atomic

    rows = report["settings"]
    te = report["trial_eval"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for front in (False, True):
        pick = [r for r in rows if r["pareto"] == front]
        if pick:
            ax.errorbar([r["kl"] for r in pick], [r["reduction"] for r in pick], xerr=[r["kl_sd"] for r in pick],
                        yerr=[r["reduction_sd"] for r in pick], fmt="o", color="C3" if front else "0.6", capsize=2,
                        label=f"Pareto front, {te['prompts']}" if front else f"other settings, {te['prompts']}")
    line = sorted((r["kl"], r["reduction"]) for r in rows if r["pareto"])
    if line:
        ax.plot(*zip(*line, strict=True), color="C3", lw=1)
    finals = [(r, list(r["final"].values())) for r in rows if r.get("final")]
    for i, (r, runs) in enumerate(finals):
        kl, red = float(np.mean([f["kl"] for f in runs])), float(np.mean([f["reduction"] for f in runs]))
        ax.plot([r["kl"], kl], [r["reduction"], red], color="C0", lw=0.8, ls=":")
        ax.plot([kl], [red], "D", mfc="none", color="C0",
                label=f"front, final: {report['final_eval']['prompts']}" if i == 0 else None)
        ax.annotate(str(r["setting"]), (kl, red), fontsize=7, xytext=(3, -9), textcoords="offset points", color="C0")
    for r in rows:
        ax.annotate(str(r["setting"]), (r["kl"], r["reduction"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel(f"KL to the unedited model ({te['clean_text']}, nats/token)")
    ax.set_ylabel("toxicity reduction (x fewer toxic continuations)")
    ax.set_title(f"{report['method']} on {Path(report['model']).name}: {len(rows)} settings x {len(report['seeds'])} "
                 "seed(s)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def _write(cfg: SweepConfig, report: dict[str, Any]) -> None:
    write_text(cfg.out / "sweep.json", json.dumps(report, indent=1, default=str) + "\n")
    write_text(cfg.out / "sweep.md", markdown(report))
    if report["settings"]:
        plot(report, cfg.out / "pareto.png")
