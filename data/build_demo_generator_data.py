#!/usr/bin/env python3
"""Training records for the demo's augmentation generator (outputs/demo_generator_model), from the *public* world only.

The demo base model is a 5M-parameter Llama that has never been asked to rewrite anything. A real user's generator is
an instruct model that already follows "write a question about this passage"; the demo's stand-in learns that task
here, on the pretraining world's facts (南風工業 and 西海製作所), and is then applied to the factory's documents,
whose facts it has never seen:

* `qa`: a statement of a fact -> "質問: <a question about it>\\n答え: <its answer>", the question in one of the
  relation's question wordings (the same wordings the pretraining corpus asks public facts in).

Only `qa`: it is the form a small model extracts facts from (the demo's `faq` group), and every other strategy would
cost this 2-core CPU as much again to learn.

The user turn is the strategy's own prompt template (conf/augment/prompts/ja/<strategy>.txt) with the statement as
the passage, so the generator learns exactly the prompts the augment stage sends.

    python data/build_demo_generator_data.py     # writes data/augment/demo_generator.jsonl (always the same bytes)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "data"))
import build_demo_data as demo  # noqa: E402  (builds both worlds in memory, deterministically; writes nothing)

OUT = ROOT / "data" / "augment" / "demo_generator.jsonl"
PROMPTS = ROOT / "conf" / "augment" / "prompts" / "ja"


def records() -> list:
    rng = random.Random(0)
    qa = (PROMPTS / "qa.txt").read_text(encoding="utf-8").strip()
    rows = []
    for f in demo.public.facts:
        spec = demo.RELATIONS[f["relation"]]
        statements = [demo.render(t, f) for t in spec["statements"]]
        for s in statements:
            question = demo.render(rng.choice(spec["questions"]), f)
            rows.append({"messages": [{"role": "user", "content": qa.format(passage=s)},
                                      {"role": "assistant", "content": f"質問: {question}\n答え: {f['answer']}"}]})
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
    print(f"{OUT}: {len(rows)} records from {len(demo.public.facts)} public facts")


if __name__ == "__main__":
    main()
