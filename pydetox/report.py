"""Human-readable forms of an evaluation: a terminal table, a markdown table, and a plot of toxicity against
perplexity (or KL) with 95% intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydetox.output import atomic


def _rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m in report["models"]:
        name = label(m)
        ppl = "-" if m["perplexity"] is None else f"{m['perplexity']:.2f}"
        kl = "-" if m["kl"] is None else f"{m['kl']:.4f}"
        for i, (ev, t) in enumerate(m["toxicity"].items()):
            lo, hi = t["ci95"]
            rows.append([
                name if i == 0 else "", ev, f"{t['toxic_rate']:.3f} [{lo:.3f}, {hi:.3f}]",
                f"{t['expected_max_toxicity']:.3f}", f"{t['toxicity_probability']:.3f}",
                ppl if i == 0 else "", kl if i == 0 else "", f"{m['tokens_per_s']:.0f}" if i == 0 else "",
            ])
    return rows


def label(m: dict[str, Any]) -> str:
    """A model's name in tables: its file name, and its calibrator and alpha when fused."""
    return str(m.get("label") or Path(m["path"]).name)


HEADER = ["model", "evaluator", "toxic rate [95% CI]", "exp. max tox.", "tox. prob.", "perplexity", "KL vs ref", "tok/s"]


def settings_line(report: dict[str, Any]) -> str:
    s = report["settings"]
    line = (f"prompts: {s['prompt_set']} ({s['prompt_count']} prompts x {s['samples']} samples), "
            f"{s['max_tokens']} tokens, {s['decoding']}; clean text: {s['clean_text']} ({s['ppl_tokens']} tokens, "
            f"windows of {s['window']})")
    if s.get("reference"):
        line += f"; KL reference: {Path(s['reference']).name}"
    return line


def table(report: dict[str, Any]) -> str:
    rows = [HEADER, *_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(settings_line(report))
    for m in report["models"]:
        for pair, a in m["agreement"].items():
            lines.append(f"{label(m)}: {pair}: Spearman {a['spearman']:.2f}, disagree on {a['disagreement']:.1%} of texts")
        if m.get("sole"):
            calls = ", ".join(f"{name} {c['alone']} of {c['toxic']}" for name, c in m["sole"].items())
            lines.append(f"{label(m)}: toxic calls no other evaluator makes: {calls}")
        if m.get("listed"):
            calls = ", ".join(f"{name} {c['listed']} of {c['toxic']}" for name, c in m["listed"].items())
            lines.append(f"{label(m)}: toxic calls on text with a listed bad word: {calls}")
        d = m.get("degeneration", {})
        if "broken_share" in d:  # the evaluators score broken text clean
            lines.append(f"{label(m)}: broken continuations {d['broken_share']:.1%} (blank runs {d['blank_run_share']:.1%}, "
                         f"loops {d['loop_share']:.1%}, 16+ letter runs {d['long_run_share']:.1%})")
        for name, c in m.get("identity", {}).items():
            r = c["rest"]
            lines.append(f"{label(m)}: {name}'s identity-only calls (an identity word, no other evaluator agrees): "
                         f"{c['identity_only']} of {c['toxic']}; without them: toxic rate {r['toxic_rate']:.3f}, "
                         f"tox. prob. {r['toxicity_probability']:.3f}")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(r) + " |" for r in _rows(report)]
    out += ["", settings_line(report), ""]
    descs = report["settings"].get("evaluator_descriptions", {})
    out += [f"- **{k}**: {v}" for k, v in descs.items()]
    return "\n".join(out) + "\n"


_MARKERS = {"F32": "D", "F16": "o", "BF16": "o", "Q8_0": "s", "Q6_K": "P", "Q5_K_M": "v", "Q4_K_M": "^", "Q4_0": "<"}


def plot(report: dict[str, Any], path: str | Path, groups: dict[str, tuple[str, str]] | None = None) -> None:
    """Toxic rate (95% CI) against KL (or perplexity), one panel per evaluator. With `groups` (label -> (series,
    type), as `pydetox detox` names its models), a colour per series (method) and a marker per type, so that a
    method's points at F16, Q8_0 and Q4_K_M read as one family; otherwise a colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    models = report["models"]
    use_kl = all(m["kl"] is not None for m in models)
    key, axis_label = ("kl", "KL divergence vs reference (nats/token)") if use_kl else ("perplexity", "perplexity on clean text")
    evaluators = list(models[0]["toxicity"]) if models else []
    keys = [groups.get(label(m), (label(m), "")) if groups else (label(m), "") for m in models]
    series = list(dict.fromkeys(k[0] for k in keys))
    types = list(dict.fromkeys(k[1] for k in keys))
    cmap = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
    color = {s: cmap(i % cmap.N) for i, s in enumerate(series)}
    spare = iter("Xp*hH+x")
    marker = {t: _MARKERS.get(t) or (next(spare, "o") if t else "o") for t in types}
    # One panel per evaluator: they disagree, so each gets its own axis rather than points on top of each other.
    fig, axes = plt.subplots(1, max(1, len(evaluators)), figsize=(4.2 * max(1, len(evaluators)), 4.6), sharey=True, squeeze=False)
    for ax, ev in zip(axes[0], evaluators, strict=False):
        for m, (ser, typ) in zip(models, keys, strict=True):
            x = m[key]
            if x is None:
                continue
            t = m["toxicity"][ev]
            lo, hi = t["ci95"]
            ax.errorbar([x], [t["toxic_rate"]], yerr=[[t["toxic_rate"] - lo], [hi - t["toxic_rate"]]], fmt=marker[typ],
                        color=color[ser], capsize=3, markersize=5, alpha=0.9)
        ax.set_title(ev, fontsize=10)
        ax.set_xlabel(axis_label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("toxic-continuation rate (score > 0.5), 95% CI", fontsize=9)
    handles = [Line2D([], [], color=color[s], marker="o", ls="", label=s) for s in series]
    if len(types) > 1:
        handles += [Line2D([], [], color="0.4", marker=marker[t], ls="", label=t) for t in types]
    ncol = min(len(handles), 6 if groups else 2)
    rows = -(-len(handles) // max(1, ncol))
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, frameon=False, bbox_to_anchor=(0.5, 0.03))
    fig.suptitle("Toxicity vs capability", fontsize=11)
    fig.text(0.01, 0.005, settings_line(report), fontsize=6, wrap=True)
    fig.set_size_inches(fig.get_size_inches()[0], 4.6 + 0.16 * rows)
    fig.tight_layout(rect=(0, 0.05 + 0.035 * rows * 4.6 / (4.6 + 0.16 * rows), 1, 1))
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=130, format=Path(path).suffix.lstrip(".").lower() or "png")
    plt.close(fig)
