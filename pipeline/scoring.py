"""String metrics for QA answers, Japanese-aware.

Normalisation (why each step): NFKC folds full-width digits/letters to half width and half-width katakana to full
width (`８８０トン` → `880トン`); casefold makes `880T` equal `880t`; whitespace and punctuation (Unicode category P*:
、。・「」!? …) are dropped because they carry no knowledge. Symbols such as ℃ or % are kept: they are part of a value.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Iterable, List


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if not ch.isspace() and not unicodedata.category(ch).startswith("P"))


def _golds(answer: str, aliases: Iterable[str] = ()) -> List[str]:
    return [g for g in (normalize(a) for a in [answer, *aliases]) if g]


def exact_match(prediction: str, answer: str, aliases: Iterable[str] = ()) -> float:
    pred = normalize(prediction)
    return float(any(pred == g for g in _golds(answer, aliases)))


def contains(prediction: str, answer: str, aliases: Iterable[str] = ()) -> float:
    """1.0 when the gold answer (or an alias) appears inside the normalised prediction."""
    pred = normalize(prediction)
    return float(any(g in pred for g in _golds(answer, aliases)))


def char_f1(prediction: str, answer: str, aliases: Iterable[str] = ()) -> float:
    """Character-level F1 (bag of characters), best over the answer and its aliases.

    Characters rather than words because Japanese has no spaces to split on.
    """
    pred = Counter(normalize(prediction))
    best = 0.0
    for g in _golds(answer, aliases):
        gold = Counter(g)
        overlap = sum((pred & gold).values())
        if overlap:
            p, r = overlap / sum(pred.values()), overlap / sum(gold.values())
            best = max(best, 2 * p * r / (p + r))
    return best


STRING_METRICS = {"exact_match": exact_match, "contains": contains, "char_f1": char_f1}
HEADLINE_METRICS = (*STRING_METRICS, "logprob")
