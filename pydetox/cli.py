"""The `pydetox` command. Heavy imports happen inside each subcommand, so `pydetox --help` is instant."""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydetox import __version__
from pydetox.errors import PydetoxError

if TYPE_CHECKING:
    from pydetox.apply import ApplyOptions
    from pydetox.output import Outputs


def _cmd_fetch(args: argparse.Namespace) -> int:
    from pydetox.assets import ASSETS, fetch

    if args.list:
        for a in ASSETS.values():
            print(f"{a.name:<24} {a.description} [{a.licence}]")
        return 0
    if not args.name:
        raise PydetoxError("name an asset to fetch, or pass --list")
    if args.name not in ASSETS and "/" in args.name:
        from pydetox.assets import fetch_hub

        print(fetch_hub(args.name))
        return 0
    print(fetch(args.name, cache=args.cache))
    return 0


def _outputs(args: argparse.Namespace, inputs: list[Any]) -> Outputs:
    """The command's outputs, checked against what it reads (`pydetox.output`)."""
    from pydetox.output import Outputs

    return Outputs(inputs, force=getattr(args, "force", False))


def _cmd_plan_scale(args: argparse.Namespace) -> int:
    from pydetox.plan import EditPlan

    src = Path(args.plan)
    _outputs(args, [src]).claim(args.output, "plan")
    plan = EditPlan.load(src).scaled(args.strength, source=src.name)
    plan.save(args.output)
    print(f"wrote {args.output}: {len(plan.edits)} {plan.method} edits at strength {plan.params['plan_strength']:g}")
    return 0


def _cmd_plan_merge(args: argparse.Namespace) -> int:
    from pydetox.plan import EditPlan

    sources = [Path(p) for p in args.plans]
    _outputs(args, sources).claim(args.output, "plan")
    plan = EditPlan.merged([(p.name, EditPlan.load(p)) for p in sources])
    plan.save(args.output)
    print(f"wrote {args.output}: {plan.method}, {len(plan.edits)} edits of {len(plan.tensors)} tensors")
    return 0


def _cmd_plan_fit(args: argparse.Namespace) -> int:
    from pydetox import ggml
    from pydetox.assets import resolve_model
    from pydetox.fit import fit_strength
    from pydetox.plan import EditPlan
    from pydetox.prompts import load_clean_text

    src = Path(args.plan)
    model = resolve_model(args.model)
    _outputs(args, [src, model]).claim(args.output, "plan")
    plan = EditPlan.load(src)
    documents = load_clean_text(args.clean_text)
    floor = None if args.edited_type.lower() == "none" else ggml.parse_type(args.edited_type)
    fit = fit_strength(plan, model, args.kl, documents, max_tokens=args.tokens, window=args.window, edited_floor=floor,
                       steps=args.steps, max_strength=args.max_strength, threads=args.threads, progress=not args.quiet)
    if fit.strength == 0:
        raise PydetoxError(f"no strength tried keeps KL within {args.kl:g} on {model.name}: "
                           + ", ".join(f"{t.strength:g} -> {t.kl:.4f}" for t in fit.trials))
    fitted = plan.scaled(fit.strength, source=src.name)
    fitted = EditPlan(fitted.arch, fitted.edits, fitted.method, {**fitted.params, "fit": {
        "kl_budget": args.kl, "model": model.name, "clean_text": args.clean_text, "tokens": args.tokens,
        "window": args.window, "edited_type": args.edited_type, "max_strength": args.max_strength,
        "trials": [{"strength": t.strength, "kl": round(t.kl, 5), "perplexity": round(t.perplexity, 3)} for t in fit.trials],
    }}, fitted.model)
    fitted.save(args.output)
    best = fit.best
    assert best is not None
    print(f"wrote {args.output}: strength {fit.strength:g} (KL {best.kl:.4f} <= {args.kl:g} on {args.clean_text}, "
          f"{len(fit.trials)} trials on {model.name})")
    return 0


def _cmd_plan_random(args: argparse.Namespace) -> int:
    from pydetox.assets import resolve_model
    from pydetox.gguf_io import ModelFile
    from pydetox.plan import EditKind, random_plan

    path = resolve_model(args.model)
    _outputs(args, [path]).claim(args.output, "plan")
    with ModelFile(path) as model:
        shapes = [(n, t.shape) for n, t in model.tensors.items() if len(t.ne) == 2 and fnmatch.fnmatchcase(n, args.tensors)]
        arch = model.arch
        name = model.get_str("general.name") or path.name
    if not shapes:
        raise PydetoxError(f"no 2-D tensor of {path} matches {args.tensors!r}")
    plan = random_plan(arch, shapes, EditKind(args.kind), args.rank, args.seed, model=name)
    plan.save(args.output)
    print(f"wrote {args.output}: {len(plan.edits)} {args.kind} edits of rank {args.rank} for {arch}")
    return 0


