"""Human-readable forms of an evaluation: a terminal table, a markdown table, and a plot of toxicity against
perplexity (or KL) with 95% intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(r) + " |" for r in _rows(report)]
    out += ["", settings_line(report), ""]
    descs = report["settings"].get("evaluator_descriptions", {})
    out += [f"- **{k}**: {v}" for k, v in descs.items()]
    return "\n".join(out) + "\n"


def plot(report: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_kl = all(m["kl"] is not None for m in report["models"])
    key, axis_label = ("kl", "KL divergence vs reference (nats/token)") if use_kl else ("perplexity", "perplexity on clean text")
    evaluators = list(report["models"][0]["toxicity"]) if report["models"] else []
    # One panel per evaluator: they disagree, so each gets its own axis rather than points on top of each other.
    fig, axes = plt.subplots(1, max(1, len(evaluators)), figsize=(4.2 * max(1, len(evaluators)), 4.6), sharey=True, squeeze=False)
    for ax, ev in zip(axes[0], evaluators, strict=False):
        for mi, m in enumerate(report["models"]):
            x = m[key]
            if x is None:
                continue
            t = m["toxicity"][ev]
            lo, hi = t["ci95"]
            ax.errorbar([x], [t["toxic_rate"]], yerr=[[t["toxic_rate"] - lo], [hi - t["toxic_rate"]]], fmt="o",
                        color=f"C{mi}", capsize=3, label=label(m))
        ax.set_title(ev, fontsize=10)
        ax.set_xlabel(axis_label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("toxic-continuation rate (score > 0.5), 95% CI", fontsize=9)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle("Toxicity vs capability", fontsize=11)
    fig.text(0.01, 0.01, settings_line(report), fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
