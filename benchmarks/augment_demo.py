"""Does augmentation make the demo's facts answerable? CPT with and without the augment stage, at the same CPT steps.

    python benchmarks/augment_demo.py                              # 3 seeds x 2 arms, the recipe's CPT length
    python benchmarks/augment_demo.py --seeds 1,2,3 --cpt-steps 200 --out docs/augmentation_demo.md
    python benchmarks/augment_demo.py --smollm2 --seeds 1,2,3      # SmolLM2-135M-Instruct on the English corpus

Each seed runs the demo twice through the real command line, `stages=[cpt,merge,sft,eval]` (plain) and
`stages=[augment,cpt,merge,sft,eval]` (augmented), with the same `cpt.max_steps`, so both arms train on the same
number of tokens: the augmented arm reads its originals fewer times, in exchange for the generated text. The
augmentation itself is generated once (`augment.seed=0`) and reused by every seed from the stage cache; the seeds
vary CPT's and SFT's initialisation and data order. Everything goes to a cache and run directories under --root.

Prints, per model (cpt, sft) and question group (faq, text_only, all), each arm's `contains` as the mean over seeds
and the augmented-minus-plain difference, paired by seed, with a 95% t-interval over the seeds' differences (with 3
seeds: mean ± 4.30 × SD/√3). The augment stage's counts (kept, dropped per filter) come from its stats.

`--smollm2` runs the same comparison where a generator can rewrite: SmolLM2-135M-Instruct (`python -m
pipeline.smollm2`) both writes the augmentation and is trained, on the English corpus `data/augment/english/` (two
short documents, each fact stated once) and its QA set `data/augment/english_qa.jsonl` (21 questions). It has no
English SFT data, so it runs `stages=[cpt,merge,eval]` and compares the CPT models.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("faq", "text_only", None)  # None: all questions

# --smollm2: every override of both arms. The generator writes other wordings, relations and summaries (its `qa`
# replies were 22 of 24 a question without an answer line); CPT at a LoRA learning rate that learns 270 tokens in
# 60 steps; base and CPT models asked in the English completion format CPT's QA template also uses.
SMOLLM2 = ["model=smollm2_135m", "model.path=outputs/smollm2-135m-instruct", "model.max_seq_length=128",
           "data.cpt.path=data/augment/english", "data.qa.path=data/augment/english_qa.jsonl",
           "data.general_qa.path=null", "data.heldout.path=null", "device=cpu",
           "augment.generator_path=outputs/smollm2-135m-instruct", "augment.language=en",
           "augment.strategies={qa:0,rewrite:4,relations:4,summary:2}", "augment.passage_tokens=48",
           "augment.max_new_tokens=128", "augment.batch_size=16",
           "cpt.r=16", "cpt.lora_alpha=32", "cpt.use_rslora=false", "cpt.learning_rate=1e-3", "cpt.batch_size=4",
           "cpt.gradient_accumulation_steps=1", 'cpt.qa_template="Question: {question}\nAnswer: {answer}"',
           'eval.completion_prompt="Question: {question}\nAnswer:"', "eval.max_new_tokens=32"]


def run(arm: str, seed: int, args) -> dict:
    run_dir = Path(args.root) / arm / f"seed{seed}"
    if (run_dir / "metrics.json").is_file():
        return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    after = "cpt,merge,eval" if args.smollm2 else "cpt,merge,sft,eval"
    stages = f"[augment,{after}]" if arm == "augmented" else f"[{after}]"
    cmd = [sys.executable, "-m", "pipeline.run", f"stages={stages}", f"seed={seed}", "augment.seed=0",
           f"cpt.max_steps={args.cpt_steps}", f"cache.dir={Path(args.root) / 'cache'}", f"hydra.run.dir={run_dir}",
           *(SMOLLM2 if args.smollm2 else []), *args.extra]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{arm} seed {seed} failed ({' '.join(cmd[2:])}):\n{r.stderr[-3000:]}")
    print(f"{arm:9} seed {seed}: {time.time() - t0:6.0f} s", flush=True)
    return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))


def interval(diffs: list) -> tuple:
    """Mean and 95% t-interval of the per-seed differences."""
    import numpy as np
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return float(d.mean()), float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def _each(values: list) -> str:
    return ", ".join(f"{x:.3f}" for x in values)


def table(results: dict, seeds: list) -> str:
    """One row per model and question group present in the runs' metrics (the SmolLM2 run has no SFT model and one
    group): the base model, each arm's mean and per-seed values, and the paired difference with its interval."""
    first = results["plain"][seeds[0]]
    lines = ["| model | questions | base | plain: mean (per seed) | augmented: mean (per seed) | "
             "augmented − plain [95% t-interval over seeds] |", "|---|---|---|---|---|---|"]
    for model in ("cpt", "sft"):
        for group in GROUPS:
            key = f"{model}/contains" + (f"@{group}" if group else "")
            if key not in first:
                continue
            plain = [results["plain"][s][key] for s in seeds]
            aug = [results["augmented"][s][key] for s in seeds]
            base = first.get("base/contains" + (f"@{group}" if group else ""), float("nan"))
            mean, lo, hi = interval([a - p for a, p in zip(aug, plain)])
            lines.append(f"| {model} | {group or 'all'} | {base:.3f} | {sum(plain) / len(plain):.3f} ({_each(plain)}) | "
                         f"{sum(aug) / len(aug):.3f} ({_each(aug)}) | {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    return "\n".join(lines)


def augment_counts(metrics: dict) -> str:
    keys = sorted(k for k in metrics if k.startswith("augment/"))
    return "\n".join(f"  {k}: {metrics[k]}" for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct on the English corpus "
                        "(generator and trained model), CPT models compared")
    parser.add_argument("--cpt-steps", type=int, help="cpt.max_steps of both arms (default 525: the demo recipe's "
                        "60 epochs of the plain corpus; with --smollm2 60: 80 epochs of its 270 tokens)")
    parser.add_argument("--root", help="runs and their cache (default outputs/augment_demo[_smollm2])")
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    parser.add_argument("extra", nargs="*", help="more overrides for every run, e.g. eval.max_questions=60")
    args = parser.parse_args()
    args.cpt_steps = args.cpt_steps or (60 if args.smollm2 else 525)
    args.root = args.root or str(ROOT / "outputs" / ("augment_demo_smollm2" if args.smollm2 else "augment_demo"))
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {arm: {s: run(arm, s, args) for s in seeds} for arm in ("plain", "augmented")}
    text = (f"cpt.max_steps={args.cpt_steps}, seeds {seeds} (`seed`: CPT's initialisation and data order; the "
            f"augmentation generated once, augment.seed=0), contains:\n\n{table(results, seeds)}\n\n"
            f"augment stage (seed 0, shared by every seed):\n{augment_counts(results['augmented'][seeds[0]])}\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
