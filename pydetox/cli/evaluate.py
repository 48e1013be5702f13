"""Evaluation commands: eval, compare."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydetox.errors import PydetoxError

if TYPE_CHECKING:
    pass

from pydetox.cli._common import (
    IGNORE_EOS_HELP,
    _alphas,
    _nonnegative_float,
    _nonnegative_int,
    _outputs,
    _positive_int,
    _unit_interval,
)


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
    e.add_argument("--clean-text", default="news", help="news, news-held-out, wiki, or a text file")
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
