"""Data-side levers that keep CPT knowledge through SFT (docs/levers.md): CPT text replayed during SFT
(`sft.replay_ratio`), question-answer pairs mixed into the CPT documents (`cpt.qa_mix`), and the check that keeps
such QA files, and the SFT dev set (`data.dev_qa.path`), apart from the scored QA set.

    python -m pipeline.run sft.replay_ratio=0.1                       # 10% of SFT's trained tokens are CPT text
    python -m pipeline.run cpt.qa_mix=1.0 data.cpt_qa.path=qa_pairs.jsonl

Everything here is deterministic for a given seed: the same documents and pairs are drawn in the same order.
"""

from __future__ import annotations

import logging
import random
from typing import Dict, Iterator, List, Tuple

from pipeline.core.outputs import PipelineError, example
from pipeline.core.data import QAItem, explicit_ids, load_qa, qa_fields, qa_source
from pipeline.core.scoring import exact_match, normalize

log = logging.getLogger(__name__)


# --- keeping extra QA files apart from the scored one -------------------------------------------------------------

def load_disjoint_qa(spec, key: str, scored_spec, scored_key: str = "data.qa.path") -> List[QAItem]:
    """Load the QA set `spec` (config key `key`) and refuse it if it shares a question with the scored QA set,
    by id or by question text after normalisation (pipeline/core/scoring.py: width, case, punctuation, numerals).
    Each is a path or a config.DataPath (a path with its field-mapping keys).

    Training on, or early-stopping with, a scored question would measure the lever on its own training data.
    """
    spec, fields = qa_source(spec)
    scored_spec, scored_fields = qa_source(scored_spec)
    items = load_qa(spec, key=key, **fields)
    if not scored_spec:
        return items
    scored = load_qa(scored_spec, key=scored_key, **scored_fields)
    scored_ids = explicit_ids(scored_spec, scored_key, scored_fields.get("id_field", "id"))
    for qid, where in explicit_ids(spec, key, fields.get("id_field", "id")).items():
        if qid in scored_ids:
            raise PipelineError(f"{key}={spec} and {scored_key}={scored_spec} share the question id {qid!r} ({where} "
                                f"and {scored_ids[qid]}): keep the scored questions out of training data")
    scored_text = {normalize(q.question): q for q in scored}
    for q in items:
        hit = scored_text.get(normalize(q.question))
        if hit is not None:
            raise PipelineError(f"{key}={spec} and {scored_key}={scored_spec} ask the same question ({q.id!r} and "
                                f"{hit.id!r}: {q.question!r}): keep the scored questions out of training data")
    return items


# --- the same facts in other words ----------------------------------------------------------------------------------

# Two QA records ask about the same fact when their answers are equal under the scorer's normalisation and their
# questions are alike: rapidfuzz's partial_ratio (0-100) of the normalised questions at least FACT_MIN_SIMILARITY.
# What strings cannot know is which words name the subject: "炉-8のメーカーは？" and "炉-8はどの会社が製造しましたか？"
# (one fact, 55) are less alike than "CNC-3のメーカーは？" and "CNC-7のメーカーはどこですか？" (two machines with one
# maker, 90). The threshold is low enough for the first kind, the demo's reworded leaks (55-100), so two subjects
# sharing a value under one relation are reported too: the check can over-report, never miss a reworded question
# with the same answer above 50. That is why a match is flagged (leak/<file>_shared_facts in metrics.json, the sweep's
# results.md and report.html), not refused: a refusal on a false match would block a correct file.
FACT_MIN_SIMILARITY = 50.0


def shared_facts(items: List[QAItem], scored: List[QAItem]) -> List[Tuple[QAItem, QAItem, float]]:
    """(item, scored item, question similarity) for every item of `items` that asks about a scored fact (above): the
    most similar scored question among those with the same answer."""
    from rapidfuzz import fuzz

    out = []
    for q in items:
        same_answer = [s for s in scored
                       if any(exact_match(a, s.answer, s.aliases) for a in [q.answer, *q.aliases])]
        scores = [(fuzz.partial_ratio(normalize(q.question), normalize(s.question)), s) for s in same_answer]
        best = max(scores, key=lambda x: x[0], default=None)
        if best and best[0] >= FACT_MIN_SIMILARITY:
            out.append((q, best[1], best[0]))
    return out


