"""What the draft_qa filters catch, on the demo's known facts: right candidates and deliberately wrong ones.

    python benchmarks/draft_qa_filters.py

For every fact of the demo factory (data/build_demo_data.py) that a sentence of data/cpt states, candidates are built
as a generator could write them, about that sentence's chunk (chunk_tokens=1, as the demo recipe cuts):

- right:          a question in the fact's second wording, its answer (quote: the chunk's sentence);
- wrong_answer:   the same question, answered with another fact's answer of the same relation (a wrong number/name);
- wrong_entity:   the question asked about another entity of the same relation (P-104 for P-101), the original
                  answer (a true number of the sentence, about the wrong thing);
- invented_quote: the right question and answer, quoted from a paraphrase the corpus never contains (the held-out
                  wording);
- in_qa:          the QA set's own question (eval_sets/qa.jsonl asks in the first wording);
- again:          the right candidate once more, from another sentence that states the same fact.

All go through pipeline.draft_qa.filter_candidates in that order, with the demo's data/cpt_qa as training questions,
once with the demo's QA set as data.qa and once with an empty one; each table gives each kind's outcome (kept, or
the filter that dropped it).
Nothing is generated: this measures the filters, not a generator.
"""

from __future__ import annotations

import collections
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))


def main() -> None:
    import build_demo_data as demo
    from pipeline.core.data import load_qa
    from pipeline.draft_qa import REASONS, chunk_corpus, filter_candidates

    rng = random.Random(0)
    chunks = chunk_corpus(str(ROOT / "data" / "cpt"), "text", len, 1)
    by_text = collections.defaultdict(list)
    for i, c in enumerate(chunks):
        by_text[c.text].append(i)
    facts = demo.domain.facts
    same_rel = collections.defaultdict(list)
    for f in facts:
        same_rel[f["relation"]].append(f)

    def cand(kind, chunk, question, answer, quote=""):
        return {"chunk": chunk, "reply": "",  # the kind rides along in the parsed fields into kept/rejected rows
                "parsed": {"question": question, "answer": answer, "aliases": [], "quote": quote, "kind": kind}}

    items = {k: [] for k in ("right", "wrong_answer", "wrong_entity", "invented_quote", "in_qa", "again")}
    for f in facts:
        spec = demo.RELATIONS[f["relation"]]
        where = [i for t in spec["statements"] for i in by_text.get(demo.render(t, f), [])]
        if not where:
            continue
        first = where[0]
        question = demo.render(spec["questions"][1], f)
        others = [g for g in same_rel[f["relation"]] if g["answer"] != f["answer"] and g["entity"] != f["entity"]]
        if not others:
            continue
        other = rng.choice(others)
        items["right"].append(cand("right", first, question, f["answer"]))
        items["wrong_answer"].append(cand("wrong_answer", first, question, other["answer"]))
        items["wrong_entity"].append(cand("wrong_entity", first, demo.render(spec["questions"][1], other),
                                          f["answer"]))
        items["invented_quote"].append(cand("invented_quote", first, question, f["answer"],
                                            demo.render(spec["heldout"], f)))
        items["in_qa"].append(cand("in_qa", first, demo.render(spec["questions"][0], f), f["answer"]))
        if len(where) > 1:
            items["again"].append(cand("again", where[1], question, f["answer"]))
    order = [x for k in items for x in items[k]]
    training = [q.question for q in load_qa(str(ROOT / "data" / "cpt_qa" / "faq_short_questions.jsonl"),
                                            key="data.cpt_qa.path")]
    columns = ["kept", *[r for r in REASONS if r not in ("unparsed", "closed_book")]]
    for title, scored, kinds in (
            ("data.qa = eval_sets/qa.jsonl (the demo's set: every fact is in it)",
             load_qa(str(ROOT / "eval_sets" / "qa.jsonl")), list(items)),
            ("data.qa empty (growing a set from 0)", [], list(items)),
            ("data.qa empty, the wrong candidates alone (no right one drafted before them)", [],
             ["wrong_answer", "wrong_entity", "invented_quote"])):
        order = [x for k in kinds for x in items[k]]
        kept, rejected, _ = filter_candidates(order, chunks, scored, training, 90, 90)
        outcome = collections.defaultdict(collections.Counter)
        for row in kept:
            outcome[row["kind"]]["kept"] += 1
        for row in rejected:
            outcome[row["kind"]][row["reason"]] += 1
        print(f"\n{title}\n")
        print("| candidate | n | " + " | ".join(columns) + " |")
        print("|---|---|" + "---|" * len(columns))
        for kind in kinds:
            rows = items[kind]
            print(f"| {kind} | {len(rows)} | " + " | ".join(str(outcome[kind][c]) for c in columns) + " |")
        wrong_kept = [r for r in kept if r["kind"].startswith(("wrong", "invented"))]
        for r in wrong_kept[:5]:
            print(f"  kept although wrong ({r['kind']}): {r['question']} -> {r['answer']} | {r['quote']}")


if __name__ == "__main__":
    main()
