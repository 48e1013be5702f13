"""toxic-comment-classifier's BiLSTM (Jigsaw's 6 labels) run in numpy from its shipped weights, without TensorFlow.

The package builds Embedding(20000, 50) -> Bidirectional(LSTM(50, return_sequences)) -> GlobalMaxPooling1D ->
Dense(50, relu) -> Dense(6, sigmoid) in Keras (toxic_classifier/model.py) and loads `model.weights.h5`; texts go
through a pickled Keras `Tokenizer` and `pad_sequences(maxlen=100)`. Here the weights are read with h5py, the
tokenizer's state is read with an unpickler that admits only the Tokenizer class (as a plain state holder) and
the standard containers it uses, and the forward pass is written out: Keras LSTM gates are ordered i, f, c, o,
with sigmoid on i/f/o and tanh on c and the output (Keras defaults).
"""

from __future__ import annotations

import collections
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from pydetox.errors import PydetoxError

LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
MAXLEN = 100


class _State:
    """Stands in for keras' Tokenizer while unpickling: keeps its state, runs no code."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class _TokenizerUnpickler(pickle.Unpickler):
    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("builtins", "int"): int,
    }

    def find_class(self, module: str, name: str) -> Any:
        if name == "Tokenizer" and module.startswith("keras"):
            return _State
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise PydetoxError(f"the tokenizer pickle asks for {module}.{name}, which pydetox does not load")


def _sigmoid(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    out: npt.NDArray[np.float32] = 0.5 * (1.0 + np.tanh(0.5 * x))  # numerically safe for large |x|
    return out


class BiLSTMToxicity:
    """Scores texts with the 6 Jigsaw labels; `predict` returns an (n, 6) array of probabilities."""

    def __init__(self, folder: str | Path) -> None:
        import h5py

        folder = Path(folder)
        with open(folder / "tokenizer.pickle", "rb") as f:
            state = _TokenizerUnpickler(f).load().__dict__
        self.word_index: dict[str, int] = state["word_index"]
        self.num_words: int = int(state["num_words"])
        self.lower: bool = bool(state["lower"])
        self.split: str = state["split"]
        self._table = str.maketrans(dict.fromkeys(state["filters"], self.split))
        with h5py.File(folder / "model.weights.h5", "r") as h:
            def w(path: str) -> npt.NDArray[np.float32]:
                return np.asarray(h["layers/" + path], dtype=np.float32)

            self.embedding = w("embedding/vars/0")
            self.fwd = [w(f"bidirectional/forward_layer/cell/vars/{i}") for i in range(3)]
            self.bwd = [w(f"bidirectional/backward_layer/cell/vars/{i}") for i in range(3)]
            self.dense = (w("dense/vars/0"), w("dense/vars/1"))
            self.out = (w("dense_1/vars/0"), w("dense_1/vars/1"))
        self.units = self.fwd[1].shape[0]

    def sequences(self, texts: list[str]) -> npt.NDArray[np.int64]:
        """Keras `texts_to_sequences` + `pad_sequences(maxlen=100)` (padding and truncation at the front)."""
        out = np.zeros((len(texts), MAXLEN), dtype=np.int64)
        for row, text in enumerate(texts):
            if self.lower:
                text = text.lower()
            words = [w for w in text.translate(self._table).split(self.split) if w]
            ids = [i for i in (self.word_index.get(w) for w in words) if i is not None and i < self.num_words]
            ids = ids[-MAXLEN:]
            if ids:
                out[row, MAXLEN - len(ids):] = ids
        return out

    def _lstm(self, x: npt.NDArray[np.float32], weights: list[npt.NDArray[np.float32]]) -> npt.NDArray[np.float32]:
        kernel, recurrent, bias = weights
        n, steps, _ = x.shape
        u = self.units
        xw = x @ kernel + bias  # (n, steps, 4u), all input projections at once
        h = np.zeros((n, u), np.float32)
        c = np.zeros((n, u), np.float32)
        hs = np.empty((n, steps, u), np.float32)
        for t in range(steps):
            z = xw[:, t] + h @ recurrent
            i, f, g, o = _sigmoid(z[:, :u]), _sigmoid(z[:, u : 2 * u]), np.tanh(z[:, 2 * u : 3 * u]), _sigmoid(z[:, 3 * u :])
            c = f * c + i * g
            h = o * np.tanh(c)
            hs[:, t] = h
        return hs

    def predict(self, texts: list[str], batch: int = 256) -> npt.NDArray[np.float32]:
        results = []
        for start in range(0, len(texts), batch):
            seq = self.sequences(texts[start : start + batch])
            x = self.embedding[seq]
            forward = self._lstm(x, self.fwd)
            backward = self._lstm(x[:, ::-1], self.bwd)[:, ::-1]
            pooled = np.concatenate([forward, backward], axis=-1).max(axis=1)
            hidden = np.maximum(pooled @ self.dense[0] + self.dense[1], 0.0)
            results.append(_sigmoid(hidden @ self.out[0] + self.out[1]))
        return np.concatenate(results) if results else np.zeros((0, len(LABELS)), np.float32)
