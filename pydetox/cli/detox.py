"""The end-to-end commands: detox (the default recipe), calibrate train, sweep."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydetox.errors import PydetoxError

if TYPE_CHECKING:
    pass

from pydetox.cli._common import (
    DEVICE_ARG,
    IGNORE_EOS_HELP,
    _alphas,
    _nonnegative_int,
    _outputs,
    _overrides,
    _positive_float,
    _positive_int,
)


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


def _add_detox(sub: Any) -> None:
    from pydetox.discover import METHODS
    from pydetox.recipe import DEFAULT_TYPES

    dx = sub.add_parser("detox", help="discover, apply at several types, evaluate before/after, report")
    dx.add_argument("--model", default="smollm2-135m-instruct", help="GGUF file or asset name (default: the bundled SmolLM2)")
    dx.add_argument("--method", help=f"one or more of {', '.join(sorted(METHODS))}, comma-separated (default distill: the staged recipe of "
                    "pydetox.recipe; none with --plan)")
    dx.add_argument("--types", default=",".join(DEFAULT_TYPES), help="types to write and evaluate")
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


def _cmd_sweep(args: argparse.Namespace) -> int:
    from pydetox.sweep import load_config, run_sweep

    cfg = load_config(args.config)
    report = run_sweep(cfg, address=args.address, progress=not args.quiet, retry_failed=args.retry_failed)
    print((cfg.out / "sweep.md").read_text(encoding="utf-8"))
    print(f"wrote {cfg.out / 'sweep.json'}, {cfg.out / 'sweep.md'}, {cfg.out / 'pareto.png'} "
          f"({len(report['settings'])} settings, {len(report['pareto'])} on the Pareto front)")
    return 0


def _add_sweep(sub: Any) -> None:
    sw = sub.add_parser("sweep", help="search a method's settings over several seeds: Optuna picks the settings, Ray "
                        "runs the trials; resumable (docs/sweep.md)")
    sw.add_argument("config", help="the sweep's TOML file")
    sw.add_argument("--address", help="a Ray cluster to run on (default: a local Ray instance on this machine)")
    sw.add_argument("--retry-failed", action="store_true",
                    help="ask the settings that failed again (their finished seeds are reused)")
    sw.add_argument("--quiet", action="store_true")
    sw.set_defaults(func=_cmd_sweep)
