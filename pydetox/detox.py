"""`pydetox detox`: the whole job in one command. Discover a plan on the full-precision model (method `distill`, the
default, through the cached stages of pydetox.recipe; any other method through pydetox.discover), apply it at every
requested type (and make the unedited model at the same types), evaluate all of them on llama.cpp against the
unedited F16 as the KL reference, and write one report: does the edit work, what does it cost (perplexity, KL,
benign-prompt length, the chat check), and does it survive quantization."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydetox import ggml
from pydetox.apply import ApplyOptions, apply_plan, peak_rss_bytes
from pydetox.errors import PydetoxError
from pydetox.evaluate import EvalSettings, ModelSpec, run_evaluation
from pydetox.plan import EditPlan
from pydetox.recipe import DEFAULT_TYPES, NAMESPACES, RecipeSettings, distill_plan, with_overrides
from pydetox.report import label


@dataclass(frozen=True)
class DetoxJob:
    model: Path  # a GGUF (the bundled models ship only as GGUF)
    methods: tuple[str, ...]
    types: tuple[str, ...] = DEFAULT_TYPES
    out: Path = Path("pydetox-detox")
    overrides: dict[str, dict[str, str]] | None = None  # method -> parameter overrides
    data: str = "paradetox-3000"
    n_pairs: int = 500
    seed: int = 0
    edited_type: str | None = "Q8_0"  # floor for edited tensors at low-bit types (see ApplyOptions.edited_floor)
    calibrator: Path | None = None  # also evaluate the unedited model fused with this calibrator (pydetox.fusion)
    alphas: tuple[float, ...] = (0.2, 0.4)
    plans: tuple[Path, ...] = ()  # plans already discovered (named by their method), applied and evaluated as well
    # Apply each plan to the unedited model at each type (what a user with a downloaded Q4_K_M does: untouched tensors
    # stay byte for byte, touched ones are dequantized, edited and requantized at the floor), instead of editing F16
    # and quantizing the result (which gives touched tensors a fresh quantization of their own).
    edit_quantized: bool = False
    eval_settings: EvalSettings = field(default_factory=lambda: EvalSettings(n_prompts=140, ppl_tokens=4096))
    # How method "distill" runs: the staged recipe of pydetox.recipe (calibrator, teacher, student, strength fit).
    recipe: RecipeSettings = field(default_factory=RecipeSettings)
    # Replace the models, plans and report an earlier run left in `out` (its cached stages are reused either way).
    force: bool = False


def _apply(plan: EditPlan | None, plan_path: Path | None, src: Path, dst: Path, qtype: str | None,
           edited_type: str | None = None) -> Path:
    """`qtype` None keeps each tensor's type (untouched ones are copied byte for byte)."""
    floor = ggml.parse_type(edited_type) if edited_type else None
    ftype = ggml.parse_ftype(qtype) if qtype else None
    # replaced atomically: the outputs were claimed (and --force checked) before the job started
    apply_plan(plan, src, dst, ApplyOptions(ftype=ftype, progress=False, edited_floor=floor, overwrite=True),
               plan_path=plan_path)
    return dst


def _adapters(plans: dict[str, tuple[EditPlan, Path]], f16: Path, prefix: Path) -> dict[str, str]:
    """Each plan also as a LoRA adapter (pydetox.lora) where it has that form: the edit for any quantization of the
    model, applied at run time and never requantized. What cannot be one is said, not an error."""
    from pydetox.lora import describe, export_lora

    made = {}
    for method, (plan, path) in plans.items():
        dst = Path(f"{prefix}.{method}.lora.gguf")
        try:
            report = export_lora(plan, f16, dst, plan_path=path, force=True)
        except PydetoxError as exc:
            made[method] = f"no adapter: {exc}"
            print(f"{method}: no adapter ({exc})")
            continue
        made[method] = str(dst)
        print(f"{method}: {describe(report)}")
    return made


def _cards(report: dict[str, Any], rows: list[dict[str, Any]], names: dict[str, tuple[str, str]]) -> None:
    """A model card beside every model the job wrote, with its own evaluation (pydetox.card)."""
    from pydetox.card import write_card

    by_row = {(r["method"], r["type"]): r for r in rows}
    for m in report["models"]:
        if m.get("calibrator"):
            continue  # a fused pair is not a file of its own
        write_card(m["path"], {**m, "settings": report["settings"]}, by_row.get(names.get(label(m), ("", ""))))


