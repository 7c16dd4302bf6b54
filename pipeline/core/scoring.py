"""String metrics for QA answers, Japanese-aware and number-aware.

Factory QA answers are mostly quantities, so a number is compared as a number: `5分` is not inside `15分` or `1.5分`,
`0.5mm` is not `5mm`, `-5度` is not `5度`, while `1,200` = `1200`, `5.0` = `5`, `三号機` = `3号機` and
`マイナス5度` = `−5度`. Normalisation, in order (why each step):

1. NFKC + casefold: full-width digits/letters/signs become half width and half-width katakana full width
   (`８８０トン` → `880トン`, `－５` → `-5`), `880T` equals `880t`, `℃` becomes `°c`, `⁻`/`₋` become `−`.
2. Kanji numerals become Arabic where they are numbers (`八百八十トン` → `880トン`, `二〇二四年` → `2024年`):
   - a run of two or more numeral characters (`三十分` → `30分`);
   - a single numeral after 第: an ordinal, so `第二工場` = `第2工場` (both spellings name the same plant);
   - a single numeral directly before a counter or unit (`三号機`, `七日`, `週一回`, `製造一課`, `一ヶ月`, `五kg`):
     the numeral of a name such as `製造一課` is still a number (section 1), so `製造一課` = `製造1課`.
   A numeral that is a morpheme of a word, not a number, stays: `一般`, `一部`, `唯一` (no counter follows), the
   words 唯一 同一 統一 単一 均一 画一 随一 逐一 択一 万一 無二 再三 even before a counter (`同一人物`), `十分`
   ("enough"; `十分間`/`十分後`/`十分前` are 10 minutes) and `一時` before 的 停 休 保 預 (`一時停止`).
3. Signs. A minus is part of the number it precedes: `-` (also from `－` `﹣`), `‐` `‑` `‒` `–` `—` `―`, `−` (also
   from `⁻` `₋`) and `ー` (a common IME slip), but only where it does not follow a letter, digit, katakana or kanji:
   after those it is the hyphen of a name or range (`P-101`, `炉-3`, `5-10`) and is dropped like punctuation. So
   `気温は-5度` is negative, `炉-3` is a name; write a space or particle before a sign (`前年比 -5%`). `▲`/`△`
   directly before a digit are always minus (Japanese accounts write `▲500` for −500; neither is ever a hyphen). The
   words マイナス, 零下, 氷点下 before a number make it negative (`零下5度` = `-5度`); `+`/プラス in sign position
   are dropped (`+5度` = `5度`).
4. Units written in Latin letters after a number take their Japanese form (`880t` → `880トン`, `1200°c` → `1200度`,
   `7500 rpm` → `7500回転`), and ヶ/ケ/カ/ヵ/箇 between a number and 月/所 become か (`3ヶ月` = `3か月`).
5. The text becomes a sequence of numbers and single characters. A number is an optional sign, digits (with `,`
   thousands groups of exactly three digits: `1,200` = `1200`; `1,20` is two numbers), and `.`/`:` parts
   (`3.5`, `10:30`, `.5` = `0.5` where `.` does not follow a letter). It is written in one canonical form: thousands
   commas, leading zeros and trailing decimal zeros removed (`5.0` = `5`, `0.50` = `0.5`, `007` = `7`, `08:30` =
   `8:30`), `-0` = `0`; a dotted version such as `1.2.3` stays as written.
6. Whitespace and punctuation (Unicode category P*: 、。・「」!? -, …) are dropped: they carry no knowledge but still
   separate numbers (`5, 10` is 5 and 10, never 510; `5〜10` = `5～10` = `5-10`). Kept, as parts of a value:
   symbols (°, ¥, ±), %.
7. A trailing copula is dropped (`880トンです。` → `880トン`): です, でした, である, だった, だ, となります, になります.

The same normalisation is applied to the prediction, the gold answer and its aliases. `normalize` writes the
sequence as text, with one space between two numbers that were apart (`5 10`). `exact_match` compares sequences;
`contains` looks for the gold sequence as a contiguous run of the prediction's, so a gold number matches only a whole
number of the prediction, sign and decimals included (`5分` is in `約5分間`, not in `15分`, `1.5分` or `-5分`).
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
# Counters and units a lone kanji numeral may stand before. Left out on purpose, because numeral + character is
# mostly a word there: 部 (一部 "a part"), 方 (一方), 体 (一体), 層 (一層), 面 (一面), 通 (一通り), 色, 気, 連.
_COUNTERS = set("日月年分時秒人個回度本番枚台件歳階週号名倍割課位点基冊社列段周円次期棟班係機組箱袋缶杯足"
                "項条章節巻代局桁株着錠畳坪問校店軒戸泊便席票例級等種類")
_MULTI_COUNTERS = ("ヶ月", "ケ月", "カ月", "ヵ月", "か月", "箇月", "ヶ所", "ケ所", "カ所", "ヵ所", "か所", "箇所",
                   "トン", "キロ", "メートル", "センチ", "ミリ", "グラム", "リットル", "ワット", "ボルト", "アンペア",
                   "パーセント", "セット", "ロット", "サイクル")
_LATIN_UNIT = re.compile(r"[a-z%°]")
# Words in which a numeral before a counter is a morpheme, not a number (同一人物 is not "同 1人 物").
_WORDS = {"唯一", "同一", "統一", "単一", "均一", "画一", "随一", "逐一", "択一", "万一", "無二", "再三"}
_NOT_NUMBER = (re.compile(r"十分(?![間後前])"), re.compile(r"一時(?=[的停休保預])"))

_NEG, _POS = "\ue000", "\ue001"  # private-use marks for a sign, only ever placed before a digit
_MINUS = set("-\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\u30fc")  # after NFKC (－ ﹣ → -, ⁻ ₋ → −)
_HYPHENS = _MINUS - {"ー"}  # dropped where they are no sign; ー is also a katakana letter (データー) and stays
_ALWAYS_MINUS = set("▲△")
_SIGN_WORDS = re.compile(r"(マイナス|零下|氷点下|プラス)\s*(?=\.?\d)")
_UNITS = [(re.compile(r"(?<=\d)\s*t(?![a-z])"), "トン"), (re.compile(r"(?<=\d)\s*°c"), "度"),
          (re.compile(r"(?<=\d)\s*rpm"), "回転"), (re.compile(r"(?<=\d)[ヶケカヵ箇](?=[月所])"), "か")]
_NUMBER = re.compile(r"([\ue000\ue001]?)(\d{1,3}(?:,\d{3})+(?!\d)|\d+|(?=\.\d))((?:[.:]\d+)*)")
_COPULA = ("となります", "になります", "でした", "だった", "である", "です", "だ")


class _Num(str):
    """A number token in its canonical form (a plain str otherwise: equal to the same number, never to a character,
    since every digit and sign of the text ends up in a number token)."""


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


def _before_counter(after: str) -> bool:
    return after[:1] in _COUNTERS or after.startswith(_MULTI_COUNTERS) or bool(_LATIN_UNIT.match(after))


def _numerals(text: str) -> str:
    def repl(m: re.Match) -> str:
        run, before, after = m.group(0), text[m.start() - 1:m.start()], text[m.end():]
        if len(run) == 1 and before != "第":
            if not _before_counter(after) or before + run in _WORDS:
                return run
            if any(p.match(text, m.start()) for p in _NOT_NUMBER):
                return run
        value = kanji_to_int(run)
        return run if value is None else str(value)

    return _NUMERAL_RUN.sub(repl, text)


def _is_name_char(ch: str) -> bool:
    """Letters, digits, katakana and kanji form names (P-101, 炉-3); hiragana are particles (気温は-5度)."""
    return ch.isalnum() and not "\u3041" <= ch <= "\u309f"


def _mark_signs(text: str) -> str:
    """Replace every sign of a number by _NEG/_POS (a minus or plus in sign position, ▲/△, マイナス/零下/プラス)."""
    text = _SIGN_WORDS.sub(lambda m: _POS if m.group(1) == "プラス" else _NEG, text)
    out = []
    for i, ch in enumerate(text):
        nxt = text[i + 1:i + 3]
        starts_number = nxt[:1].isdigit() or (nxt[:1] == "." and nxt[1:].isdigit())
        in_sign_position = i == 0 or not _is_name_char(text[i - 1])
        if starts_number and (ch in _ALWAYS_MINUS or (in_sign_position and ch in _MINUS)):
            out.append(_NEG)
        elif starts_number and in_sign_position and ch == "+":
            out.append(_POS)
        else:
            out.append(ch)
    return "".join(out)


def _canonical(m: re.Match) -> _Num:
    sign, whole, rest = m.group(1), m.group(2).replace(",", ""), m.group(3)
    if ":" not in rest and rest.count(".") <= 1:  # a decimal number: compare by value
        frac = rest[1:].rstrip("0")
        body = (whole.lstrip("0") or "0") + ("." + frac if frac else "")
    elif "." not in rest:  # a time, 08:30 = 8:30
        body = (whole.lstrip("0") or "0") + rest
    else:  # a dotted version such as 1.2.3: as written
        body = whole + rest
    negative = sign == _NEG and body.strip("0.:")
    return _Num("-" + body if negative else body)


def _is_dropped(ch: str) -> bool:
    """Whitespace, punctuation (except %), ~ and a minus that is no sign (the hyphen of P-101) carry no knowledge."""
    if ch.isspace() or ch in _HYPHENS or ch == "~":  # ~ (from ～) is the range mark 〜, which is punctuation (Pd)
        return True
    return unicodedata.category(ch).startswith("P") and ch != "%"


def _tokens(text: str) -> List[str]:
    """Normalised text as a list of tokens: _Num numbers and single characters (module docstring, steps 1-7)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _mark_signs(_numerals(text))
    for pattern, unit in _UNITS:
        text = pattern.sub(unit, text)
    tokens: List[str] = []
    i = 0
    while i < len(text):
        m = _NUMBER.match(text, i)
        # a number starts at a sign or digit, or at a "." before a digit that does not follow a letter (No.5 is 5)
        if m and m.end() > i and (m.group(1) or m.group(2) or i == 0 or not text[i - 1].isalnum()):
            tokens.append(_canonical(m))
            i = m.end()
            continue
        if not _is_dropped(text[i]):
            tokens.append(text[i])
        i += 1
    for copula in _COPULA:
        if len(tokens) > len(copula) and tokens[-len(copula):] == list(copula):
            return tokens[: -len(copula)]
    return tokens


