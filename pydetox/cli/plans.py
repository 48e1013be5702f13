"""Commands that make edit plans: plan scale / merge / fit / random, discover."""

from __future__ import annotations

import argparse
import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydetox.errors import PydetoxError

if TYPE_CHECKING:
    pass

from pydetox.cli._common import (
    DEVICE_ARG,
    _outputs,
    _overrides,
    _positive_float,
    _positive_int,
    _strength,
)


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
                       steps=args.steps, max_strength=args.max_strength, threads=args.threads,
                       ftype=ggml.parse_ftype(args.type) if args.type else None, progress=not args.quiet)
    if fit.strength == 0:
        raise PydetoxError(f"no strength tried keeps KL within {args.kl:g} on {model.name}: "
                           + ", ".join(f"{t.strength:g} -> {t.kl:.4f}" for t in fit.trials))
    fitted = plan.scaled(fit.strength, source=src.name)
    fitted = EditPlan(fitted.arch, fitted.edits, fitted.method, {**fitted.params, "fit": {
        "kl_budget": args.kl, "model": model.name, "clean_text": args.clean_text, "tokens": args.tokens,
        "window": args.window, "edited_type": args.edited_type, "max_strength": args.max_strength,
        "model_type": args.type,
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
                    "calibrator training and distill skip), news-held-out (the news documents evaluation does not "
                    "read; the recipe's default), news (where evaluation measures), or a text file")
    ft.add_argument("--tokens", type=_positive_int, default=4096, help="clean-text tokens to measure on (default 4096)")
    ft.add_argument("--window", type=int, default=512)
    ft.add_argument("--edited-type", default="none", help="as apply's --edited-type (default none: types kept)")
    ft.add_argument("--type", help="measure at this model type (as apply's --type: each trial applied with it, against "
                    "the unedited model converted to it); default: the model's own types")
    ft.add_argument("--steps", type=_positive_int, default=6, help="most strengths to try (default 6)")
    ft.add_argument("--max-strength", type=_strength, default=1.0, help="strongest scale to try (default 1: the plan "
                    "as discovered; above 1 extrapolates the edit when its KL leaves budget unused)")
    ft.add_argument("--threads", type=int)
    ft.add_argument("--quiet", action="store_true")
    ft.add_argument("-o", "--output", required=True, help="plan file to write")
    ft.add_argument("--force", action="store_true", help="replace an existing output file")
    ft.set_defaults(func=_cmd_plan_fit)


def _print_params(method: str) -> int:
    import textwrap

    from pydetox.discover.base import get_method, param_docs

    print(f"{method}: --param KEY=VALUE (detox: --param {method}:KEY=VALUE)")
    m = get_method(method)
    for d in param_docs(m):
        print(f"  {d.name} ({d.type}, default {d.default!r})")
        if d.help:
            print(textwrap.fill(d.help, 100, initial_indent="      ", subsequent_indent="      "))
    for arch, values in sorted(m.arch_defaults.items()):
        print(f"  default on {arch} sources: " + " ".join(f"{k}={v}" for k, v in values.items()))
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