def leak_metrics(data, cpt, sft, stages: List[str]) -> Dict[str, int]:
    """`leak/<file>_shared_facts` for the QA files this run trains or stops on (data.cpt_qa.path with cpt.qa_mix,
    data.dev_qa.path with sft.early_stopping_patience): how many of their records ask about a scored fact. A warning
    names the first few."""
    out = {}
    if not data.qa.path:
        return out
    scored = None
    for name, on in (("cpt_qa", "cpt" in stages and cpt.qa_mix), ("dev_qa", "sft" in stages and
                                                                 sft.early_stopping_patience)):
        path = getattr(data, name).path
        if not on or not path:
            continue
        scored = scored or load_qa(data.qa.path, **qa_fields(data.qa))
        hits = shared_facts(load_qa(path, key=f"data.{name}.path", **qa_fields(getattr(data, name))), scored)
        out[f"leak/{name}_shared_facts"] = len(hits)
        if hits:
            log.warning("data.%s.path asks about %d facts of the scored QA set (same answer, similar question), e.g. "
                        "%s: the lever's result is partly practice on the scored facts", name, len(hits),
                        "; ".join(f"{q.id} ~ {s.id}" for q, s, _ in hits[:3]))
    return out


# --- cpt.qa_mix: question-answer pairs as CPT documents (PIT-style) ---------------------------------------------

def qa_documents(items: List[QAItem], share: float, template: str, seed: int) -> List[str]:
    """A seeded `share` of the pairs (0 < share <= 1; 1 = every pair), each rendered as one CPT document with
    `template` ({question}, {answer}). They join the corpus before packing, so each epoch's shuffle places them
    among the documents (not all before them)."""
    if not items or share <= 0:
        return []
    n = max(1, round(share * len(items)))
    chosen = sorted(random.Random(seed).sample(range(len(items)), n))
    try:
        return [template.format(question=items[i].question, answer=items[i].answer) for i in chosen]
    except (KeyError, IndexError, ValueError) as e:
        raise PipelineError(f"cpt.qa_template={template!r}: use the fields {{question}} and {{answer}} only "
                            f"({type(e).__name__}: {e})") from None


def mix_qa_into_corpus(docs: List[str], share: float, template: str, qa_spec, scored_spec, seed: int) -> List[str]:
    """The CPT corpus with the QA pairs of `qa_spec` (data.cpt_qa.path) mixed in when cpt.qa_mix > 0."""
    if not share:
        return docs
    if not qa_source(qa_spec)[0]:
        raise PipelineError(f"cpt.qa_mix={share:g} needs data.cpt_qa.path (question/answer pairs like data.qa, never "
                            f"the scored QA set)")
    extra = qa_documents(load_disjoint_qa(qa_spec, "data.cpt_qa.path", scored_spec), share, template, seed)
    log.info("CPT data: %d question-answer pairs from %s mixed into the corpus (cpt.qa_mix=%g), e.g. %s",
             len(extra), qa_source(qa_spec)[0], share, example(extra[0], 60) if extra else "-")
    return docs + extra


# --- sft.replay_ratio: CPT text replayed in SFT ------------------------------------------------------------------

