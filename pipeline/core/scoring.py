"""String metrics for QA answers, Japanese-aware and number-aware.

Factory QA answers are mostly quantities, so a number is compared as a number: `5分` is not inside `15分` or `1.5分`,
`0.5mm` is not `5mm`, `-5度` is not `5度`, while `1,200` = `1200`, `5.0` = `5`, `三号機` = `3号機`, `2千個` = `2000個`,
`1万3000回転` = `13000回転` and `マイナス5度` = `−5度`. Normalisation, in order (why each step):

1. NFKC + casefold: full-width digits/letters/signs become half width and half-width katakana full width
   (`８８０トン` → `880トン`, `－５` → `-5`), `880T` equals `880t`, `℃` becomes `°c`, `㎏` `kg`, `⁻`/`₋` become `−`.
2. Numerals inside proper names and idioms stay as written: the words of _NAMES (`五十嵐`, `六本木`, `八百屋`, `唯一`,
   `同一人物`, ...), and a numeral + counter + 市/町/村/郡, which is a place name (`八日市`, `四日市`, `十日町`): the
   text `八日市` does not contain `8日`. The rule cannot know a name it does not list (`八戸` is listed; a surname
   such as `一戸` is read as "1戸") nor a quantity that happens to stand before 市/町 (`毎月八日市が立つ`, a market on
   the 8th, reads as the place).
3. Numbers written with kanji become Arabic, read as one number:
   - a run of kanji numerals (`三十分` → `30分`, `八百八十トン` → `880トン`, `二〇二四年` → `2024年`);
   - digits mixed with 十/百/千/万/億, decimals included (`2千個` → `2000個`, `2.5万人` → `25000人`, `4万3千台` →
     `43000台`, `1億2000万` → `120000000`, `1万3000回転` → `13000回転`). A multiplier after digits is never read on
     its own: when the whole does not parse (`2万3万`), it stays kanji, so `2千` is never `2` and `1000`;
   - a single numeral after 第: an ordinal, so `第二工場` = `第2工場` (both spellings name the same plant);
   - a single numeral directly before a counter or unit (`三号機`, `七日`, `週一回`, `製造一課`, `一ヶ月`, `五kg`,
     `八つ`): the numeral of a name such as `製造一課` is still a number (section 1), so `製造一課` = `製造1課`.
   A numeral that is a morpheme of a word, not a number, stays: `一般`, `一部` (no counter follows), `十分` ("enough";
   `十分間`/`十分後`/`十分前` are 10 minutes) and `一時` before 的 停 休 保 預 (`一時停止`).
4. Signs. A minus is part of the number it precedes: `-` (also from `－` `﹣`), `‐` `‑` `‒` `–` `—` `―`, `−` (also
   from `⁻` `₋`) and `ー` (a common IME slip), but only where it does not follow a letter, digit, katakana or kanji:
   after those it is the hyphen of a name or range (`P-101`, `炉-3`, `5-10`) and is dropped like punctuation. So
   `気温は-5度` is negative, `炉-3` is a name; write a space or particle before a sign (`前年比 -5%`). `▲`/`△`
   directly before a digit are always minus (Japanese accounts write `▲500` for −500; neither is ever a hyphen). The
   words マイナス, 零下, 氷点下 before a number make it negative (`零下5度` = `-5度`); `+`/プラス in sign position
   are dropped (`+5度` = `5度`).
5. Units after a number take one spelling: Latin `t`, `°c`/`°`, `rpm`, `min`, `sec` become トン, 度, 回転, 分, 秒
   (`880t` → `880トン`), katakana units become their symbol (`5キログラム` → `5kg`, `45パーセント` → `45%`,
   `3ミリ` → `3mm`; _KATAKANA_UNITS lists them), and ヶ/ケ/カ/ヵ/箇 between a number and 月/所 become か
   (`3ヶ月` = `3か月`).
6. Times of day are written h:mm: `15時30分` = `15:30`, `15時半` = `15:30`, `15時` = `15:00`, `午後3時` = `15:00`;
   a duration's 半 is 30 of the next unit (`1時間半` = `1時間30分`, `5分半` = `5分30秒`).
7. A katakana word of three or more morae loses a final long-vowel mark (`サーバー` = `サーバ`, `モーター` =
   `モータ`), the two spellings of JIS Z 8301 and of most manuals; shorter words keep it (`キー`, `タワー`).
8. An English article (a, an, the) before another Latin word is dropped (`the apple` = `apple`); a capital `A` after
   a word is a name (`Plan A`, `vitamin A`), so this step looks at the text before case folding.
9. The text becomes a sequence of tokens: numbers, Latin words and single other characters. A number is an optional
   sign, digits (with `,` thousands groups of exactly three digits: `1,200` = `1200`; `1,20` is two numbers), and
   `.`/`:` parts (`3.5`, `10:30`, `.5` = `0.5` where `.` does not follow a letter), in one canonical form: thousands
   commas, leading zeros and trailing decimal zeros removed (`5.0` = `5`, `0.50` = `0.5`, `007` = `7`, `08:30` =
   `8:30`), `-0` = `0`; a dotted version such as `1.2.3` stays as written. A Latin word is a run of letters (joined
   across `-` and `'`: `e-mail` = `email`), so a gold word matches only a whole word (`rome` is not in `romeo`).
10. Whitespace and punctuation (Unicode category P*: 、。・「」!? -, …) are dropped: they carry no knowledge but
   still separate numbers and words (`5, 10` is 5 and 10, never 510; `5〜10` = `5～10` = `5-10`). Kept, as parts of a
   value: symbols (°, ¥, ±), %.
11. A trailing copula is dropped (`880トンです。` → `880トン`): です, でした, である, だった, だ, となります, になります.

The same normalisation is applied to the prediction, the gold answer and its aliases. `normalize` writes the
sequence as text, with one space between two numbers or two Latin words that were apart (`5 10`, `new york`).
`exact_match` compares sequences; `contains` looks for the gold sequence as a contiguous run of the prediction's, so
a gold number matches only a whole number of the prediction, sign and decimals included (`5分` is in `約5分間`, not
in `15分`, `1.5分` or `-5分`), and a gold word only a whole word. docs/scoring.md lists what is still not handled.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from decimal import Decimal
from typing import Iterable, List, Optional

_DIGITS = {"〇": 0, "零": 0, "一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_SMALL = {"十": 10, "百": 100, "千": 1000}
_LARGE = {"万": 10**4, "億": 10**8}
_KANJI = "".join([*_DIGITS, *_SMALL, *_LARGE])
_ARABIC = r"\d{1,3}(?:,\d{3})+(?!\d)|\d+(?:\.\d+)?"
# A stretch of numerals, Arabic and kanji mixed: read as one number (or, failing that, left alone) as a whole.
_NUMERIC_SPAN = re.compile(rf"(?:{_ARABIC}|[{_KANJI}])+")
_SPAN_PART = re.compile(rf"({_ARABIC})|([{''.join(_DIGITS)}])|([{''.join([*_SMALL, *_LARGE])}])")
# Counters and units a lone kanji numeral may stand before. Left out on purpose, because numeral + character is
# mostly a word there: 部 (一部 "a part"), 方 (一方), 体 (一体), 層 (一層), 面 (一面), 通 (一通り), 色, 気, 連.
_COUNTERS = set("日月年分時秒人個回度本番枚台件歳階週号名倍割課位点基冊社列段周円次期棟班係機組箱袋缶杯足"
                "項条章節巻代局桁株着錠畳坪問校店軒戸泊便席票例級等種類つ")
_MULTI_COUNTERS = ("ヶ月", "ケ月", "カ月", "ヵ月", "か月", "箇月", "ヶ所", "ケ所", "カ所", "ヵ所", "か所", "箇所",
                   "トン", "キロ", "メートル", "センチ", "ミリ", "グラム", "リットル", "ワット", "ボルト", "アンペア",
                   "パーセント", "セット", "ロット", "サイクル")
_LATIN_UNIT = re.compile(r"[a-z%°]")
# Proper names and idioms whose numerals are no numbers (the rule of step 2 catches the place names in 市/町/村/郡).
# Names: surnames and places whose numeral would otherwise be read before a counter or as a numeral run. Words:
# numerals that are a morpheme even before a counter (同一人物 is not "同 1人 物").
_NAMES = ("五十嵐", "五十鈴", "五百旗頭", "九十九里", "九十九島", "六本木", "三軒茶屋", "二階堂", "八戸", "千代",
          "八千代", "四万十", "八百屋", "八百長", "三日月", "三日坊主", "一石二鳥", "十人十色", "一期一会", "四六時中",
          "七五三", "四半期", "唯一", "同一", "統一", "単一", "均一", "画一", "随一", "逐一", "択一", "無二", "再三")
_NAME_RE = re.compile("|".join(sorted(_NAMES, key=len, reverse=True)))
_PLACE = re.compile(f"[{''.join(_DIGITS)}{''.join(_SMALL)}]+(?=[{''.join(sorted(_COUNTERS))}][市町村郡])")
_NOT_NUMBER = (re.compile(r"十分(?![間後前])"), re.compile(r"一時(?=[的停休保預])"))
_HIDE = {ch: chr(0xE100 + i) for i, ch in enumerate(_KANJI)}  # a protected numeral, as a private-use character
_HIDE_TABLE, _UNHIDE = str.maketrans(_HIDE), {ord(v): k for k, v in _HIDE.items()}

_NEG, _POS = "\ue000", "\ue001"  # private-use marks for a sign, only ever placed before a digit
_MINUS = set("-\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\u30fc")  # after NFKC (－ ﹣ → -, ⁻ ₋ → −)
_HYPHENS = _MINUS - {"ー"}  # dropped where they are no sign; ー is also a katakana letter (データー) and stays
_ALWAYS_MINUS = set("▲△")
_SIGN_WORDS = re.compile(r"(マイナス|零下|氷点下|プラス)\s*(?=\.?\d)")
# Katakana unit names after a number and their symbols, longest first where one is the start of another. ミリ and
# センチ alone are mm and cm unless more katakana or 秒 follows (ミリ秒 is ms, not handled); キロ alone is kg or km
# and stays as written.
_KATAKANA_UNITS = {"キログラム": "kg", "ミリグラム": "mg", "グラム": "g", "キロメートル": "km", "センチメートル": "cm",
                   "ミリメートル": "mm", "メートル": "m", "ミリリットル": "ml", "リットル": "l", "パーセント": "%",
                   "キロワット": "kw", "ワット": "w", "ボルト": "v", "アンペア": "a", "ヘルツ": "hz",
                   "メガパスカル": "mpa", "キロパスカル": "kpa", "パスカル": "pa", "ニュートン": "n",
                   "センチ": "cm", "ミリ": "mm"}
_KATAKANA_UNIT = re.compile(r"(?<=\d)\s*(" + "|".join(sorted(_KATAKANA_UNITS, key=len, reverse=True))
                            + r")(?![ァ-ヺー秒])")
_UNITS = [(re.compile(r"(?<=\d)\s*t(?![a-z])"), "トン"), (re.compile(r"(?<=\d)\s*°c"), "度"),
          (re.compile(r"(?<=\d)\s*°(?![a-z])"), "度"), (re.compile(r"(?<=\d)\s*rpm(?![a-z])"), "回転"),
          (re.compile(r"(?<=\d)\s*min(?![a-z])"), "分"), (re.compile(r"(?<=\d)\s*sec(?![a-z])"), "秒"),
          (re.compile(r"(?<=\d)[ヶケカヵ箇](?=[月所])"), "か")]
_CLOCK = re.compile(r"(午前|午後)?(?<![\d.:])(\d{1,2})時(?!間)(?:(\d{1,2})分(?!間)(?:(\d{1,2})秒)?|(半))?")
_CLOCK_COLON = re.compile(r"(午前|午後)(\d{1,2}):(\d{2})(?!\d)")
_HALF = [(re.compile(r"(?<=\d)時間半"), "時間30分"), (re.compile(r"(?<=\d)分半"), "分30秒")]
_SMALL_KANA = set("ァィゥェォャュョヮヵヶ")
_KATAKANA_RUN = re.compile(r"(?<![ァ-ヺー])[ァ-ヺ][ァ-ヺー]*ー(?![ァ-ヺー])")
# Lower case anywhere; capitalised only where a sentence may start (not after a word: `Plan A is`, `vitamin A`).
_ARTICLE = re.compile(r"(?<![A-Za-z\d])(?:a|an|the|(?<![A-Za-z]\s)(?:A|An|The))\s+(?=[A-Za-z])")
_LATIN = "a-z\u00df-\u00f6\u00f8-\u00ff\u0100-\u024f"
_WORD = re.compile(rf"[{_LATIN}]+(?:['’\-\u2010\u2011][{_LATIN}]+)*")
_NUMBER = re.compile(r"([\ue000\ue001]?)(\d{1,3}(?:,\d{3})+(?!\d)|\d+|(?=\.\d))((?:[.:]\d+)*)")
_COPULA = ("となります", "になります", "でした", "だった", "である", "です", "だ")


class _Num(str):
    """A number token in its canonical form (a plain str otherwise: equal to the same number, never to a character,
    since every digit and sign of the text ends up in a number token)."""


class _Word(str):
    """A Latin word token: equal to the same word only, never to a part of a longer one."""


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


def mixed_to_number(span: str) -> Optional[str]:
    """`2千` → '2000', `2.5万` → '25000', `4万3千` → '43000', `1億2000万` → '120000000'; None if `span` is not one
    number (`2万3万`: multipliers out of order; `2三`: two numbers side by side; no multiplier at all)."""
    total, section, pending = Decimal(0), Decimal(0), None
    last_small, last_large, multiplied = 10**4, 10**9, False
    for m in _SPAN_PART.finditer(span):
        arabic, digit, mult = m.groups()
        if arabic or digit:
            if pending is not None:
                return None
            pending = Decimal(arabic.replace(",", "")) if arabic else Decimal(_DIGITS[digit])
        elif mult in _SMALL:
            if _SMALL[mult] >= last_small:
                return None
            section += (Decimal(1) if pending is None else pending) * _SMALL[mult]
            pending, last_small, multiplied = None, _SMALL[mult], True
        else:
            if _LARGE[mult] >= last_large or (pending is None and not section):
                return None
            total += (section + (pending or 0)) * _LARGE[mult]
            section, pending, last_small, last_large, multiplied = Decimal(0), None, 10**4, _LARGE[mult], True
    if not multiplied:
        return None
    value = total + section + (pending or 0)
    return str(int(value)) if value == value.to_integral_value() else format(value.normalize(), "f")


def _before_counter(after: str) -> bool:
    return after[:1] in _COUNTERS or after.startswith(_MULTI_COUNTERS) or bool(_LATIN_UNIT.match(after))


def _hide_names(text: str) -> str:
    """Turn the numerals of listed names and of place names (step 2) into private-use characters."""
    def hide(m: re.Match) -> str:
        return m.group(0).translate(_HIDE_TABLE)

    return _PLACE.sub(hide, _NAME_RE.sub(hide, text))


def _numerals(text: str) -> str:
    hidden = _hide_names(text)

    def repl(m: re.Match) -> str:
        span, before, after = m.group(0), hidden[m.start() - 1:m.start()], hidden[m.end():]
        has_arabic, has_kanji = any(ch.isdigit() for ch in span), any(ch in _KANJI for ch in span)
        if not has_kanji:
            return span
        if has_arabic:
            return mixed_to_number(span) or span
        if len(span) == 1 and before != "第":
            if not _before_counter(after) or any(p.match(hidden, m.start()) for p in _NOT_NUMBER):
                return span
        value = kanji_to_int(span)
        return span if value is None else str(value)

    return _NUMERIC_SPAN.sub(repl, hidden).translate(_UNHIDE)


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


def _clock(half: str, hour: str, minute: str, second: str = "") -> Optional[str]:
    """A time of day as h:mm (h:mm:ss), 午後 adding 12 hours; None if it is none (25時, 3時75分)."""
    h = int(hour) + (12 if half == "午後" and int(hour) < 12 else 0)
    if h > 24 or int(minute) > 59 or (second and int(second) > 59):
        return None
    return f"{h}:{int(minute):02d}" + (f":{int(second):02d}" if second else "")


def _times(text: str) -> str:
    text = _CLOCK.sub(lambda m: _clock(m[1], m[2], m[3] or ("30" if m[5] else "0"), m[4] or "") or m[0], text)
    return _CLOCK_COLON.sub(lambda m: _clock(m[1], m[2], m[3]) or m[0], text)


def _drop_long_vowel(m: re.Match) -> str:
    word = m.group(0)
    morae = sum(ch not in _SMALL_KANA for ch in word[:-1])
    return word[:-1] if morae >= 3 else word


def _rewrite(text: str) -> str:
    """Steps 5-7: one spelling of units, times and long vowels."""
    text = _KATAKANA_UNIT.sub(lambda m: _KATAKANA_UNITS[m.group(1)], text)
    for pattern, unit in _UNITS:
        text = pattern.sub(unit, text)
    text = _times(text)
    for pattern, spelled in _HALF:
        text = pattern.sub(spelled, text)
    return _KATAKANA_RUN.sub(_drop_long_vowel, text)


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
    """Normalised text as a list of tokens: _Num numbers, _Word Latin words and single characters (steps 1-11)."""
    text = _ARTICLE.sub("", unicodedata.normalize("NFKC", text)).casefold()  # before casefold: A is a name or not
    text = _rewrite(_mark_signs(_numerals(text)))
    tokens: List[str] = []
    i = 0
    while i < len(text):
        m = _NUMBER.match(text, i)
        # a number starts at a sign or digit, or at a "." before a digit that does not follow a letter (No.5 is 5)
        if m and m.end() > i and (m.group(1) or m.group(2) or i == 0 or not text[i - 1].isalnum()):
            tokens.append(_canonical(m))
            i = m.end()
            continue
        w = _WORD.match(text, i)
        if w:
            tokens.append(_Word(re.sub(r"['’\-\u2010\u2011]", "", w.group(0))))
            i = w.end()
            continue
        if not _is_dropped(text[i]):
            tokens.append(text[i])
        i += 1
    for copula in _COPULA:
        if len(tokens) > len(copula) and tokens[-len(copula):] == list(copula):
            return tokens[: -len(copula)]
    return tokens


def _render(tokens: List[str]) -> str:
    """Tokens as text; a space between two numbers or two words keeps them apart (5 10 is not 510)."""
    out = []
    for prev, tok in zip([None, *tokens], tokens):
        if type(prev) is type(tok) and isinstance(tok, (_Num, _Word)):
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
    `15分`, `1.5分` or `-5分`), and a gold Latin word only a whole word (`rome` is not in `romeo`).
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