def _apply_options(args: argparse.Namespace) -> ApplyOptions:
    from pydetox import ggml
    from pydetox.apply import ApplyOptions

    return ApplyOptions(
        ftype=ggml.parse_ftype(args.type) if args.type else None,
        threads=args.threads,
        imatrix=args.imatrix,
        verify=not args.no_verify,
        overwrite=args.force,
        progress=not args.quiet,
        edited_floor=ggml.parse_type(args.edited_type) if args.edited_type else None,
        max_edit=args.max_edit,
    )


def _cmd_apply(args: argparse.Namespace) -> int:
    from pydetox.apply import apply_plan
    from pydetox.assets import resolve_model
    from pydetox.card import card_path, write_card
    from pydetox.plan import EditPlan

    model = resolve_model(args.model)
    outputs = _outputs(args, [args.plan, model, args.imatrix])
    outputs.claim(args.output, "output model")
    outputs.claim(card_path(args.output), "model card")
    if args.report:
        outputs.claim(args.report, "report")  # checked now, not after the work
    options = _apply_options(args)
    plan = None if args.plan == "-" else EditPlan.load(args.plan)
    report = apply_plan(plan, model, args.output, options, plan_path=None if plan is None else args.plan)
    print(report.table())
    if args.report:
        report.write_json(args.report)
    write_card(args.output)
    print(f"wrote {args.output} and its model card {card_path(args.output)}")
    return 0