def _mean_tokens(m: dict[str, Any]) -> float:
    """Tokens per continuation: an edit that makes the model stop early lowers toxic rates by writing less."""
    t = next(iter(m["toxicity"].values()))
    return float(m["generated_tokens"]) / max(1, int(t["n_prompts"]) * int(t["n_samples"]))


def _ratio(base: float, edited: float) -> float:
    return base / edited if edited > 0 else float("inf")


def summarize(report: dict[str, Any], names: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """Per (method, type): toxic-rate reduction factor per evaluator against the unedited model at the same type,
    perplexity change against it, KL against the unedited F16 (edit + quantization) and against the unedited model at
    the same type (the edit alone; at F16 the two are the same)."""
    by = {names[label(m)]: m for m in report["models"]}
    rows = []
    for (method, qtype), m in by.items():
        if method == "base":
            continue
        base = by[("base", qtype)]
        row: dict[str, Any] = {"method": method, "type": qtype, "perplexity": m["perplexity"],
                               "perplexity_change": m["perplexity"] / base["perplexity"] - 1, "kl": m["kl"],
                               "kl_edit": m["kl"] if m.get("kl_base") is None else m["kl_base"],
                               **{f"{pre}{k}": src.get("degeneration", {}).get(k) for pre, src in (("", m), ("base_", base))
                                  for k in ("long_run_share", "broken_share")},
                               "mean_tokens": _mean_tokens(m), "base_mean_tokens": _mean_tokens(base)}
        for check, keys in (("benign", ("mean_tokens", "early_stop_share", "broken_share")),
                            ("chat", ("accuracy", "mean_tokens"))):
            got, ref = m.get("helpfulness", {}).get(check), base.get("helpfulness", {}).get(check)
            if got and ref:
                for k in keys:
                    row[f"{check}_{k}"], row[f"{check}_base_{k}"] = got[k], ref[k]
        for ev, t in m["toxicity"].items():
            b = base["toxicity"][ev]["toxic_rate"]
            row[f"{ev}_rate"] = t["toxic_rate"]
            row[f"{ev}_ci95"] = t["ci95"]
            row[f"{ev}_base_rate"] = b
            row[f"{ev}_reduction"] = _ratio(b, t["toxic_rate"])
        for ev, c in m.get("identity", {}).items():  # the evaluator judged without its identity-only calls
            if ev in base.get("identity", {}):
                b = base["identity"][ev]["rest"]["toxic_rate"]
                row[f"{ev}_rest_rate"], row[f"{ev}_rest_base_rate"] = c["rest"]["toxic_rate"], b
                row[f"{ev}_rest_reduction"] = _ratio(b, c["rest"]["toxic_rate"])
                row[f"{ev}_identity_only"], row[f"{ev}_base_identity_only"] = c["identity_only"], base["identity"][ev]["identity_only"]
        rows.append(row)
    return rows


def summary_table(rows: list[dict[str, Any]], evaluators: list[str]) -> str:
    rest = [e for e in evaluators if all(f"{e}_rest_rate" in r for r in rows)] if rows else []
    head = ["method", "type", *[f"{e} rate (x less)" for e in evaluators],
            *[f"{e} w/o identity-only (x less)" for e in rest], "ppl change", "KL vs F16", "KL vs base",
            "broken (base)", "tokens (base)", "benign tokens (base)", "chat correct (base)"]

    def pair(r: dict[str, Any], key: str, fmt: str) -> str:
        check, _, k = key.partition("_")
        if key not in r:
            return "-"
        return f"{format(r[key], fmt)} ({format(r[f'{check}_base_{k}'], fmt)})"

    body = [[r["method"], r["type"], *[f"{r[e + '_rate']:.3f} ({r[e + '_reduction']:.2f}x)" for e in evaluators],
             *[f"{r[e + '_rest_rate']:.3f} ({r[e + '_rest_reduction']:.2f}x)" for e in rest],
             f"{r['perplexity_change']:+.1%}", f"{r['kl']:.4f}", f"{r['kl_edit']:.4f}",
             f"{r['broken_share']:.1%} ({r['base_broken_share']:.1%})",
             f"{r['mean_tokens']:.1f} ({r['base_mean_tokens']:.1f})", pair(r, "benign_mean_tokens", ".1f"),
             pair(r, "chat_accuracy", ".1%")] for r in rows]
    table = [head, *body]
    widths = [max(len(x[i]) for x in table) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)) for x in table)


