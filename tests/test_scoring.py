"""Normalisation and string metrics, with expectations computed by hand."""

import pytest

from pipeline.scoring import char_f1, contains, exact_match, normalize


@pytest.mark.parametrize("raw, expected", [
    ("８８０トン", "880トン"),          # full-width digits → half width (NFKC)
    ("８８０ トン。", "880トン"),        # spaces and Japanese punctuation dropped
    ("ｶﾀｶﾅ", "カタカナ"),              # half-width katakana → full width
    ("ＣＮＣ－７", "cnc7"),             # full-width Latin, casefold, the dash is punctuation
    ("「佐藤 健一」です!", "佐藤健一です"),
    ("45℃", "45°c"),                   # symbols are part of a value: kept (NFKC spells ℃ as °C)
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


def test_exact_match_uses_normalisation_and_aliases():
    assert exact_match("８８０トン", "880トン") == 1.0
    assert exact_match("880t", "880トン", aliases=["880t"]) == 1.0
    assert exact_match("880トンです", "880トン") == 0.0  # extra words: not exact


def test_contains():
    assert contains("P-101の定格能力は８８０トンです。", "880トン") == 1.0
    assert contains("定格能力は88トンです。", "880トン") == 0.0
    assert contains("内線は8579番", "内線8579", aliases=["8579"]) == 1.0
    assert contains("何か", "") == 0.0  # an empty gold never matches


def test_char_f1_by_hand():
    # pred "880t" vs gold "880トン": overlap {8,8,0} = 3; precision 3/4, recall 3/5 → F1 = 2*.75*.6/1.35 = 2/3
    assert char_f1("880t", "880トン") == pytest.approx(2 / 3)
    # best over aliases: "880t" matches exactly
    assert char_f1("880t", "880トン", aliases=["880t"]) == pytest.approx(1.0)
    assert char_f1("", "880トン") == 0.0
    # repeated characters count as a multiset: pred "ああい" vs gold "あい": overlap 2, p=2/3, r=1 → 0.8
    assert char_f1("ああい", "あい") == pytest.approx(0.8)
