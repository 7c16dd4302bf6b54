#!/usr/bin/env python3
"""Training records for the demo's augmentation generator (outputs/demo_generator_model), from the *public* world only.

The demo base model is a 5M-parameter Llama that has never been asked to rewrite anything. A real user's generator is
an instruct model that already follows "write a question about this passage"; the demo's stand-in learns that task
here, on the pretraining world's facts (南風工業 and 西海製作所), and is then applied to the factory's documents,
whose facts it has never seen:

* `qa`: a statement of a fact -> "質問: <a question about it>\\n答え: <its answer>", the question in one of the
  relation's question wordings (the same wordings the pretraining corpus asks public facts in).
* copy drills: the same statements with the entity and the answer replaced by made-up ones (random IDs, digits,
  people, makers, places; never a factory name). Trained on the public facts alone, the generator memorised them and
  wrote pairs about its own world whatever the passage said (docs/augmentation.md: 99.5% of its replies were
  ungrounded); a statement whose entity and value it has never seen can only be turned into a pair by copying
  from the passage, which is the skill a real instruct model brings.

Only `qa`: it is the form a small model extracts facts from (the demo's `faq` group), and every other strategy would
cost this 2-core CPU as much again to learn.

The user turn is the strategy's own prompt template (conf/augment/prompts/ja/<strategy>.txt) with the statement as
the passage, so the generator learns exactly the prompts the augment stage sends.

    python data/build_demo_generator_data.py     # writes data/augment/demo_generator.jsonl (always the same bytes)
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "data"))
import build_demo_data as demo  # noqa: E402  (builds both worlds in memory, deterministically; writes nothing)

OUT = ROOT / "data" / "augment" / "demo_generator.jsonl"
PROMPTS = ROOT / "conf" / "augment" / "prompts" / "ja"
DRILLS_PER_STATEMENT = 2  # made-up variants of each public statement

# Made-up people draw on the name pools minus every name the factory uses.
_DOMAIN_PEOPLE = [n for n in demo.domain.names if any(n.startswith(f) for f in demo.FAMILY_NAMES)]
FAMILIES = [f for f in demo.FAMILY_NAMES if f not in _DOMAIN_PEOPLE]
GIVENS = [g for g in demo.GIVEN_NAMES if not any(n.endswith(g) for n in _DOMAIN_PEOPLE)]
# A value drawn from a list instead of by digits: what the relation's answers are made of.
CHOICES = {"maker": demo.PUBLIC_MAKERS, "role": demo.ROLES, "department": demo.DEPARTMENTS,
           "protective_gear": demo.GEAR}


def _digits(rng: random.Random, s: str) -> str:
    """Every run of digits replaced by random digits of the same length (no leading zero)."""
    return re.sub(r"\d+", lambda m: str(rng.randint(10 ** (len(m.group()) - 1), 10 ** len(m.group()) - 1)), s)


def _person(rng: random.Random) -> str:
    return rng.choice(FAMILIES) + rng.choice(GIVENS)


def made_up(f: dict, rng: random.Random) -> dict:
    """A copy of public fact `f` about a made-up entity with a made-up answer of the same shape."""
    entity = _person(rng) if f["kind"] == "person" else _digits(rng, f["entity"])
    rel = f["relation"]
    if rel == "manager":
        answer = _person(rng)
    elif rel == "incident_date":
        answer = f"{rng.randint(2005, 2029)}年{rng.randint(1, 12)}月{rng.randint(1, 28)}日"
    elif rel in CHOICES:
        answer = rng.choice(CHOICES[rel])
    else:
        answer = _digits(rng, f["answer"])
    return {**f, "entity": entity, "answer": answer}


def records() -> list:
    rng = random.Random(0)
    qa = (PROMPTS / "qa.txt").read_text(encoding="utf-8").strip()
    rows = []

    def row(t: str, f: dict) -> dict:
        question = demo.render(rng.choice(demo.RELATIONS[f["relation"]]["questions"]), f)
        return {"messages": [{"role": "user", "content": qa.format(passage=demo.render(t, f))},
                             {"role": "assistant", "content": f"質問: {question}\n答え: {f['answer']}"}]}

    for f in demo.public.facts:
        for t in demo.RELATIONS[f["relation"]]["statements"]:
            rows.append(row(t, f))
            for _ in range(DRILLS_PER_STATEMENT):
                while True:  # a made-up name may contain a factory name ("CNC-37" holds "CNC-3"): draw again
                    r = row(t, made_up(f, rng))
                    if not any(n in json.dumps(r, ensure_ascii=False) for n in demo.domain.names):
                        break
                rows.append(r)
    rng.shuffle(rows)
    return rows


def main() -> None:
    rows = records()
    # no factory (domain world) name may reach the generator's training data
    text = json.dumps(rows, ensure_ascii=False)
    leaked = [n for n in demo.domain.names if n in text]
    assert not leaked, f"domain names in the generator data: {leaked[:5]}"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{OUT}: {len(rows)} records from {len(demo.public.facts)} public facts and their made-up variants")


if __name__ == "__main__":
    main()