def stage_line(stages: dict[str, dict[str, Any]]) -> str:
    """'stages: f16 1 s, calibrator cached (made in 304 s), distill 817 s (2.35 GB), ...' for the recipe's stages
    (a stage run in a child process with that process's peak resident memory)."""
    parts = []
    for name, t in stages.items():
        if t["cached"]:
            parts.append(f"{name} cached (made in {t['made_in_s']:.0f} s)")
        else:
            parts.append(f"{name} {t['seconds']:.0f} s" + (f" ({t['peak_rss_gb']:.2f} GB)" if "peak_rss_gb" in t else ""))
    return "stages: " + ", ".join(parts) if parts else ""


def _claim_outputs(job: DetoxJob, methods: list[str]) -> None:
    """Check every file the job will write before any work: none is one of its inputs, and none is left from an
    earlier run unless `job.force` (pydetox.output)."""
    from pydetox.output import Outputs

    extra = (job.overrides or {}).get("distill", {}).get("calibrator")
    outputs = Outputs([job.model, *job.plans, job.calibrator, extra], force=job.force)
    stem = job.model.name.removesuffix(".gguf")
    names = [f"{stem}.{t}.gguf" for t in dict.fromkeys(("F16", *job.types))]
    names += [f"{stem}.{m}.{t}.gguf" for m in methods for t in job.types] + [f"{stem}.{m}.lora.gguf" for m in methods]
    names += [f"{n}.md" for n in names if not n.endswith(".lora.gguf")]  # model cards
    names += [f"{m}.plan.gguf" for m in job.methods] + ["report.json", "report.md", "report.png"]
    for n in names:
        outputs.claim(job.out / n, force=True)  # refuses an input named like an output, even with --force
    existing = [n for n in names if (job.out / n).exists()]
    if existing and not job.force:
        raise PydetoxError(f"{job.out} holds the results of an earlier run ({', '.join(existing[:3])}"
                           f"{', ...' if len(existing) > 3 else ''}); pass --force to replace them (the cached stages "
                           f"in {job.out / 'stages'} are reused either way), or choose another --out")


def _given_plans(job: DetoxJob) -> dict[str, tuple[EditPlan, Path]]:
    """The `--plan` files, each named by its method, or by its file name where two plans share a method."""
    plans: dict[str, tuple[EditPlan, Path]] = {}
    loaded = [(EditPlan.load(path), path) for path in job.plans]
    methods = [plan.method for plan, _ in loaded]
    for plan, path in loaded:
        label = plan.method if methods.count(plan.method) == 1 else path.name.removesuffix(".gguf").removesuffix(".plan")
        if label in plans or label in job.methods:
            raise PydetoxError(f"two plans named {label!r}: {plans[label][1] if label in plans else 'discovered here'} "
                               f"and {path}; rename one of the files")
        plans[label] = (plan, path)
    return plans


def _recipe_settings(job: DetoxJob) -> RecipeSettings:
    """The recipe's settings with the job's `--param recipe:`, `distill:` and `calibrator:` overrides and its seed, the
    KL budget fitted at the job's least precise type unless `recipe:fit_type` names one."""
    overrides = job.overrides or {}
    settings = with_overrides(job.recipe, {ns: overrides[ns] for ns in NAMESPACES if ns in overrides}, seed=job.seed)
    return settings.for_types(job.types)


def _discover(job: DetoxJob, plans: dict[str, tuple[EditPlan, Path]], progress: bool) -> dict[str, Any]:
    """Run the job's methods (distill through the staged recipe, the others on one Discovery), save their plans
    in `job.out` and add them to `plans`; returns the discovery timings."""
    from pydetox.discover import Discovery

    timing: dict[str, Any] = {}
    if "distill" in job.methods:
        plan, staged, timing["stages"] = distill_plan(job.model, job.out, _recipe_settings(job), progress)
        plans["distill"] = (plan, plan.save(job.out / "distill.plan.gguf"))
        print(f"distill: {len(plan.edits)} edits at strength {plan.params['plan_strength']:g} "
              f"-> {plans['distill'][1]} (stages in {staged.parent})")
    others = [m for m in job.methods if m != "distill"]
    if others:
        discovery = Discovery(job.model, data=job.data, n_pairs=job.n_pairs, seed=job.seed, progress=progress,
                              device=job.recipe.device)
        for method in others:
            plan = discovery.plan(method, (job.overrides or {}).get(method))
            plans[method] = (plan, plan.save(job.out / f"{method}.plan.gguf"))
            timing[f"{method}_s"] = plan.params["method_s"]
            print(f"{method}: {len(plan.edits)} edits -> {plans[method][1]}")
        timing.update(load_s=discovery.load_s, activations_s=discovery.activation_s)
    return timing


