"""How right are the drafted QA candidates? The demo corpus's every fact is known (data/build_demo_data.py), so each
kept candidate of a `python -m pipeline.draft_qa` output can be checked against the fact it asks about.

    python -m pipeline.draft_qa hydra.run.dir=outputs/draft_qa/demo \
      data.cpt_qa.path=data/cpt_qa/faq_short_questions.jsonl
    python benchmarks/draft_qa_demo.py outputs/draft_qa/demo

A candidate asks about the demo entity (machine, person, procedure, incident) whose name its question holds (the
longest such name), and about that entity's relation whose question wordings and statements are most like the
candidate's question (rapidfuzz ratio). Its gold answer is right when it equals that fact's answer or an alias after
the scorer's normalisation (scoring.exact_match); `contains` is the looser check (the fact's answer inside the
candidate's, e.g. a whole sentence as the answer, which a QA set should not have either). A candidate whose question
names no entity of the factory is counted apart (`no fact`): a question about a sentence that states no fact.
"""

from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))


def check(rows: list) -> dict:
    from rapidfuzz import fuzz

    import build_demo_data as demo
    from pipeline.core.scoring import contains, exact_match

    facts = {}
    for f in demo.domain.facts:
        facts.setdefault(f["entity"], []).append(f)
    counts = {"n": len(rows), "right": 0, "contains_only": 0, "wrong": 0, "no_fact": 0}
    wrong = []
    for r in rows:
        q = unicodedata.normalize("NFKC", r["question"])
        names = [e for e in facts if e in q]
        if not names:
            counts["no_fact"] += 1
            continue
        entity = max(names, key=len)

        def likeness(f):
            spec = demo.RELATIONS[f["relation"]]
            return max(fuzz.ratio(q, demo.render(t, f)) for t in spec["questions"] + spec["statements"])

        fact = max(facts[entity], key=likeness)
        if exact_match(r["answer"], fact["answer"], fact["aliases"]):
            counts["right"] += 1
        elif contains(r["answer"], fact["answer"], fact["aliases"]):
            counts["contains_only"] += 1
        else:
            counts["wrong"] += 1
            wrong.append((r["question"], r["answer"], fact["answer"]))
    checked = counts["n"] - counts["no_fact"]
    counts["right_share"] = round(counts["right"] / checked, 3) if checked else None
    return {"counts": counts, "wrong": wrong}


def main(argv):
    out_dir = Path(argv[0])
    stats = json.loads((out_dir / "draft_stats.json").read_text(encoding="utf-8"))
    read = lambda name: [json.loads(x) for x in (out_dir / name).read_text(encoding="utf-8").splitlines() if x]  # noqa
    result = check(read("candidates.jsonl"))
    print("draft_stats.json:", json.dumps(stats, ensure_ascii=False))
    print("kept, checked against the demo's facts:", json.dumps(result["counts"], ensure_ascii=False))
    rejected = [r for r in read("rejected.jsonl") if r.get("question")]
    for reason in dict.fromkeys(r["reason"] for r in rejected):
        print(f"dropped as {reason}, checked the same way:",
              json.dumps(check([r for r in rejected if r["reason"] == reason])["counts"], ensure_ascii=False))
    for q, a, gold in result["wrong"][:20]:
        print(f"  wrong: {q} -> {a} (the fact: {gold})")


if __name__ == "__main__":
    main(sys.argv[1:])
