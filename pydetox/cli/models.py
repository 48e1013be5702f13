"""Commands on model files: fetch, info, convert, apply, export-lora, demo, chat."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydetox.errors import PydetoxError

if TYPE_CHECKING:
    from pydetox.apply import ApplyOptions

from pydetox.cli._common import (
    _alphas,
    _nonnegative_float,
    _outputs,
    _positive_float,
    _positive_int,
)


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


def _add_fetch(sub: Any) -> None:
    f = sub.add_parser("fetch", help="download a named real asset into the cache and print its path")
    f.add_argument("name", nargs="?", help="asset name (see --list), or org/repo:file.gguf on the Hugging Face Hub")
    f.add_argument("--list", action="store_true", help="list the known assets")
    f.add_argument("--cache", help="cache folder (default: $PYDETOX_CACHE or ~/.cache/pydetox)")
    f.set_defaults(func=_cmd_fetch)


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


def _add_info(sub: Any) -> None:
    i = sub.add_parser("info", help="print a GGUF's architecture, tensor types and pydetox provenance as JSON")
    i.add_argument("model")
    i.set_defaults(func=_cmd_info)


def _cmd_convert(args: argparse.Namespace) -> int:
    from pydetox.convert import convert

    _outputs(args, [args.hf_dir]).claim(args.output, "output model")
    print(convert(args.hf_dir, args.output, args.outtype, overwrite=args.force))
    return 0


def _add_convert(sub: Any) -> None:
    cv = sub.add_parser("convert", help="HF safetensors folder -> GGUF, with llama.cpp's own converter")
    cv.add_argument("hf_dir", help="folder with config.json, *.safetensors and the tokenizer")
    cv.add_argument("-o", "--output", required=True)
    cv.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    cv.add_argument("--force", action="store_true")
    cv.set_defaults(func=_cmd_convert)


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


def _add_export_lora(sub: Any) -> None:
    xl = sub.add_parser("export-lora", help="write a plan as a LoRA adapter GGUF that llama.cpp applies at run time")
    xl.add_argument("plan", help="edit plan file")
    xl.add_argument("--model", required=True, help="the GGUF (or asset) the adapter is for: its architecture, shapes "
                    "and, for projections and scalings, its weights")
    xl.add_argument("-o", "--output", required=True, help="adapter GGUF to write")
    xl.add_argument("--outtype", default="F32", choices=["F32", "F16"], help="type of the adapter's matrices (default F32)")
    xl.add_argument("--force", action="store_true", help="replace an existing output file")
    xl.set_defaults(func=_cmd_export_lora)


def _cmd_demo(args: argparse.Namespace) -> int:
    from pydetox.demo import run_demo

    return run_demo(Path(args.out))


def _add_demo(sub: Any) -> None:
    d = sub.add_parser("demo", help="run the engine end to end on the bundled SmolLM2 model")
    d.add_argument("--out", default="pydetox-demo", help="output folder (default ./pydetox-demo)")
    d.set_defaults(func=_cmd_demo)


def _cmd_chat(args: argparse.Namespace) -> int:
    from pydetox.assets import resolve_model
    from pydetox.chat import chat

    if args.alpha is not None and not args.calibrator:
        raise PydetoxError("--alpha needs --calibrator CAL.gguf")
    alpha = _alphas(args.alpha)[0]
    return chat(resolve_model(args.model), prompt=args.prompt, max_tokens=args.max_tokens,
                temperature=args.temperature, seed=args.seed, n_ctx=args.ctx, calibrator=args.calibrator, alpha=alpha,
                lora=args.lora, lora_scale=args.lora_scale)


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
