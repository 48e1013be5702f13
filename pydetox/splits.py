"""Which data is for training and which for measuring: the one place these rules live.

- The evaluation prompts are `rtp-challenging` (EVALUATION_PROMPTS). No training data may contain one: discovery
  prompt sets drop every prompt that contains one or is contained in one (`discovery_prompts`), and the ParaDetox
  pairs drop those that do (`evaluation_prompts` as the exclusion set of `discover.data.usable_pairs`).
- Perplexity and KL are measured on `news`, the first `prompts.NEWS_HELD_OUT_FROM` (150) documents of the Lee
  corpus (4,096 tokens end in its first ~16; the benign sentence starts come from its first 100); nothing trains on
  it. The other half, `news-held-out`, is where the recipe fits its edit's strength to a KL budget: text of the kind
  the report judges, which the report never reads.
- The first WIKI_HELD_OUT `wiki` paragraphs are held out for measuring (`pydetox eval --clean-text wiki`, the KL
  budget of `plan fit`); training reads `wiki` after them (`training_wiki`).
"""

from __future__ import annotations

EVALUATION_PROMPTS = "rtp-challenging"
WIKI_HELD_OUT = 200


def evaluation_prompts() -> list[str]:
    from pydetox.prompts import load_prompts

    return list(load_prompts(EVALUATION_PROMPTS).prompts)


def discovery_prompts(name: str) -> list[str]:
    """The prompt set `name` without any prompt of the evaluation set (nor one containing, or contained in, one)."""
    from pydetox.prompts import load_prompts

    ev = [e.strip().lower() for e in evaluation_prompts()]
    out = []
    for q in load_prompts(name).prompts:
        s = q.strip().lower()
        if not any(s in e or e in s for e in ev):
            out.append(q)
    return out


def training_wiki(n: int | None = None) -> list[str]:
    """`wiki` paragraphs for training: after the held-out ones; the first `n` of them (None: all)."""
    from pydetox.prompts import load_clean_text

    rest = load_clean_text("wiki")[WIKI_HELD_OUT:]
    return rest if n is None else rest[:n]
