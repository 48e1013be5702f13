from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
from scipy import stats

from pydetox.badwords import has_listed_word
from pydetox.identity import has_identity_word
from pydetox.metrics import auc, disagreement, identity_calls, listed_calls, sole_calls, spearman, toxicity_stats


def test_toxicity_stats_by_hand() -> None:
    # 3 prompts x 2 samples
    s = np.array([[0.9, 0.1], [0.2, 0.3], [0.6, 0.7]])
    t = toxicity_stats(s, n_boot=500)
    assert t.toxic_rate == pytest.approx(3 / 6)  # 0.9, 0.6, 0.7 are > 0.5
    assert t.expected_max_toxicity == pytest.approx((0.9 + 0.3 + 0.7) / 3)
    assert t.toxicity_probability == pytest.approx(2 / 3)
    assert (t.n_prompts, t.n_samples) == (3, 2)
    for value, (lo, hi) in [(t.toxic_rate, t.ci95), (t.expected_max_toxicity, t.expected_max_toxicity_ci95),
                            (t.toxicity_probability, t.toxicity_probability_ci95)]:
        assert lo <= value <= hi
    # the threshold: exactly 0.5 is not toxic for the rate, but counts for toxicity probability (RTP: >= 0.5)
    edge = toxicity_stats(np.array([[0.5]]), n_boot=10)
    assert (edge.toxic_rate, edge.toxicity_probability) == (0.0, 1.0)


def test_intervals_shrink_with_more_prompts_and_are_seeded() -> None:
    rng = np.random.default_rng(0)
    small = toxicity_stats(rng.uniform(size=(20, 1)), seed=1)
    large = toxicity_stats(rng.uniform(size=(2000, 1)), seed=1)
    assert large.ci95[1] - large.ci95[0] < (small.ci95[1] - small.ci95[0]) / 4
    a = rng.uniform(size=(50, 3))
    assert toxicity_stats(a, seed=7) == toxicity_stats(a, seed=7)
    with pytest.raises(ValueError, match="prompts, samples"):
        toxicity_stats(np.zeros(4))


def test_agreement_and_auc_against_scipy_and_hand() -> None:
    rng = np.random.default_rng(2)
    a = rng.uniform(size=200)
    b = np.round(a + rng.normal(0, 0.2, 200), 1)  # with ties
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert disagreement([0.9, 0.1, 0.6], [0.8, 0.7, 0.2]) == pytest.approx(2 / 3)
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auc([0.5, 0.5], [0, 1]) == 0.5
    with pytest.raises(ValueError, match="both"):
        auc([0.1, 0.2], [1, 1])


def test_sole_calls_by_hand() -> None:
    # text:           0    1    2    3    4
    scores = {"a": [0.9, 0.6, 0.1, 0.5, 0.7],  # 0.5 is not toxic (> 0.5 is)
              "b": [0.8, 0.1, 0.2, 0.9, 0.2],
              "c": [0.1, 0.2, 0.3, 0.6, 0.9]}
    assert sole_calls(scores) == {"a": {"toxic": 3, "alone": 1},  # text 1; 0 with b, 4 with c
                                  "b": {"toxic": 2, "alone": 0},  # 0 with a, 3 with c
                                  "c": {"toxic": 2, "alone": 0}}


def test_listed_calls_by_hand() -> None:
    words = ["fuck", "ass", "two girls one cup", "butt"]
    texts = ["what the fuck", "Fucking hell", "a class act", "two girls one cup", "butter toast", "ASSES", "f*ck off"]
    # inflections count ('fucking', 'asses'); a listed word inside another ('class', 'butter') and a censored
    # spelling do not; phrases match as phrases.
    listed = has_listed_word(texts, words)
    assert listed.tolist() == [True, True, False, True, False, True, False]
    scores = {"a": [0.9, 0.2, 0.8, 0.7, 0.6, 0.4, 0.9], "b": [0.1, 0.9, 0.1, 0.1, 0.1, 0.8, 0.1]}
    assert listed_calls(scores, listed) == {"a": {"toxic": 5, "listed": 2}, "b": {"toxic": 2, "listed": 2}}
    with pytest.raises(ValueError, match="6 texts"):
        listed_calls(scores, listed[:6])


def test_identity_only_calls_by_hand() -> None:
    texts = ["women are people too", "the White House said", "whitewater rafting", "gay rights", "you are an idiot",
             "Muslims and Jews", "black coffee, you moron"]
    # whole words in any case; a word inside another ('whitewater') does not count
    identity = has_identity_word(texts)
    assert identity.tolist() == [True, True, False, True, False, True, True]
    # 7 prompts x 1 sample; "h" flags identity words, "p" flags insults
    scores = {"h": np.array([[0.9], [0.8], [0.7], [0.2], [0.9], [0.6], [0.9]]),
              "p": np.array([[0.1], [0.1], [0.1], [0.1], [0.9], [0.2], [0.8]])}
    out = identity_calls(scores, identity, ["h"], seed=0)
    # h's calls: texts 0, 1, 2, 4, 5, 6; identity-only: 0, 1, 5 (2 has no identity word, 4 and 6 p agrees with)
    assert (out["h"]["toxic"], out["h"]["identity_only"]) == (6, 3)
    assert out["h"]["rest"]["toxic_rate"] == pytest.approx(3 / 7)
    assert out["h"]["rest"] == asdict(toxicity_stats(np.array([[0], [0], [0.7], [0.2], [0.9], [0], [0.9]]), seed=0))
    assert list(out) == ["h"]
    with pytest.raises(ValueError, match="6 texts"):
        identity_calls(scores, identity[:6], ["h"])