def _models(job: DetoxJob, plans: dict[str, tuple[EditPlan, Path]], f16: Path
            ) -> tuple[list[ModelSpec], dict[str, tuple[str, str]]]:
    """The models to evaluate, written at every type (unedited, each plan, fusion when asked), and the
    (method, type) each label stands for."""
    stem = job.model.name.removesuffix(".gguf")
    models: list[ModelSpec] = []
    names: dict[str, tuple[str, str]] = {}
    for qtype in job.types:
        base = f16 if qtype.upper() == "F16" else _apply(None, None, f16, job.out / f"{stem}.{qtype}.gguf", qtype)
        models.append(ModelSpec(base))
        for method, (plan, plan_path) in plans.items():
            src, ftype = (base, None) if job.edit_quantized else (f16, qtype)  # None: keep the base's types
            edited = _apply(plan, plan_path, src, job.out / f"{stem}.{method}.{qtype}.gguf", ftype, job.edited_type)
            models.append(ModelSpec(edited, base=None if base == f16 else base))
            names[models[-1].label] = (method, qtype)
        if job.calibrator is not None:
            for a in job.alphas:
                models.append(ModelSpec(base, job.calibrator, a))
                names[models[-1].label] = (f"fusion a={a:g}", qtype)
        names[ModelSpec(base).label] = ("base", qtype)
    return models, names


def _write_reports(job: DetoxJob, report: dict[str, Any], rows: list[dict[str, Any]],
                   names: dict[str, tuple[str, str]], timing: dict[str, Any]) -> None:
    """report.json, report.md, report.png, the model cards, and the tables on the terminal."""
    from pydetox import report as rep
    from pydetox.output import write_text

    evaluators = list(job.eval_settings.evaluators)
    write_text(job.out / "report.json", json.dumps(report, indent=2) + "\n")
    stages = stage_line(timing.get("stages", {}))
    if stages:
        stages += (f"; apply and evaluation {report['detox']['apply_and_evaluation_s']:.0f} s; peak memory of this "
                   f"process {report['detox']['peak_rss_gb']:.2f} GB")
    write_text(job.out / "report.md", rep.markdown(report) + "\n" + summary_table(rows, evaluators) + "\n"
               + (f"\n{stages}\n" if stages else ""))
    rep.plot(report, job.out / "report.png", groups=names)
    _cards(report, rows, names)
    print(rep.table(report))
    print()
    print(summary_table(rows, evaluators))
    if stages:
        print(f"\n{stages}")
    print(f"\nwrote {job.out / 'report.json'}, report.md, report.png and the GGUFs in {job.out}")


def run(job: DetoxJob, progress: bool = True) -> dict[str, Any]:
    """Discover (or load) the job's plans, apply them at every type, evaluate every model against the unedited
    one of its type, and write the report, the models and their cards in `job.out`."""
    if job.out.exists() and not job.out.is_dir():
        raise PydetoxError(f"--out {job.out} is a file; expected a folder for the job's models and report")
    job.out.mkdir(parents=True, exist_ok=True)
    plans = _given_plans(job)
    _claim_outputs(job, [*job.methods, *plans])
    timing = _discover(job, plans, progress)
    if not plans:
        raise PydetoxError("nothing to evaluate: name a --method to discover or a --plan to apply")
    t_eval = time.perf_counter()
    stem = job.model.name.removesuffix(".gguf")
    f16 = _apply(None, None, job.model, job.out / f"{stem}.F16.gguf", "F16")
    adapters = _adapters(plans, f16, job.out / stem)
    models, names = _models(job, plans, f16)
    report, _ = run_evaluation(models, job.eval_settings, reference=f16, progress=progress)
    rows = summarize(report, names)
    report["detox"] = {"model": str(job.model), "methods": list(plans), "types": list(job.types),
                       "plans": {m: str(p) for m, (_, p) in plans.items()},
                       "edited_type": job.edited_type, "edit_quantized": job.edit_quantized,
                       "calibrator": None if job.calibrator is None else str(job.calibrator), "alphas": list(job.alphas),
                       "discovery": {"data": job.data, "n_pairs": job.n_pairs, "seed": job.seed, **timing} if job.methods else {},
                       "adapters": adapters,
                       "summary": rows, "apply_and_evaluation_s": round(time.perf_counter() - t_eval, 1),
                       # resident memory at its highest in this process (the stages run in child processes report
                       # their own under discovery's stages)
                       "peak_rss_gb": round(peak_rss_bytes() / 1e9, 2)}
    _write_reports(job, report, rows, names, timing)
    return report
