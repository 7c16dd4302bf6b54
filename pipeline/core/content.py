"""Data content that parses but cannot train or be scored, checked over records already read (so it does not care
how they were read): [{"where": "file:line", ...}]. Refused where the run would fail or measure nothing; logged
where the data may well be meant that way.

| content | SFT | QA (data.qa, general_qa, cpt_qa, dev_qa) |
|---|---|---|
| an empty answer | refused: it trains EOS alone | refused (data.load_qa) |
| an answer that normalises to nothing ("。", "…") | allowed: a chat answer may be punctuation | refused: no string metric can ever match it |
| a lone surrogate (valid JSON "\\ud800") | refused: tokenizers raise | refused |
| one question, two different answers | logged: chat data has many good answers | refused: one of them is always scored wrong |
| text the model's tokenizer raises on | refused | refused (data.qa) |
| characters the tokenizer maps to its unknown token | logged | logged (data.qa): the model can never write them |
"""

from __future__ import annotations

import logging
from typing import Iterable, List, Optional

from pipeline.core.outputs import PipelineError
from pipeline.core.scoring import normalize

log = logging.getLogger(__name__)


def unencodable(text: str) -> Optional[str]:
    """Why `text` cannot be encoded (a lone surrogate: not UTF-8, which every tokenizer needs), or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return f"a lone surrogate {text[e.start]!r} at character {e.start} (not encodable text)"


def _check_text(texts: Iterable[str], where: str) -> None:
    for t in texts:
        why = unencodable(t)
        if why:
            raise PipelineError(f"{where}: {why}; fix the text (it is valid JSON but no tokenizer can read it)")


def check_documents(docs: List[dict]) -> None:
    """CPT-style text: [{"where", "text"}]."""
    for d in docs:
        _check_text([d["text"]], d["where"])


def check_sft_content(records: List[dict]) -> None:
    """SFT records: [{"where", "messages"}]. Refuses text a tokenizer cannot read and empty answers; logs questions
    asked more than once with different answers (refused for QA sets, normal in chat data)."""
    answers: dict = {}
    for r in records:
        _check_text([m["content"] for m in r["messages"]], r["where"])
        if not r["messages"][-1]["content"].strip():
            raise PipelineError(f"{r['where']}: the answer (last assistant message) is empty; SFT would train the "
                                f"model to answer with nothing")
        prompt = "\n".join(m["content"].strip() for m in r["messages"][:-1])
        answers.setdefault(prompt, {}).setdefault(r["messages"][-1]["content"].strip(), r["where"])
    twice = [w for a in answers.values() if len(a) > 1 for w in a.values()]
    if twice:
        log.warning("SFT data: %d records share their prompt with a record that answers differently (e.g. %s); "
                    "kept, as chat data may answer one prompt in several ways", len(twice), ", ".join(twice[:2]))


def check_qa_content(items: list, key: str) -> None:
    """QA items (data.QAItem, with `where`): text a tokenizer cannot read, answers that normalise to nothing, and one
    question (normalised) with two different answers are refused, naming file:line."""
    first: dict = {}
    for q in items:
        _check_text([q.question, q.answer, *q.aliases], q.where)
        gold = normalize(q.answer)
        if not gold:
            raise PipelineError(f"{q.where}: the answer {q.answer!r} normalises to nothing (punctuation and spaces "
                                f"only), so no answer can ever match it; give the fact itself")
        same = first.setdefault(normalize(q.question), q)
        golds = {normalize(a) for a in [same.answer, *same.aliases]}
        if same is not q and gold not in golds:
            raise PipelineError(f"{q.where}: the question of {same.where} again, with another answer "
                                f"({q.answer!r} vs {same.answer!r}); one of them would always be scored wrong: merge "
                                f"them (one answer, the other as an alias) or make the questions differ ({key})")


def check_tokenizable(texts: List[tuple], tokenizer, what: str) -> None:
    """[(where, text)] through the model's tokenizer: one that raises is refused with its file:line; characters it
    maps to its unknown token are logged (the model can read around them but never write them, so an answer holding
    one is never generated exactly; refusing would stop real data over one rare symbol)."""
    unk, flagged = tokenizer.unk_token_id, []
    for where, text in texts:
        try:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        except Exception as e:  # noqa: BLE001 whatever the tokenizer raises, the user needs the line
            raise PipelineError(f"{where}: the tokenizer cannot encode this text ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})") from None
        if unk is not None and unk in ids:
            flagged.append(where)
    if flagged:
        log.warning("%s: %d texts hold characters the tokenizer maps to %s (e.g. %s): the model can never write "
                    "them", what, len(flagged), tokenizer.unk_token, ", ".join(flagged[:3]))
