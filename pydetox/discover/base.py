"""The contract every detox method follows: activations and weights in, edits out; one registry of methods."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from pydetox.badwords import badword_forms
from pydetox.discover.activations import Activations
from pydetox.discover.data import DiscoveryData
from pydetox.discover.model import FullPrecisionModel
from pydetox.errors import PydetoxError
from pydetox.plan import Edit


class Context:
    """What a method may look at: the model, the data, and activations on both sides of the data. `toxic` and
    `neutral` may be given as zero-argument callables: they are then computed on first use, so that methods that never
    look at them (distill, unlikelihood, wordfilter) do not pay for them."""

    def __init__(self, fp: FullPrecisionModel, data: DiscoveryData, toxic: Activations | Callable[[], Activations],
                 neutral: Activations | Callable[[], Activations], badwords: list[str], progress: bool = True) -> None:
        self.fp, self.data, self.badwords = fp, data, badwords
        self.progress = progress  # progress bars for methods with long steps
        self._toxic, self._neutral = toxic, neutral

    @property
    def toxic(self) -> Activations:
        if callable(self._toxic):
            self._toxic = self._toxic()
        return self._toxic

    @property
    def neutral(self) -> Activations:
        if callable(self._neutral):
            self._neutral = self._neutral()
        return self._neutral

    def down_weight(self, layer: int) -> npt.NDArray[np.float32]:
        """(d_model, d_ff) float32 copy of a layer's FFN down-projection."""
        out: npt.NDArray[np.float32] = self.fp.down_proj(layer).weight.detach().numpy().astype(np.float32)
        return out


class Method(ABC):
    name: ClassVar[str]
    paper: ClassVar[str]
    Params: ClassVar[type]
    # torch devices the method's code runs on; on any other the model is moved to the CPU for it (see Discovery.plan)
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    # parameter overrides (strings, as `--params` gives them) for a source of one architecture (its GGUF
    # `general.architecture`), under what a run sets itself: what a method's defaults, tuned on one model, need elsewhere
    arch_defaults: ClassVar[dict[str, dict[str, str]]] = {}

    @abstractmethod
    def edits(self, ctx: Context, params: Any) -> tuple[list[Edit], dict[str, Any]]:
        """The edits, and diagnostics worth keeping in the plan's parameters."""


METHODS: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise PydetoxError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


@dataclass(frozen=True)
class ParamDoc:
    name: str
    type: str
    default: Any
    help: str


def param_docs(method: Method) -> list[ParamDoc]:
    """Every `--param` key of `method`: its type, default and the comment the Params class gives it (the comment
    lines just above the field and the one at the end of its line, read from the source, so the help cannot drift
    from the code)."""
    import inspect
    import re

    try:
        lines = inspect.getsource(method.Params).splitlines()
    except (OSError, TypeError):
        lines = []
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("#").strip())
            continue
        m = re.match(r"(\w+)\s*:[^=]*=.*?(?:#\s*(.*))?$", text)
        if m:
            comments[m.group(1)] = " ".join([*above, m.group(2) or ""]).strip()
        above = []
    return [ParamDoc(f.name, str(f.type), getattr(method.Params(), f.name), comments.get(f.name, ""))
            for f in fields(method.Params)]


def make_params(method: Method, overrides: dict[str, str]) -> Any:
    """The method's parameter dataclass with `key=value` overrides, values converted to the field's type."""
    return override(method.Params(), overrides, method.name)


# how a command line spells a yes or a no; anything else is refused rather than read as no
BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def override(defaults: Any, overrides: dict[str, str], owner: str) -> Any:
    """A copy of the dataclass instance `defaults` with `key=value` overrides (strings, as the command line gives
    them), each converted to its field's type."""
    import dataclasses

    known = {f.name: f for f in fields(defaults)}
    values: dict[str, Any] = {}
    for key, raw in overrides.items():
        if key not in known:
            raise PydetoxError(f"{owner} has no parameter {key!r}; it has: {', '.join(known)}")
        default = getattr(defaults, key)
        try:
            if isinstance(default, bool):
                flag = BOOL_WORDS.get(raw.lower())
                if flag is None:
                    raise ValueError(raw)
                values[key] = flag
            elif isinstance(default, tuple):
                values[key] = tuple(int(x) for x in raw.split(",") if x)
            elif default is None:
                values[key] = int(raw)
            else:
                values[key] = type(default)(raw)
        except ValueError as exc:
            kind = "bool (1 or 0)" if isinstance(default, bool) else type(default).__name__
            raise PydetoxError(f"{owner}.{key}: cannot read {raw!r} as {kind}") from exc
    return dataclasses.replace(defaults, **values)


def massive_dims(ctx: Context, factor: float = 20.0) -> npt.NDArray[np.int64]:
    """Residual-stream channels with "massive activations" (Sun et al., 2024): mean |activation| over the neutral
    texts more than `factor` times the median channel in some layer. They dominate any raw difference of hidden
    states (dims 247, 507, 17 on SmolLM2) and must not be projected out: removing them breaks the model."""
    dims: set[int] = set()
    for layer in ctx.neutral.residual_mean:
        mag = np.abs(layer).mean(axis=0)
        dims |= set(np.flatnonzero(mag > factor * np.median(mag)).tolist())
    return np.array(sorted(dims), dtype=np.int64)


def token_strings(ctx: Context) -> list[str]:
    tok = ctx.fp.tokenizer
    return [tok.convert_tokens_to_string([t]).strip().lower() for t in tok.convert_ids_to_tokens(list(range(len(tok))))]


def badword_token_mask(ctx: Context, strings: list[str], vocab: int) -> npt.NDArray[np.bool_]:
    """Tokens that are a bad word or one of its inflections; no free prefix match, which would take 'analysis' for
    'anal' and 'button' for 'butt'."""
    forms = badword_forms(ctx.badwords)
    mask = np.zeros(vocab, dtype=bool)
    for i, s in enumerate(strings[:vocab]):
        w = "".join(ch for ch in s if ch.isalpha())
        mask[i] = len(w) >= 3 and w in forms
    return mask


def final_gain(ctx: Context) -> npt.NDArray[np.float64]:
    """(d,) per-channel scale of the final norm (Gemma's RMSNorm scales by 1 + weight)."""
    norm = ctx.fp.spec.final_norm(ctx.fp.model)
    gamma: npt.NDArray[np.float64] = norm.weight.detach().cpu().numpy().astype(np.float64)
    if getattr(ctx.fp.model.config, "model_type", "").startswith("gemma"):
        gamma = 1.0 + gamma
    return gamma


def logit_lens(ctx: Context) -> npt.NDArray[np.float64]:
    """(vocab, d) matrix reading a residual direction as logits: the output layer after the final norm's scale
    (the norm's division by the RMS only rescales a direction, its weight reweights channels)."""
    w = ctx.fp.unembedding().numpy().astype(np.float64)
    lens: npt.NDArray[np.float64] = w * final_gain(ctx)[None, :]
    return lens
