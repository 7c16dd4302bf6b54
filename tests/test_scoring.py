"""Normalisation and string metrics, with expectations computed by hand."""

import pytest

from pipeline.scoring import char_f1, contains, exact_match, normalize


@pytest.mark.parametrize("raw, expected", [
    ("８８０トン", "880トン"),          # full-width digits → half width (NFKC)
    ("８８０ トン。", "880トン"),        # spaces and Japanese punctuation dropped
    ("ｶﾀｶﾅ", "カタカナ"),              # half-width katakana → full width
    ("ＣＮＣ－７", "cnc7"),             # full-width Latin, casefold, the dash is punctuation
    ("「佐藤 健一」です!", "佐藤健一"),
    ("¥500", "¥500"),                  # symbols are part of a value: kept
    ("45%", "45%"),
    ("3.5t", "3.5トン"),                # a decimal point between digits is part of the value
    ("10:30です。", "10:30"),
    ("880トンです。", "880トン"),        # trailing copula dropped
    ("主任だ", "主任"),
    ("八百八十トン", "880トン"),         # kanji numerals → Arabic
    ("二〇二四年", "2024年"),            # digit-by-digit kanji year
    ("三万五千回転", "35000回転"),
    ("七日", "7日"),                    # a single numeral before a counter
    ("製造一課", "製造一課"),            # ... but not inside a word
    ("880t", "880トン"),                # Latin unit after a number
    ("1200℃", "1200度"),               # NFKC makes ℃ "°c", then the unit rule
    ("7500 rpm", "7500回転"),
    ("です", "です"),                   # a bare copula is kept, not emptied
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


def test_exact_match_uses_normalisation_and_aliases():
    assert exact_match("８８０トン", "880トン") == 1.0
    assert exact_match("880t", "880トン") == 1.0  # unit rule
    assert exact_match("880トン級", "880トン", aliases=["880トン級"]) == 1.0
    assert exact_match("880トンの能力", "880トン") == 0.0  # extra words: not exact


def test_contains():
    assert contains("P-101の定格能力は８８０トンです。", "880トン") == 1.0
    assert contains("定格能力は88トンです。", "880トン") == 0.0
    assert contains("内線は8579番", "内線8579", aliases=["8579"]) == 1.0
    assert contains("何か", "") == 0.0  # an empty gold never matches


def test_char_f1_by_hand():
    # pred "880" vs gold "880トン": overlap {8,8,0} = 3; precision 3/3, recall 3/5 → F1 = 2*1*.6/1.6 = 0.75
    assert char_f1("880", "880トン") == pytest.approx(0.75)
    # best over aliases: "880" matches the alias exactly
    assert char_f1("880", "880トン", aliases=["880"]) == pytest.approx(1.0)
    assert char_f1("", "880トン") == 0.0
    # repeated characters count as a multiset: pred "ああい" vs gold "あい": overlap 2, p=2/3, r=1 → 0.8
    assert char_f1("ああい", "あい") == pytest.approx(0.8)


def test_japanese_answers_match_their_gold():
    assert exact_match("880トンです。", "880トン") == 1.0
    assert exact_match("八百八十トンです", "880トン") == 1.0
    assert contains("P-101の定格能力は八百八十トンです。", "880トン") == 1.0
    assert exact_match("1200度", "1200℃") == 1.0
    assert exact_match("2024年です", "二〇二四年") == 1.0
    assert exact_match("88トン", "880トン") == 0.0
    assert exact_match("3.5トン", "35トン") == 0.0


@pytest.mark.parametrize("run, value", [("八百八十", 880), ("千二百", 1200), ("十", 10), ("十五", 15),
                                        ("三万五千", 35000), ("二〇二四", 2024), ("一億二千万", 120000000),
                                        ("二三百", None)])
def test_kanji_to_int(run, value):
    from pipeline.scoring import kanji_to_int

    assert kanji_to_int(run) == value
