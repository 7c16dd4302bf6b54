"""Is a generated text about its source? Shared by the augment stage's filters and pipeline.draft_qa's.

Both check a generator's output against the text it was written from: the numbers it states (`numbers`), and
whether a question asks about what its passage names (`question_in_quote`). Everything is compared after the
scorer's normalisation (pipeline/core/scoring.py), so notations of one quantity or name match.
"""

from __future__ import annotations

import re

from pipeline.core.scoring import normalize

_NUMBER = re.compile(r"-?\d+(?:[.:]\d+)*")


def numbers(text: str) -> set:
    """Every number of `text` in the scorer's canonical form (kanji numerals, widths, thousands commas and units
    resolved by scoring.normalize: `八百八十トン`, `８８０t` and `880トン` all give {"880"})."""
    return set(_NUMBER.findall(normalize(text)))


def subject(question: str, quote: str) -> str:
    """What the question asks about, as its quote names it: the longest run of the normalised question without
    hiragana (a name or term; four characters or more if all Latin) that the normalised quote contains, one with a
    digit first (an identifier such as `P-101`); "" when they share none."""
    q, text = normalize(question), normalize(quote)
    best = ""
    for run in re.findall(r"[^\u3041-\u309f\s]{2,}", q):
        for size in range(len(run), 1, -1):
            found = [run[i:i + size] for i in range(len(run) - size + 1) if run[i:i + size] in text
                     and (size >= 4 or not run[i:i + size].isascii())]
            if found:
                piece = max(found, key=lambda x: any(c.isdigit() for c in x))
                if (any(c.isdigit() for c in piece), len(piece)) > (any(c.isdigit() for c in best), len(best)):
                    best = piece
                break
    return best


def question_in_quote(question: str, quote: str) -> bool:
    """The question asks about what its quote names: every number of the question is in the quote (`P-24` is not
    `P-101`, compared as the scorer compares numbers), every identifier too (a name with a digit, `CNC-3` is not
    `炉-3`; a counter after its number is left out: `2021年に` matches `2021年10月`), and the two share a name or term
    (subject)."""
    q, text = normalize(question), normalize(quote)
    identifiers = [run for run in re.findall(r"[^\u3041-\u309f\s]+", q) if any(c.isdigit() for c in run)
                   and not re.search(r"\W", run)]  # CNC-3 (cnc3) is not 炉-3 (炉3), though both hold a 3
    ids_named = all(re.sub(r"(?<=\d)[^\d]+$", "", run) in text for run in identifiers)
    # A Japanese question names its topic first (`天野雅史は…`, `P-101の…`): that name must be the quote's, or the
    # question asks about someone else in the quote's words (`久遠正樹の役職` from `天野雅史の役職は主任です`).
    topic = next((run for run in re.findall(r"[^\u3041-\u309f\s]{2,}", q) if not re.search(r"[何誰]", run)), "")
    topic_named = topic.isascii() or topic in text
    return not numbers(question) - numbers(quote) and ids_named and topic_named and bool(subject(question, quote))
