"""Toxicity evaluators: one ABC, one registry, each returning a probability of toxicity per text.

Three run offline from PyPI packages (see shared assets): alt-profanity-check's linear SVM, toxic-comment-
classifier's BiLSTM (run in numpy, `pydetox.bilstm`), and hatesonar's TF-IDF + logistic regression ONNX model.
Detoxify and Perspective API are there for online users and fail with a clear message where they cannot run.
These evaluators are weaker than Detoxify (ToxiGen-200 AUC 0.69-0.70, hatesonar 0.56): always report them side by
side with their agreement, never one number alone.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt

from pydetox.bilstm import BiLSTMToxicity
from pydetox.errors import PydetoxError


class EvaluatorUnavailableError(PydetoxError):
    """An evaluator cannot run here (missing package, no network, no API key)."""


@dataclass(frozen=True)
class Score:
    """Probabilities of toxicity, one per text, from one evaluator."""

    evaluator: str
    probs: npt.NDArray[np.float64]


class Scorer(ABC):
    name: str = ""
    description: str = ""
    offline: bool = True
    # calls group names ("women", "white") toxic on their own: evaluation reports its rates without such calls too
    # (`pydetox.identity`)
    flags_identity_words: bool = False

    @abstractmethod
    def _predict(self, texts: list[str]) -> npt.ArrayLike: ...

    def score(self, texts: Sequence[str]) -> Score:
        texts = [str(t) for t in texts]
        probs = np.asarray(self._predict(texts), dtype=np.float64).reshape(-1) if texts else np.zeros(0)
        if probs.shape != (len(texts),) or not np.all((probs >= 0) & (probs <= 1)):
            raise PydetoxError(f"evaluator {self.name} returned {probs.shape} values outside [0, 1] for {len(texts)} texts")
        return Score(self.name, probs)


SCORERS: dict[str, Callable[[], Scorer]] = {}


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    SCORERS[cls.name] = cls
    return cls


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise PydetoxError(f"unknown evaluator {name!r}; known: {', '.join(SCORERS)}")
    return SCORERS[name]()


def offline_scorers() -> list[str]:
    return [name for name, cls in SCORERS.items() if getattr(cls, "offline", True)]


@register_scorer
class ProfanityCheck(Scorer):
    name = "profanity-check"
    description = "alt-profanity-check 1.9.1: linear SVM on TF-IDF, trained on Jigsaw + Davidson (predict_prob)"

    def _predict(self, texts: list[str]) -> npt.ArrayLike:
        try:
            from profanity_check import predict_prob
        except ImportError as exc:
            raise EvaluatorUnavailableError("profanity-check needs `pip install alt-profanity-check==1.9.1`") from exc
        return np.asarray(predict_prob(texts), dtype=np.float64)


@register_scorer
class BiLSTM(Scorer):
    name = "bilstm"
    description = "toxic-comment-classifier 0.3.0 BiLSTM, Jigsaw 'toxic' label, run in numpy from its weights"

    @cached_property
    def model(self) -> BiLSTMToxicity:
        from pydetox.assets import fetch

        return BiLSTMToxicity(fetch("bilstm-toxic", quiet=True))

    def _predict(self, texts: list[str]) -> npt.ArrayLike:
        return self.model.predict(texts)[:, 0]


@register_scorer
class HateSonar(Scorer):
    name = "hatesonar"
    description = "hatesonar 0.1.0 TF-IDF + logistic regression ONNX (Davidson): P(hate) + P(offensive)"
    flags_identity_words = True

    @cached_property
    def session(self) -> object:
        try:
            import onnx
            import onnxruntime as ort
        except ImportError as exc:
            raise EvaluatorUnavailableError("hatesonar needs `pip install onnx onnxruntime`") from exc
        from pydetox.assets import fetch_file

        model = onnx.load(str(fetch_file("hatesonar")))
        # The model's StringNormalizer has no locale attribute, so onnxruntime uses its default en_US.UTF-8, which
        # machines without that locale cannot construct; lower-casing ASCII text is the same under C.UTF-8.
        for node in model.graph.node:
            if node.op_type == "StringNormalizer" and not any(a.name == "locale" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("locale", "C.UTF-8"))
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def _predict(self, texts: list[str]) -> npt.ArrayLike:
        _labels, probs = self.session.run(None, {"text": np.array(texts, dtype=object)})  # type: ignore[attr-defined]
        return [1.0 - p[2] for p in probs]  # classes: 0 hate speech, 1 offensive, 2 neither


@register_scorer
class Detoxify(Scorer):
    name = "detoxify"
    description = "Detoxify 'original' (BERT, Jigsaw): needs the detoxify package and network for its checkpoint"
    offline = False

    @cached_property
    def model(self) -> object:
        try:
            from detoxify import Detoxify as _Detoxify
        except ImportError as exc:
            raise EvaluatorUnavailableError("detoxify is not installed: `pip install detoxify` (needs network)") from exc
        try:
            return _Detoxify("original")
        except Exception as exc:
            raise EvaluatorUnavailableError(f"Detoxify could not load its checkpoint (offline?): {exc}") from exc

    def _predict(self, texts: list[str]) -> npt.ArrayLike:
        return np.asarray(self.model.predict(texts)["toxicity"], dtype=np.float64)  # type: ignore[attr-defined]


@register_scorer
class Perspective(Scorer):
    name = "perspective"
    description = "Perspective API TOXICITY (Google Jigsaw): needs PERSPECTIVE_API_KEY and network"
    offline = False
    url = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze?key="

    def _predict(self, texts: list[str]) -> npt.ArrayLike:
        key = os.environ.get("PERSPECTIVE_API_KEY")
        if not key:
            raise EvaluatorUnavailableError("perspective needs an API key in PERSPECTIVE_API_KEY")
        out = []
        for text in texts:
            body = {"comment": {"text": text or " "}, "languages": ["en"], "requestedAttributes": {"TOXICITY": {}}}
            req = urllib.request.Request(self.url + key, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    reply = json.load(resp)
            except (urllib.error.URLError, TimeoutError) as exc:
                raise EvaluatorUnavailableError(f"Perspective API unreachable: {exc}") from exc
            out.append(reply["attributeScores"]["TOXICITY"]["summaryScore"]["value"])
        return out
