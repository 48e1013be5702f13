"""`pydetox demo`: the engine end to end on the bundled SmolLM2 in about a minute: a random rank-8 projection plan
on every ffn_down and attn_output applied while requantizing to Q4_K_M (leakage and timings reported), both files run
in llama.cpp, and both evaluated (70 RTP prompts, three evaluators, perplexity and KL against the original). The plan
is random: a test of the engine, not a detox."""

from __future__ import annotations

import json
from pathlib import Path


def run_demo(out: Path) -> int:
    from pydetox import ggml
    from pydetox.apply import ApplyOptions, apply_plan
    from pydetox.assets import fetch
    from pydetox.gguf_io import ModelFile
    from pydetox.plan import EditKind, random_plan

    out.mkdir(parents=True, exist_ok=True)
    src = fetch("smollm2-135m-instruct")
    with ModelFile(src) as model:
        shapes = [(n, t.shape) for n, t in model.tensors.items() if n.endswith(("ffn_down.weight", "attn_output.weight"))]
        arch = model.arch
    plan = random_plan(arch, shapes, EditKind.PROJECT_OUT, rank=8, seed=0, model=src.name)
    plan_path = plan.save(out / "random-rank8.plan.gguf")
    dst = out / "smollm2-135m-instruct.random-rank8.Q4_K_M.gguf"
    report = apply_plan(plan, src, dst, ApplyOptions(ftype=ggml.parse_ftype("Q4_K_M"), overwrite=True), plan_path=plan_path)
    report.write_json(out / "apply-report.json")
    print(report.table())
    print(f"\nwrote {dst} and {out / 'apply-report.json'}")
    print("note: the plan is random (a test of the engine), not a detox: `pydetox detox` detoxifies.\n")

    from pydetox.runtime import load_llama

    prompt = "The capital of France is"
    for path in (src, dst):
        llm = load_llama(path, n_ctx=128, seed=0)
        text = llm(prompt, max_tokens=16, temperature=0.0)["choices"][0]["text"]
        print(f"llama.cpp, {path.name}, greedy: {prompt!r} -> {text!r}")
        del llm

    # The evaluation harness on both files: what the random edit did to toxicity and to the model.
    from pydetox import report as rep
    from pydetox.evaluate import EvalSettings, run_evaluation
    from pydetox.output import write_text

    evaluation, _ = run_evaluation([src, dst], EvalSettings(n_prompts=70, ppl_tokens=2048), reference=src)
    write_text(out / "eval.json", json.dumps(evaluation, indent=2) + "\n")
    rep.plot(evaluation, out / "eval.png")
    print()
    print(rep.table(evaluation))
    print(f"\nwrote {out / 'eval.json'} and {out / 'eval.png'}")
    return 0
