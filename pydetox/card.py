"""Model cards: `MODEL.gguf.md` beside every model `pydetox apply` and `pydetox detox` write, in the Hugging Face
model-card layout (YAML front matter, then prose and tables), so that a model uploaded to a hub says what was done
to it. Every fact is read from the GGUF's own metadata (the pydetox provenance keys apply writes) and, where the
model was evaluated, from the evaluation report; nothing is written that the files do not say."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydetox import keys
from pydetox.gguf_io import ModelFile
from pydetox.output import write_text

LIMITS = [
    "Toxicity is measured by automatic classifiers (named in the table), which miss some toxic text and flag some "
    "harmless text (hatesonar also flags identity words alone); a lower rate is not a guarantee.",
    "The edit is tuned on English text; other languages were not measured.",
    "Perplexity and KL are measured on clean English news text; other abilities may change more than they show.",
]


def card_path(model: str | os.PathLike[str]) -> Path:
    return Path(f"{model}.md")


def _yaml_list(items: list[str]) -> str:
    return "".join(f"\n  - {json.dumps(i)}" for i in items)


def model_card(model: str | os.PathLike[str], evaluation: dict[str, Any] | None = None,
               summary: dict[str, Any] | None = None) -> str:
    """The card's markdown for the GGUF `model`. `evaluation`: the report entry of this model (pydetox.evaluate's
    report_json "models" item) with the report's settings under "settings"; `summary`: its row of detox's summary
    (reductions against the unedited model of the same type)."""
    with ModelFile(model) as m:
        meta = m.metadata
        arch = m.arch
        n_tensors = len(m.tensors)
    method = meta.get(keys.PLAN_METHOD)
    base = meta.get("general.name") or meta.get(keys.SOURCE_NAME) or Path(model).name
    licence = meta.get("general.license")
    tags = ["gguf", arch] + (["detoxified", "pydetox"] if method else ["pydetox"])
    front = ["---", f"base_model: {json.dumps(str(base))}", f"tags:{_yaml_list(tags)}"]
    if isinstance(licence, str) and licence:
        front.append(f"license: {json.dumps(licence)}")
    front += ["quantized_by: pydetox", "library_name: gguf", "---", ""]
    name = Path(model).name
    lines = [f"# {name}", ""]
    if method:
        params = json.loads(meta.get(keys.PLAN_PARAMS) or "{}")
        strength = params.get("plan_strength")
        lines += [f"{base} with its weights edited by [pydetox](https://pypi.org/project/pydetox/) to write less toxic "
                  f"text: method `{method}`" + (f" at strength {strength:g}" if isinstance(strength, int | float) else "")
                  + ".", ""]
    else:
        lines += [f"{base}, unedited (requantized or copied by pydetox).", ""]
    facts = [("architecture", arch), ("tensors", str(n_tensors)), ("type", meta.get(keys.TARGET_TYPE) or "as the source"),
             ("source file", meta.get(keys.SOURCE_NAME)), ("source sha256", meta.get(keys.SOURCE_SHA256)),
             ("edit method", method), ("edit plan sha256", meta.get(keys.PLAN_SHA256)), ("written by", f"pydetox {meta.get(keys.TOOL)}")]
    lines += ["| | |", "|---|---|"] + [f"| {k} | `{v}` |" for k, v in facts if v] + [""]
    if evaluation is not None:
        lines += _evaluation(evaluation, summary)
    else:
        lines += ["Not evaluated here: `pydetox eval " + name + " --reference UNEDITED.gguf` measures toxicity, "
                  "perplexity and KL.", ""]
    lines += ["## Known limits", ""] + [f"- {x}" for x in LIMITS] + [""]
    return "\n".join(front + lines)


def _evaluation(m: dict[str, Any], row: dict[str, Any] | None) -> list[str]:
    s = m.get("settings", {})
    lines = ["## Evaluation", "",
             f"{s.get('n_prompts')} prompts of `{s.get('prompt_set')}`, {s.get('samples', 1)} continuation(s) each of "
             f"{s.get('max_tokens')} tokens, {s.get('decoding')}, seed {s.get('seed')}; perplexity and KL on "
             f"{s.get('ppl_tokens')} tokens of `{s.get('clean_text')}` text, KL against `{Path(str(s.get('reference'))).name}`.",
             "", "| evaluator | toxic rate [95% CI] | unedited | times fewer |", "|---|---|---|---|"]
    for ev, t in m["toxicity"].items():
        lo, hi = t["ci95"]
        base = f"{row[ev + '_base_rate']:.3f}" if row and ev + "_base_rate" in row else "-"
        known = row and ev + "_reduction" in row and row[ev + "_base_rate"] > 0 and t["toxic_rate"] > 0
        less = f"{row[ev + '_reduction']:.2f}" if known else "-"  # (none toxic on either side: no ratio)
        lines.append(f"| {ev} | {t['toxic_rate']:.3f} [{lo:.3f}, {hi:.3f}] | {base} | {less} |")
    for ev, c in m.get("identity", {}).items():  # the evaluator without its calls on group names alone
        t = c["rest"]
        lo, hi = t["ci95"]
        base = f"{row[ev + '_rest_base_rate']:.3f}" if row and ev + "_rest_base_rate" in row else "-"
        known = row and ev + "_rest_reduction" in row and row[ev + "_rest_base_rate"] > 0 and t["toxic_rate"] > 0
        less = f"{row[ev + '_rest_reduction']:.2f}" if known else "-"
        lines.append(f"| {ev} without its {c['identity_only']} identity-only calls | {t['toxic_rate']:.3f} "
                     f"[{lo:.3f}, {hi:.3f}] | {base} | {less} |")
    lines.append("")
    if m.get("perplexity") is not None:
        change = f" ({row['perplexity_change']:+.1%} against the unedited model)" if row else ""
        lines.append(f"Perplexity {m['perplexity']:.2f}{change}; KL {m['kl']:.4f} nats/token.")
    chat = (m.get("helpfulness") or {}).get("chat")
    if chat:
        lines.append(f"Chat check: {chat['correct']} of {chat['questions']} everyday questions answered correctly.")
    lines.append("")
    return lines


def write_card(model: str | os.PathLike[str], evaluation: dict[str, Any] | None = None,
               summary: dict[str, Any] | None = None) -> Path:
    return write_text(card_path(model), model_card(model, evaluation, summary))
