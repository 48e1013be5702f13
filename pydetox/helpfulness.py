"""What a detox edit must not take away, measured on llama.cpp beside toxicity: answers to benign prompts and chat.

Perplexity and KL on clean prose do not see an edited model that stops early or answers "Cities, I have no idea."
to "What is the capital of France?". Two checks, both greedy:

- **Benign length**: sentence starts from clean news text (the first half, in words, of each `news` document's first
  sentence; no toxic content), continued for `max_tokens` tokens: the mean continuation length and the share that
  stop before the limit. An edit that makes the model end its sentences early lowers toxic rates by writing less.
- **Chat check**: everyday questions with checkable answers (facts, small arithmetic, simple instructions; written for
  this project, `pydetox/data/chat-check.jsonl`), asked in the model's own chat template (the GGUF's
  `tokenizer.chat_template`; a model without one is asked "Question: ...\\nAnswer:"), each answer scored correct when
  it contains one of the accepted answers as a whole word (case-insensitive). The answers' length is reported too.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from pydetox.metrics import degeneration
from pydetox.runtime import LlamaRuntime, Sampling


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]
    kind: str

    def correct(self, reply: str) -> bool:
        return any(re.search(rf"(?<![A-Za-z0-9]){re.escape(a)}(?![A-Za-z0-9])", reply, re.IGNORECASE) for a in self.answers)


def chat_questions() -> list[Question]:
    text = resources.files("pydetox.data").joinpath("chat-check.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [Question(r["question"], tuple(r["answers"]), r["kind"]) for r in rows]


def benign_starts(limit: int = 100) -> list[str]:
    """The first half (in words) of the first sentence of the first `limit` `news` documents with one of 8+ words."""
    from pydetox.prompts import load_clean_text

    out = []
    for doc in load_clean_text("news"):
        words = re.split(r"(?<=[.!?])\s+", doc.strip())[0].split()
        if len(words) >= 8:
            out.append(" ".join(words[: len(words) // 2]))
        if len(out) == limit:
            break
    return out


def chat_prompt(template: str | None, question: str) -> str:
    if not template:
        return f"Question: {question}\nAnswer:"
    import jinja2

    env = jinja2.Environment(autoescape=False)  # the template writes a prompt, not HTML
    return env.from_string(template).render(messages=[{"role": "user", "content": question}], add_generation_prompt=True,
                                            bos_token="", eos_token="")


@dataclass
class LengthStats:
    prompts: int
    max_tokens: int
    mean_tokens: float
    early_stop_share: float  # continuations that ended before max_tokens


def _lengths(lengths: list[int], max_tokens: int) -> LengthStats:
    n = max(1, len(lengths))
    return LengthStats(len(lengths), max_tokens, sum(lengths) / n, sum(x < max_tokens for x in lengths) / n)


def _generate(rt: LlamaRuntime, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    out: list[list[int]] = []
    for s in range(0, len(prompts), rt.n_seq):
        wave = prompts[s : s + rt.n_seq]
        out += rt.generate(wave, max_tokens, Sampling(0.0), [0] * len(wave))
    return out


def helpfulness(rt: LlamaRuntime, template: str | None, benign: list[str], questions: list[Question],
                benign_tokens: int = 20, answer_tokens: int = 32) -> dict[str, Any]:
    """Both checks on one runtime (its context must hold n_seq x (longest prompt + tokens))."""
    result: dict[str, Any] = {}
    if benign:
        gen = _generate(rt, [rt.tokenize(p) for p in benign], benign_tokens)
        result["benign"] = {**asdict(_lengths([len(g) for g in gen], benign_tokens)),
                            "broken_share": degeneration([[rt.detokenize(g) for g in gen]])["broken_share"]}
    if questions:
        prompts = [rt.tokenize(chat_prompt(template, q.question), special=True) for q in questions]
        gen = _generate(rt, prompts, answer_tokens)
        replies = [rt.detokenize(g) for g in gen]
        right = [q.correct(r) for q, r in zip(questions, replies, strict=True)]
        result["chat"] = {**asdict(_lengths([len(g) for g in gen], answer_tokens)),
                          "accuracy": sum(right) / len(right), "correct": sum(right), "questions": len(right),
                          "template": "model" if template else "plain",
                          "answers": [{"question": q.question, "reply": r, "correct": c}
                                      for q, r, c in zip(questions, replies, right, strict=True)]}
    return result