def _cmd_export_lora(args: argparse.Namespace) -> int:
    from pydetox.assets import resolve_model
    from pydetox.lora import describe, export_lora
    from pydetox.plan import EditPlan

    model = resolve_model(args.model)
    _outputs(args, [args.plan, model]).claim(args.output, "adapter")
    report = export_lora(EditPlan.load(args.plan), model, args.output, dtype=args.outtype, plan_path=args.plan,
                         force=args.force)
    print(describe(report))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from pydetox.gguf_io import ModelFile

    with ModelFile(args.model) as model:
        types: dict[str, int] = {}
        for t in model.tensors.values():
            types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
        info = {
            "path": str(model.path),
            "arch": model.arch,
            "name": model.get_str("general.name"),
            "bytes": model.size,
            "tensors": len(model.tensors),
            "types": types,
            "pydetox": {k: v for k, v in model.metadata.items() if k.startswith("pydetox.")},
        }
    print(json.dumps(info, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pydetox.demo import run_demo

    return run_demo(Path(args.out))


def _overrides(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise PydetoxError(f"--param takes key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _print_params(method: str) -> int:
    import textwrap

    from pydetox.discover.base import get_method, param_docs

    print(f"{method}: --param KEY=VALUE (detox: --param {method}:KEY=VALUE)")
    for d in param_docs(get_method(method)):
        print(f"  {d.name} ({d.type}, default {d.default!r})")
        if d.help:
            print(textwrap.fill(d.help, 100, initial_indent="      ", subsequent_indent="      "))
    return 0


def _cmd_discover(args: argparse.Namespace) -> int:
    from pydetox.assets import resolve_model
    from pydetox.discover import Discovery

    if args.params:
        return _print_params(args.method)
    if not args.model or not args.output:
        raise PydetoxError("discover needs --model and -o/--output (or --params to list the method's parameters)")

    model = resolve_model(args.model) if not Path(args.model).is_dir() else Path(args.model)
    _outputs(args, [model, args.data if Path(args.data).is_file() else None]).claim(args.output, "plan")
    d = Discovery(model, data=args.data, n_pairs=args.pairs, seed=args.seed, progress=not args.quiet, device=args.device)
    plan = d.plan(args.method, _overrides(args.param))
    plan.save(args.output)
    print(f"{args.method}: {len(plan.edits)} edits on {plan.arch}; model load {d.load_s:.1f} s, activations "
          f"{d.activation_s:.1f} s, method {plan.params['method_s']:.2f} s -> {args.output}")
    return 0


DEVICE_ARG: dict[str, Any] = {
    "default": "auto", "choices": ["auto", "cpu", "cuda"],
    "help": "torch device of discovery and calibrator training (default auto: CUDA when torch sees a GPU, else the "
            "CPU; evaluation and apply always run in llama.cpp on the CPU)"}

IGNORE_EOS_HELP = ("ban end-of-text tokens so that every continuation is --max-tokens long (an edit that makes the "
                   "model stop early lowers toxic rates by writing less; this compares at equal length)")


def _cmd_detox(args: argparse.Namespace) -> int:
    from pydetox.assets import resolve_model
    from pydetox.detox import DetoxJob, run
    from pydetox.evaluate import EvalSettings
    from pydetox.recipe import RecipeSettings

    method = args.method if args.method is not None else ("" if args.plan else "distill")
    methods = tuple(m.strip() for m in method.split(",") if m.strip())
    overrides: dict[str, dict[str, str]] = {}
    for item in args.param or []:
        method, _, kv = item.partition(":")
        if not kv:
            raise PydetoxError(f"--param takes method:key=value, got {item!r}")
        overrides.setdefault(method, {}).update(_overrides([kv]))
    job = DetoxJob(
        model=resolve_model(args.model), methods=methods, types=tuple(t.strip() for t in args.types.split(",")),
        out=Path(args.out), overrides=overrides, data=args.data, n_pairs=args.pairs, seed=args.seed,
        plans=tuple(Path(p) for p in args.plan or ()),
        edited_type=None if args.edited_type.lower() == "none" else args.edited_type,
        edit_quantized=args.edit_quantized, calibrator=Path(args.calibrator) if args.calibrator else None,
        alphas=tuple(_alphas(args.alpha)) if args.alpha else (0.2, 0.4),
        eval_settings=EvalSettings(n_prompts=args.limit, ppl_tokens=args.ppl_tokens, seed=args.seed,
                                   ignore_eos=args.ignore_eos),
        force=args.force, recipe=RecipeSettings(device=args.device),
    )
    run(job, progress=not args.quiet)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from pydetox.convert import convert

    _outputs(args, [args.hf_dir]).claim(args.output, "output model")
    print(convert(args.hf_dir, args.output, args.outtype, overwrite=args.force))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pydetox import report as rep
    from pydetox.assets import resolve_model
    from pydetox.evaluate import EvalSettings, run_evaluation
    from pydetox.output import write_text

    settings = EvalSettings(
        prompts=args.prompts, n_prompts=args.limit, samples=args.samples, max_tokens=args.max_tokens,
        temperature=args.temperature if args.samples > 1 or args.temperature else 0.0, top_p=args.top_p,
        seed=args.seed, ignore_eos=args.ignore_eos, evaluators=tuple(args.evaluators.split(",")), clean_text=args.clean_text,
        ppl_tokens=args.ppl_tokens, window=args.window, batch=args.batch, threads=args.threads,
    )
    if settings.samples > 1 and settings.temperature <= 0:
        raise PydetoxError("several samples per prompt need sampling: pass --temperature (e.g. 1.0)")
    files = [Path(f) for f in (args.prompts, args.clean_text, args.calibrator, args.lora) if f and Path(f).is_file()]
    models: list[Any] = [resolve_model(m) for m in args.models]
    reference = resolve_model(args.reference) if args.reference else None
    outputs = _outputs(args, [*models, reference, *files])
    for path, what in ((args.json, "JSON report"), (args.markdown, "markdown table"), (args.plot, "plot")):
        if path:
            outputs.claim(path, what)  # checked now, not after the evaluation
    if args.calibrator:
        from pydetox.evaluate import ModelSpec

        if args.lora:
            raise PydetoxError("--lora and --calibrator together are not supported; evaluate them apart")
        alphas = _alphas(args.alpha)
        models = [ModelSpec(m, Path(args.calibrator), a) for m in models for a in alphas]
    elif args.alpha is not None:
        raise PydetoxError("--alpha needs --calibrator CAL.gguf")
    elif args.lora:
        from pydetox.evaluate import ModelSpec

        # each model as it is and with the adapter, side by side
        models = [spec for m in models for spec in (ModelSpec(m), ModelSpec(m, lora=Path(args.lora),
                                                                            lora_scale=args.lora_scale))]
    report, _ = run_evaluation(models, settings, reference, progress=not args.quiet, include_texts=args.texts)
    print(rep.table(report))
    if args.json:
        write_text(args.json, json.dumps(report, indent=2) + "\n")
    if args.markdown:
        write_text(args.markdown, rep.markdown(report))
    if args.plot:
        rep.plot(report, args.plot)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pydetox.sweep import load_config, run_sweep

    cfg = load_config(args.config)
    report = run_sweep(cfg, address=args.address, progress=not args.quiet)
    print((cfg.out / "sweep.md").read_text(encoding="utf-8"))
    print(f"wrote {cfg.out / 'sweep.json'}, {cfg.out / 'sweep.md'}, {cfg.out / 'pareto.png'} "
          f"({len(report['settings'])} settings, {len(report['pareto'])} on the Pareto front)")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from pydetox.assets import resolve_model
    from pydetox.compare import compare, markdown, terminal
    from pydetox.evaluate import EvalSettings
    from pydetox.output import write_text
    from pydetox.prompts import load_prompts
    from pydetox.scorers import get_scorer

    a, b = resolve_model(args.a), resolve_model(args.b)
    settings = EvalSettings(prompts=args.prompts, n_prompts=args.limit, max_tokens=args.max_tokens,
                            temperature=args.temperature, seed=args.seed, evaluators=tuple(args.evaluators.split(",")))
    files = [Path(args.prompts)] if Path(args.prompts).is_file() else []
    if args.markdown:
        _outputs(args, [a, b, *files]).claim(args.markdown, "markdown")
    prompts = load_prompts(settings.prompts).subset(settings.n_prompts, settings.seed)
    scorers = [get_scorer(n) for n in settings.evaluators]
    diffs = compare(a, b, prompts, scorers, settings, top=args.top, progress=not args.quiet)
    line = (f"{len(prompts.prompts)} prompts of {prompts.name}, {settings.max_tokens} tokens, "
            f"{settings.sampling.describe()}; the {len(diffs)} whose continuations the evaluators score most differently")
    print(terminal(diffs, "A", "B"))
    print(f"\nA = {a.name}, B = {b.name}; {line}")
    if args.markdown:
        write_text(args.markdown, markdown(diffs, a.name, b.name, line))
    return 0


def _alphas(text: str | None) -> list[float]:
    try:
        values = [float(a) for a in (text or "0.4").split(",")]
    except ValueError:
        raise PydetoxError(f"--alpha takes numbers in [0, 1], comma-separated; got {text!r}") from None
    bad = [a for a in values if not 0.0 <= a <= 1.0]
    if bad:
        raise PydetoxError(f"--alpha takes numbers in [0, 1]; got {bad}")
    return values


def _cmd_calibrate_train(args: argparse.Namespace) -> int:
    from pydetox.assets import resolve_model
    from pydetox.calibrate import CalibrateSettings, log_path, plot_path, train
    from pydetox.fusion import alignment_path

    out = Path(args.out)
    model = resolve_model(args.model)
    data = [Path(f) for f in (args.data, args.clean_text) if Path(f).is_file()]
    outputs = _outputs(args, [model, *data])
    for path, what in ((out, "calibrator"), (alignment_path(out), "alignment"), (log_path(out), "training log"),
                       (plot_path(out), "loss plot")):
        outputs.claim(path, what)
    settings = CalibrateSettings(
        layers=args.layers, steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr,
        pairs=args.data, side=args.side, clean_text=args.clean_text, clean_tokens=args.clean_tokens, output_type=args.output_type,
        layer_type=args.layer_type, seed=args.seed, threads=args.threads, objective=args.objective,
        precision=args.precision, restrict_vocab=args.restrict_vocab,
    )
    res = train(model, out, settings, progress=not args.quiet, device=args.device)
    print(f"calibrator  {res.calibrator}\nalignment   {res.alignment}\nlog         {res.log}\nloss plot   {res.plot}")
    print(f"held-out loss {res.val_loss_start:.3f} -> {res.val_loss:.3f} nats/token; {res.seconds:.0f} s")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from pydetox.assets import resolve_model
    from pydetox.chat import chat

    if args.alpha is not None and not args.calibrator:
        raise PydetoxError("--alpha needs --calibrator CAL.gguf")
    alpha = _alphas(args.alpha)[0]
    return chat(resolve_model(args.model), prompt=args.prompt, max_tokens=args.max_tokens,
                temperature=args.temperature, seed=args.seed, n_ctx=args.ctx, calibrator=args.calibrator, alpha=alpha,
                lora=args.lora, lora_scale=args.lora_scale)


def _number(kind: type, test: Any, expected: str) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected  # argparse names the type in its messages
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a whole number >= 1")
_nonnegative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
_positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
_nonnegative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
_unit_interval = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
_strength = _number(float, lambda v: 0 <= v <= 10, "a strength in [0, 10]")


def _add_fetch(sub: Any) -> None:
    f = sub.add_parser("fetch", help="download a named real asset into the cache and print its path")
    f.add_argument("name", nargs="?", help="asset name (see --list), or org/repo:file.gguf on the Hugging Face Hub")
    f.add_argument("--list", action="store_true", help="list the known assets")
    f.add_argument("--cache", help="cache folder (default: $PYDETOX_CACHE or ~/.cache/pydetox)")
    f.set_defaults(func=_cmd_fetch)


def _add_plan(sub: Any) -> None:
    pl = sub.add_parser("plan", help="make edit plans without discovery")
    plsub = pl.add_subparsers(dest="plan_command", required=True)
    r = plsub.add_parser("random", help="a plan of random edits, for tests and benchmarks")
    r.add_argument("--model", required=True, help="GGUF file or asset name the plan is for")
    r.add_argument("--tensors", required=True, help="glob over tensor names, e.g. 'blk.*.ffn_down.weight'")
    r.add_argument("--rank", type=_positive_int, default=8, help="directions per tensor (default 8)")
    r.add_argument("--kind", default="project_out", choices=["project_out", "project_in", "low_rank", "scale_rows", "scale_cols"])
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("-o", "--output", required=True, help="plan file to write")
    r.add_argument("--force", action="store_true", help="replace an existing output file")
    r.set_defaults(func=_cmd_plan_random)
    sc = plsub.add_parser("scale", help="a plan's edits at another strength (0: no change, 1: as discovered)")
    sc.add_argument("plan", help="edit plan file")
    sc.add_argument("--strength", type=_strength, required=True,
                    help="0 leaves the model as it is, 1 is the plan itself; at most 10 (an edit extrapolated tenfold)")
    sc.add_argument("-o", "--output", required=True, help="plan file to write")
    sc.add_argument("--force", action="store_true", help="replace an existing output file")
    sc.set_defaults(func=_cmd_plan_scale)
    mg = plsub.add_parser("merge", help="one plan that makes the changes of several, in order (e.g. distill + wordfilter)")
    mg.add_argument("plans", nargs="+", help="edit plan files, applied in this order where they share a tensor")
    mg.add_argument("-o", "--output", required=True, help="plan file to write")
    mg.add_argument("--force", action="store_true", help="replace an existing output file")
    mg.set_defaults(func=_cmd_plan_merge)
    ft = plsub.add_parser("fit", help="scale a plan to the largest strength within a KL budget on held-out clean text")
    ft.add_argument("plan", help="edit plan file")
    ft.add_argument("--model", required=True, help="the GGUF the plan will be applied to (KL is measured against it)")
    ft.add_argument("--kl", type=_positive_float, required=True, help="budget: mean KL(unedited || edited) in nats/token")
    ft.add_argument("--clean-text", default="wiki", help="wiki (default: as in eval, its first paragraphs, which "
                    "calibrator training and distill skip; evaluation measures on news), news, or a text file")
    ft.add_argument("--tokens", type=_positive_int, default=4096, help="clean-text tokens to measure on (default 4096)")
    ft.add_argument("--window", type=int, default=512)
    ft.add_argument("--edited-type", default="none", help="as apply's --edited-type (default none: types kept)")
    ft.add_argument("--steps", type=_positive_int, default=6, help="most strengths to try (default 6)")
    ft.add_argument("--max-strength", type=_strength, default=1.0, help="strongest scale to try (default 1: the plan "
                    "as discovered; above 1 extrapolates the edit when its KL leaves budget unused)")
    ft.add_argument("--threads", type=int)
    ft.add_argument("--quiet", action="store_true")
    ft.add_argument("-o", "--output", required=True, help="plan file to write")
    ft.add_argument("--force", action="store_true", help="replace an existing output file")
    ft.set_defaults(func=_cmd_plan_fit)


def _add_apply(sub: Any) -> None:
    a = sub.add_parser("apply", help="apply an edit plan to a GGUF and write a new GGUF")
    a.add_argument("plan", help="edit plan file ('-' for none: only requantize)")
    a.add_argument("model", help="input GGUF file or asset name")
    a.add_argument("-o", "--output", required=True, help="output GGUF file")
    a.add_argument("--type", help="requantize the whole model like llama-quantize (Q4_K_M, Q8_0, F16, ...)")
    a.add_argument("--threads", type=_positive_int, help="threads (default: all cores)")
    a.add_argument("--imatrix", help="importance matrix from llama-imatrix (needed by IQ1/IQ2/IQ3_XXS types)")
    a.add_argument("--report", help="write the JSON report here")
    a.add_argument("--no-verify", action="store_true", help="skip the leakage measurement")
    a.add_argument("--edited-type", help="give the edited tensors at least this type's bits (e.g. Q8_0), so that "
                   "low-bit quantization does not round the edit away (with or without --type)")
    a.add_argument("--max-edit", type=_positive_float, default=4.0,
                   help="refuse to write a tensor whose edit ||W_edited - W|| / ||W|| exceeds this (default 4: a "
                   "projection changes a tensor by at most its norm; more comes from a corrupt or over-scaled plan)")
    a.add_argument("--force", action="store_true", help="replace existing output files (never an input)")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=_cmd_apply)


def _add_export_lora(sub: Any) -> None:
    xl = sub.add_parser("export-lora", help="write a plan as a LoRA adapter GGUF that llama.cpp applies at run time")
    xl.add_argument("plan", help="edit plan file")
    xl.add_argument("--model", required=True, help="the GGUF (or asset) the adapter is for: its architecture, shapes "
                    "and, for projections and scalings, its weights")
    xl.add_argument("-o", "--output", required=True, help="adapter GGUF to write")
    xl.add_argument("--outtype", default="F32", choices=["F32", "F16"], help="type of the adapter's matrices (default F32)")
    xl.add_argument("--force", action="store_true", help="replace an existing output file")
    xl.set_defaults(func=_cmd_export_lora)


def _add_info(sub: Any) -> None:
    i = sub.add_parser("info", help="print a GGUF's architecture, tensor types and pydetox provenance as JSON")
    i.add_argument("model")
    i.set_defaults(func=_cmd_info)


def _add_discover(sub: Any) -> None:
    from pydetox.discover import METHODS

    ds = sub.add_parser("discover", help="compute an edit plan with a detox method on a full-precision model")
    ds.add_argument("--method", required=True, choices=sorted(METHODS), metavar="METHOD",
                    help=", ".join(sorted(METHODS)))
    ds.add_argument("--model", help="GGUF file, asset name, HF folder or hub id")
    ds.add_argument("--params", action="store_true", help="list the method's parameters (types, defaults, what they do)")
    ds.add_argument("--data", default="paradetox-3000", help="JSONL of {toxic, neutral} pairs (default: embedded ParaDetox sample)")
    ds.add_argument("--pairs", type=_positive_int, default=500, help="pairs to use (default 500)")
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--param", action="append", help="method parameter key=value (repeatable)")
    ds.add_argument("-o", "--output", help="plan file to write")
    ds.add_argument("--device", **DEVICE_ARG)
    ds.add_argument("--force", action="store_true", help="replace an existing output file")
    ds.add_argument("--quiet", action="store_true")
    ds.set_defaults(func=_cmd_discover)


def _add_detox(sub: Any) -> None:
    from pydetox.discover import METHODS

    dx = sub.add_parser("detox", help="discover, apply at several types, evaluate before/after, report")
    dx.add_argument("--model", default="smollm2-135m-instruct", help="GGUF file or asset name (default: the bundled SmolLM2)")
    dx.add_argument("--method", help=f"one or more of {', '.join(sorted(METHODS))}, comma-separated (default distill: the staged recipe of "
                    "pydetox.recipe; none with --plan)")
    dx.add_argument("--types", default="F16,Q8_0,Q4_K_M", help="types to write and evaluate")
    dx.add_argument("--out", default="pydetox-detox", help="output folder")
    dx.add_argument("--data", default="paradetox-3000")
    dx.add_argument("--pairs", type=_positive_int, default=500)
    dx.add_argument("--seed", type=int, default=0)
    dx.add_argument("--param", action="append", help="method:key=value (repeatable)")
    dx.add_argument("--plan", action="append", help="also apply and evaluate this plan file (repeatable; named by its "
                    "method, or by its file name where two plans share a method)")
    dx.add_argument("--limit", type=_positive_int, default=140, help="RTP challenging prompts to evaluate on (default 140; all: 700)")
    dx.add_argument("--ppl-tokens", type=_nonnegative_int, default=4096)
    dx.add_argument("--ignore-eos", action="store_true", help=IGNORE_EOS_HELP)
    dx.add_argument("--edited-type", default="Q8_0", help="edited tensors keep at least this type's bits at low-bit "
                    "types, so the edit survives quantization (default Q8_0; 'none' = llama.cpp's mix as it is)")
    dx.add_argument("--edit-quantized", action="store_true",
                    help="apply each plan to the unedited model at each type, as a user with a downloaded GGUF would "
                    "(untouched tensors stay byte for byte; edited ones get --edited-type), instead of editing F16 and "
                    "quantizing the result")
    dx.add_argument("--calibrator", help="also evaluate the unedited model fused with this calibrator, at each type")
    dx.add_argument("--alpha", help="fusion weights for --calibrator, comma-separated (default 0.2,0.4)")
    dx.add_argument("--force", action="store_true", help="replace the models and report of an earlier run in --out "
                    "(its cached stages are reused either way)")
    dx.add_argument("--device", **DEVICE_ARG)
    dx.add_argument("--quiet", action="store_true")
    dx.set_defaults(func=_cmd_detox)


def _add_convert(sub: Any) -> None:
    cv = sub.add_parser("convert", help="HF safetensors folder -> GGUF, with llama.cpp's own converter")
    cv.add_argument("hf_dir", help="folder with config.json, *.safetensors and the tokenizer")
    cv.add_argument("-o", "--output", required=True)
    cv.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    cv.add_argument("--force", action="store_true")
    cv.set_defaults(func=_cmd_convert)


def _add_eval(sub: Any) -> None:
    e = sub.add_parser("eval", help="toxicity (several evaluators), perplexity and KL of GGUF models on llama.cpp")
    e.add_argument("models", nargs="+", help="GGUF files or asset names")
    e.add_argument("--prompts", default="rtp-challenging",
                   help="rtp-challenging, rtp-perspective, toxigen-200, or a .txt/.jsonl/.json file")
    e.add_argument("--limit", type=_positive_int, help="use this many prompts (seeded, category-balanced subset)")
    e.add_argument("--samples", type=_positive_int, default=1, help="continuations per prompt (default 1; RTP used 25)")
    e.add_argument("--max-tokens", type=_positive_int, default=20, help="tokens per continuation (default 20)")
    e.add_argument("--ignore-eos", action="store_true", help=IGNORE_EOS_HELP)
    e.add_argument("--temperature", type=_nonnegative_float, default=0.0, help="0 = greedy (default); RTP used 1.0 with top-p 0.9")
    e.add_argument("--top-p", type=_unit_interval, default=0.9, help="in (0, 1] (default 0.9)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--evaluators", default="profanity-check,bilstm,hatesonar",
                   help="comma-separated: profanity-check, bilstm, hatesonar, detoxify, perspective")
    e.add_argument("--reference", help="GGUF to measure KL against (the unedited or full-precision model)")
    e.add_argument("--clean-text", default="news", help="news, wiki, or a text file")
    e.add_argument("--ppl-tokens", type=_nonnegative_int, default=8192, help="clean-text tokens for perplexity/KL (0 = skip)")
    e.add_argument("--window", type=_positive_int, default=512, help="perplexity window in tokens")
    e.add_argument("--batch", type=_positive_int, default=16, help="sequences decoded together")
    e.add_argument("--threads", type=_positive_int)
    e.add_argument("--json", help="write the machine-readable report here")
    e.add_argument("--markdown", help="write a markdown table here")
    e.add_argument("--plot", help="write a toxicity-vs-perplexity (or KL) plot here (.png)")
    e.add_argument("--texts", action="store_true", help="include the continuations in the JSON")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.add_argument("--calibrator", help="fuse each model with this calibration GGUF (pydetox calibrate train)")
    e.add_argument("--alpha", help="fusion weight(s) in [0, 1], comma-separated: one result per value (default 0.4)")
    e.add_argument("--lora", help="also evaluate each model with this LoRA adapter applied at run time (pydetox export-lora)")
    e.add_argument("--lora-scale", type=_nonnegative_float, default=1.0, help="the adapter's scale (default 1: the plan as made)")
    e.add_argument("--force", action="store_true", help="replace existing --json/--markdown/--plot files (never an input)")
    e.set_defaults(func=_cmd_eval)


def _add_compare(sub: Any) -> None:
    cp = sub.add_parser("compare", help="the continuations two models differ on most, side by side, with every evaluator's score")
    cp.add_argument("a", help="first GGUF (e.g. the unedited model)")
    cp.add_argument("b", help="second GGUF (e.g. the edited one)")
    cp.add_argument("--prompts", default="rtp-challenging", help="prompt set or file (as eval)")
    cp.add_argument("--limit", type=_positive_int, default=140, help="prompts to use (default 140)")
    cp.add_argument("--top", type=_positive_int, default=10, help="how many to show (default 10)")
    cp.add_argument("--max-tokens", type=_positive_int, default=20)
    cp.add_argument("--temperature", type=_nonnegative_float, default=0.0, help="0 = greedy (default)")
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--evaluators", default="profanity-check,bilstm,hatesonar")
    cp.add_argument("--markdown", help="also write the table here")
    cp.add_argument("--force", action="store_true", help="replace an existing --markdown file")
    cp.add_argument("--quiet", action="store_true")
    cp.set_defaults(func=_cmd_compare)


def _add_calibrate(sub: Any) -> None:
    cal = sub.add_parser("calibrate", help="calibration-model fusion: train a calibrator for a target GGUF")
    calsub = cal.add_subparsers(dest="calibrate_command", required=True)
    ct = calsub.add_parser("train", help="train a calibrator on non-toxic text and write CAL.gguf + CAL.align.gguf")
    ct.add_argument("--model", default="smollm2-135m-instruct", help="target GGUF file or asset name")
    ct.add_argument("--out", required=True, help="calibrator GGUF to write (alignment, log and loss plot beside it)")
    ct.add_argument("--steps", type=_positive_int, default=400, help="language-modelling steps (default 400)")
    ct.add_argument("--layers", type=_positive_int, default=3, help="transformer layers taken from the target (default 3)")
    ct.add_argument("--batch", type=_positive_int, default=16)
    ct.add_argument("--seq-len", type=_positive_int, default=64)
    ct.add_argument("--lr", type=_positive_float, default=3e-4)
    ct.add_argument("--data", default="paradetox-3000", help="JSONL of {toxic, neutral} pairs; --side says which side is used")
    ct.add_argument("--side", default="neutral", choices=["neutral", "toxic"],
                    help="neutral: a calibrator (default); toxic: an anti-expert for distill's anti= (use --clean-tokens 0)")
    ct.add_argument("--clean-text", default="wiki", help="wiki or a text file (not news: perplexity is measured there)")
    ct.add_argument("--clean-tokens", type=_nonnegative_int, default=300000)
    ct.add_argument("--output-type", default="Q8_0", help="type of the calibrator's output tensor (default Q8_0)")
    ct.add_argument("--layer-type", default="F16",
                    help="type of the trained layers' matrices (default F16: Q8_0 also quantizes their activations)")
    ct.add_argument("--objective", default="fused", choices=["fused", "standalone"],
                    help="fused: train what the calibrator adds to the frozen target (default); standalone: the calibrator alone")
    ct.add_argument("--seed", type=int, default=0)
    ct.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                    help="bfloat16: torch CPU autocast for the forward and backward passes (faster where the CPU has AVX-512 BF16)")
    ct.add_argument("--restrict-vocab", action="store_true",
                    help="train the softmax over the tokens of the training text only (the output layer is most of a step)")
    ct.add_argument("--threads", type=int)
    ct.add_argument("--device", **DEVICE_ARG)
    ct.add_argument("--force", action="store_true", help="replace an existing calibrator")
    ct.add_argument("--quiet", action="store_true")
    ct.set_defaults(func=_cmd_calibrate_train)


def _add_sweep(sub: Any) -> None:
    sw = sub.add_parser("sweep", help="search a method's settings over several seeds: Optuna picks the settings, Ray "
                        "runs the trials; resumable (docs/sweep.md)")
    sw.add_argument("config", help="the sweep's TOML file")
    sw.add_argument("--address", help="a Ray cluster to run on (default: a local Ray instance on this machine)")
    sw.add_argument("--quiet", action="store_true")
    sw.set_defaults(func=_cmd_sweep)


def _add_chat(sub: Any) -> None:
    c = sub.add_parser("chat", help="chat with a GGUF model in the terminal (streams the reply)")
    c.add_argument("model", help="GGUF file or asset name")
    c.add_argument("--prompt", help="one message instead of an interactive session")
    c.add_argument("--max-tokens", type=_positive_int, default=256)
    c.add_argument("--temperature", type=_nonnegative_float, default=0.7)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--ctx", type=_positive_int, default=2048)
    c.add_argument("--calibrator", help="fuse with this calibration GGUF at the output layer")
    c.add_argument("--alpha", help="fusion weight in [0, 1] (default 0.4)")
    c.add_argument("--lora", help="apply this LoRA adapter at run time (pydetox export-lora)")
    c.add_argument("--lora-scale", type=_nonnegative_float, default=1.0)
    c.set_defaults(func=_cmd_chat)


def _add_demo(sub: Any) -> None:
    d = sub.add_parser("demo", help="run the engine end to end on the bundled SmolLM2 model")
    d.add_argument("--out", default="pydetox-demo", help="output folder (default ./pydetox-demo)")
    d.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pydetox", description=__doc__)
    p.add_argument("--version", action="version", version=f"pydetox {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_fetch(sub)
    _add_plan(sub)
    _add_apply(sub)
    _add_export_lora(sub)
    _add_info(sub)
    _add_discover(sub)
    _add_detox(sub)
    _add_convert(sub)
    _add_eval(sub)
    _add_compare(sub)
    _add_calibrate(sub)
    _add_sweep(sub)
    _add_chat(sub)
    _add_demo(sub)
    return p


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM (kill, a scheduler's stop) cleans up like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 refused (a PydetoxError: bad input, an output that would be lost), 130 interrupted."""
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        return int(args.func(args))
    except PydetoxError as exc:
        print(f"pydetox: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # the writers have removed their temporary files on the way out; finished outputs stay
        print("pydetox: interrupted; files being written were removed, finished ones kept", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
