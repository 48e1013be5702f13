"""The helpfulness checks' scoring, prompts and data (pydetox.helpfulness); the checks on a real model run in
tests/test_real_model.py and in every `pydetox eval` / `pydetox detox` report."""

from __future__ import annotations

from pydetox.helpfulness import Question, benign_starts, chat_prompt, chat_questions


def test_an_answer_counts_only_as_a_whole_word() -> None:
    q = Question("What is the capital of France?", ("Paris",), "fact")
    assert q.correct("The capital of France is Paris.")
    assert q.correct("paris")
    assert not q.correct("Parisian cafes are nice.")
    assert not q.correct("Cities, I have no idea.")
    sums = Question("What is 6 times 7?", ("42",), "arithmetic")
    assert sums.correct("6 times 7 is 42")
    assert not sums.correct("6 times 7 is 420")


def test_the_embedded_questions_are_many_checkable_and_distinct() -> None:
    qs = chat_questions()
    assert len(qs) >= 100
    assert len({q.question for q in qs}) == len(qs)
    assert {q.kind for q in qs} == {"fact", "arithmetic", "instruction"}
    assert all(q.answers and all(a.strip() for a in q.answers) for q in qs)
    # no question is answered by its own wording (an answer echoed from the question would count as right), except
    # the instructions to repeat a word or sentence
    echo = [q.question for q in qs if q.correct(q.question)]
    assert echo
    assert all(q.startswith(("Reply with only", "Say the word", "Repeat after me")) for q in echo)


def test_chat_prompt_uses_the_models_template_and_falls_back_to_plain() -> None:
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert chat_prompt(template, "Hi?") == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt(None, "Hi?") == "Question: Hi?\nAnswer:"


def test_benign_starts_are_half_sentences_of_clean_news() -> None:
    starts = benign_starts(50)
    assert len(starts) == 50
    assert all(3 <= len(s.split()) <= 40 for s in starts)
    assert len(set(starts)) == len(starts)
