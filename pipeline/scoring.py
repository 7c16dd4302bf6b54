"""String metrics for QA answers, Japanese-aware.

Normalisation, in order (why each step):
1. NFKC + casefold (and whitespace removed): full-width digits/letters become half width and half-width katakana full width (`８８０トン` →
   `880トン`), `880T` equals `880t`, `℃` becomes `°c`.
2. Kanji numerals become Arabic where that is safe (`八百八十トン` → `880トン`, `二〇二四年` → `2024年`): a run of two or
   more numeral characters, or a single one directly before a counter (`七日` → `7日`). A lone numeral inside a word
   (`製造一課`, `唯一`) is left alone.
3. Units written in Latin letters after a number take their Japanese form (`880t` → `880トン`, `1200°c` → `1200度`,
   `7500rpm` → `7500回転`).
4. Whitespace and punctuation (Unicode category P*: 、。・「」!? …) are dropped: they carry no knowledge. Kept, as
   parts of a value: symbols (°, ¥, +), %, and a . or : between digits (3.5トン is not 35トン, 10:30 not 1030).
5. A trailing copula is dropped (`880トンです。` → `880トン`): です, でした, である, だった, だ, となります, になります.
The same normalisation is applied to the prediction, the gold answer and its aliases.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Iterable, List, Optional

_DIGITS = {"〇": 0, "零": 0, "一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_SMALL = {"十": 10, "百": 100, "千": 1000}
_LARGE = {"万": 10**4, "億": 10**8}
_NUMERAL_RUN = re.compile(f"[{''.join(_DIGITS)}{''.join(_SMALL)}{''.join(_LARGE)}]+")
_COUNTERS = set("日月年分時秒人個回度本番枚台件歳階週")
_UNITS = [(re.compile(r"(?<=\d)t(?![a-z])"), "トン"), (re.compile(r"(?<=\d)°c"), "度"),
          (re.compile(r"(?<=\d)rpm"), "回転")]
_COPULA = ("となります", "になります", "でした", "だった", "である", "です", "だ")


def kanji_to_int(run: str) -> Optional[int]:
    """`八百八十` → 880, `三万五千` → 35000, `二〇二四` → 2024 (digit by digit); None if not a number."""
    if all(ch in _DIGITS for ch in run):
        return int("".join(str(_DIGITS[ch]) for ch in run))
    total, section, digit = 0, 0, None
    for ch in run:
        if ch in _DIGITS:
            if digit is not None:
                return None  # two digits in a row inside a positional number: not a number we understand
            digit = _DIGITS[ch]
        elif ch in _SMALL:
            section += (1 if digit is None else digit) * _SMALL[ch]
            digit = None
        else:  # 万, 億
            if section == 0 and digit is None:
                return None
            total += (section + (digit or 0)) * _LARGE[ch]
            section, digit = 0, None
    return total + section + (digit or 0)


def _numerals(text: str) -> str:
    def repl(m: re.Match) -> str:
        run = m.group(0)
        after = text[m.end():m.end() + 1]
        if len(run) == 1 and after not in _COUNTERS:
            return run
        value = kanji_to_int(run)
        return run if value is None else str(value)

    return _NUMERAL_RUN.sub(repl, text)


def _is_dropped(text: str, i: int) -> bool:
    """Punctuation is dropped, except % and a . or : between digits (3.5トン, 10:30 are values)."""
    ch = text[i]
    if not unicodedata.category(ch).startswith("P") or ch == "%":
        return False
    if ch in ".:" and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit():
        return False
    return True


def normalize(text: str) -> str:
    text = "".join(ch for ch in unicodedata.normalize("NFKC", text).casefold() if not ch.isspace())
    text = _numerals(text)
    for pattern, unit in _UNITS:
        text = pattern.sub(unit, text)
    text = "".join(ch for i, ch in enumerate(text) if not _is_dropped(text, i))
    for copula in _COPULA:
        if text.endswith(copula) and len(text) > len(copula):
            return text[: -len(copula)]
    return text


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