def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _longest_prefix(tokenizer, text: str, max_tokens: int) -> int:
    """The number of characters of the longest prefix of `text` with at most `max_tokens` tokens (binary search)."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _n_tokens(tokenizer, text[:mid]) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return lo


def text_chunks(doc: str, tokenizer, max_tokens: int) -> Iterator[str]:
    """Cut a document into pieces of at most `max_tokens` tokens, at line ends where it can (a line longer than that
    is cut by characters). Text, not token ids: TRL tokenizes the replay records like every other record, and a
    byte-level BPE cut between two token ids could fall inside a character."""
    current = ""
    for line in doc.splitlines(keepends=True):
        if _n_tokens(tokenizer, current + line) <= max_tokens:
            current += line
            continue
        if current.strip():
            yield current.strip()
        current = line
        while _n_tokens(tokenizer, current) > max_tokens:
            cut = max(1, _longest_prefix(tokenizer, current, max_tokens))
            if current[:cut].strip():
                yield current[:cut].strip()
            current = current[cut:]
    if current.strip():
        yield current.strip()


def replay_records(docs: List[str], tokenizer, n_tokens: int, max_tokens: int, seed: int) -> List[dict]:
    """Plain language-model records from `docs` holding `n_tokens` trained tokens in all (each text's tokens plus
    the EOS TRL appends), as {"prompt": "", "completion": text}: with TRL's completion_only_loss the loss then falls
    on every token of the text, as in CPT.

    Documents are taken in a seeded shuffle and cut into pieces of at most `max_tokens` text tokens (room for BOS
    and EOS within sft.max_length); the last piece is shortened so that the total lands on `n_tokens`. A corpus
    smaller than that is used again in a new order (logged).
    """
    if n_tokens <= 0:
        return []
    if max_tokens < 1:
        raise PipelineError(f"sft.max_length={max_tokens + 2}: too short for replayed text (needs BOS + text + EOS)")
    records: List[dict] = []
    total, rounds, done = 0, 0, False
    while not done:
        order = list(range(len(docs)))
        random.Random(seed + rounds).shuffle(order)
        rounds, before = rounds + 1, total
        for chunk in (c for i in order for c in text_chunks(docs[i], tokenizer, max_tokens)):
            need = n_tokens - total
            size = _n_tokens(tokenizer, chunk) + 1  # + the EOS TRL appends
            if size > need:  # the last piece: as much of it as fits (a record needs a text token and EOS)
                chunk = chunk[:_longest_prefix(tokenizer, chunk, need - 1)].strip() if need > 1 else ""
                size = _n_tokens(tokenizer, chunk) + 1
            if chunk:
                records.append({"prompt": "", "completion": chunk})
                total += size
            if total >= n_tokens - 1 or not chunk:
                done = True
                break
        if not done and total == before:
            raise PipelineError("sft.replay_ratio: the replay corpus has no text to replay")
    if rounds > 1:
        log.warning("SFT replay: the replay corpus is smaller than %d tokens; its text is replayed %d times",
                    n_tokens, rounds)
    return records


def replay_token_target(answer_tokens: int, ratio: float) -> int:
    """Replayed tokens for `ratio` = replayed / (SFT answer tokens + replayed), both counted as trained tokens."""
    if not 0 <= ratio < 1:
        raise PipelineError(f"sft.replay_ratio={ratio:g}: must be >= 0 and < 1 (the share of replayed tokens among "
                            f"all trained tokens)")
    return round(answer_tokens * ratio / (1 - ratio))


def trained_tokens(dataset, is_replay) -> tuple:
    """(SFT answer tokens, replayed tokens) as the trainer will train them: label positions other than -100 in the
    tokenized, truncated dataset, split by `is_replay(row)`."""
    answer = replay = 0
    for row in dataset:
        n = sum(1 for x in row["labels"] if x != -100)
        if is_replay(row):
            replay += n
        else:
            answer += n
    return answer, replay


def check_lever_inputs(sections: dict, stages: List[str]) -> None:
    """For run.validate: the files the data-side levers of this run read exist, parse, and stay apart from the
    scored QA set, before any training."""
    from pipeline.core.data import check_cpt_documents

    data, cpt, sft = sections["data"], sections["cpt"], sections["sft"]
    if "cpt" in stages and cpt.qa_mix:
        if not data.cpt_qa.path:
            raise PipelineError(f"cpt.qa_mix={cpt.qa_mix:g} needs data.cpt_qa.path (question/answer pairs like "
                                f"data.qa, never the scored QA set)")
        qa_documents(load_disjoint_qa(data.cpt_qa, "data.cpt_qa.path", data.qa), cpt.qa_mix,
                     cpt.qa_template, 0)  # also renders qa_template once: a bad placeholder fails here
    if "sft" in stages and sft.replay_ratio:
        source, key = (data.replay, "data.replay.path") if data.replay.path else (data.cpt, "data.cpt.path")
        if not source.path:
            raise PipelineError(f"sft.replay_ratio={sft.replay_ratio:g}: no text to replay; set data.replay.path "
                                f"(or data.cpt.path, its default)")
        check_cpt_documents(source.path, source.text_field, key=key)
    if "sft" in stages and sft.early_stopping_patience:
        if not data.dev_qa.path:
            raise PipelineError(f"sft.early_stopping_patience={sft.early_stopping_patience}: needs a dev set, "
                                f"data.dev_qa.path (domain questions kept out of data.qa.path)")
        load_disjoint_qa(data.dev_qa, "data.dev_qa.path", data.qa)