def _render(tokens: List[str]) -> str:
    """Tokens as text; a space between two numbers keeps them apart (5 10 is not 510)."""
    out = []
    for prev, tok in zip([None, *tokens], tokens):
        if isinstance(prev, _Num) and isinstance(tok, _Num):
            out.append(" ")
        out.append(tok)
    return "".join(out)


def normalize(text: str) -> str:
    return _render(_tokens(text))


def _golds(answer: str, aliases: Iterable[str] = ()) -> List[List[str]]:
    return [g for g in (_tokens(a) for a in [answer, *aliases]) if g]


def exact_match(prediction: str, answer: str, aliases: Iterable[str] = ()) -> float:
    pred = _tokens(prediction)
    return float(any(pred == g for g in _golds(answer, aliases)))


def contains(prediction: str, answer: str, aliases: Iterable[str] = ()) -> float:
    """1.0 when the gold answer (or an alias) is a contiguous run of the prediction's tokens.

    Tokens, not a substring test: a gold number then matches only a whole number of the prediction (`5分` is not in
    `15分`, `1.5分` or `-5分`).
    """
    pred = _tokens(prediction)
    return float(any(pred[i:i + len(g)] == g for g in _golds(answer, aliases) for i in range(len(pred) - len(g) + 1)))


def char_f1(prediction: str, answer: str, aliases: Iterable[str] = ()) -> float:
    """Character-level F1 (bag of characters of the normalised text), best over the answer and its aliases.

    Characters rather than words because Japanese has no spaces to split on.
    """
    pred = Counter("".join(_tokens(prediction)))
    best = 0.0
    for g in _golds(answer, aliases):
        gold = Counter("".join(g))
        overlap = sum((pred & gold).values())
        if overlap:
            p, r = overlap / sum(pred.values()), overlap / sum(gold.values())
            best = max(best, 2 * p * r / (p + r))
    return best


STRING_METRICS = {"exact_match": exact_match, "contains": contains, "char_f1": char_f1}
HEADLINE_METRICS = (*STRING_METRICS, "logprob")
