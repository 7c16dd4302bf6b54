"""Does augmentation make the demo's facts answerable? CPT with and without the augment stage, at the same CPT steps.

    python benchmarks/augment_demo.py                              # 3 seeds x 2 arms, the recipe's CPT length
    python benchmarks/augment_demo.py --seeds 1,2,3 --cpt-steps 200 --out docs/augmentation_demo.md

Each seed runs the demo twice through the real command line, `stages=[cpt,merge,sft,eval]` (plain) and
`stages=[augment,cpt,merge,sft,eval]` (augmented), with the same `cpt.max_steps`, so both arms train on the same
number of tokens: the augmented arm reads its originals fewer times, in exchange for the generated text. The
augmentation itself is generated once (`augment.seed=0`) and reused by every seed from the stage cache; the seeds
vary CPT's and SFT's initialisation and data order. Everything goes to a cache and run directories under --root.

Prints, per model (cpt, sft) and question group (faq, text_only, all), each arm's `contains` as the mean over seeds
and the augmented-minus-plain difference, paired by seed, with a 95% t-interval over the seeds' differences (with 3
seeds: mean ± 4.30 × SD/√3). The augment stage's counts (kept, dropped per filter) come from its stats.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("faq", "text_only", None)  # None: all questions


def run(arm: str, seed: int, args) -> dict:
    run_dir = Path(args.root) / arm / f"seed{seed}"
    if (run_dir / "metrics.json").is_file():
        return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    stages = "[augment,cpt,merge,sft,eval]" if arm == "augmented" else "[cpt,merge,sft,eval]"
    cmd = [sys.executable, "-m", "pipeline.run", f"stages={stages}", f"seed={seed}", "augment.seed=0",
           f"cpt.max_steps={args.cpt_steps}", f"cache.dir={Path(args.root) / 'cache'}", f"hydra.run.dir={run_dir}",
           *args.extra]
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


def table(results: dict, seeds: list) -> str:
    lines = ["| model | questions | plain (mean over seeds) | augmented | augmented − plain [95% interval] |",
             "|---|---|---|---|---|"]
    for model in ("cpt", "sft"):
        for group in GROUPS:
            key = f"{model}/contains" + (f"@{group}" if group else "")
            plain = [results["plain"][s][key] for s in seeds]
            aug = [results["augmented"][s][key] for s in seeds]
            mean, lo, hi = interval([a - p for a, p in zip(aug, plain)])
            lines.append(f"| {model} | {group or 'all'} | {sum(plain) / len(plain):.3f} | {sum(aug) / len(aug):.3f} | "
                         f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    return "\n".join(lines)


def augment_counts(metrics: dict) -> str:
    keys = sorted(k for k in metrics if k.startswith("augment/"))
    return "\n".join(f"  {k}: {metrics[k]}" for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--cpt-steps", type=int, default=525, help="cpt.max_steps of both arms (525: the demo "
                        "recipe's 60 epochs of the plain corpus)")
    parser.add_argument("--root", default=str(ROOT / "outputs" / "augment_demo"))
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    parser.add_argument("extra", nargs="*", help="more overrides for every run, e.g. eval.max_questions=60")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {arm: {s: run(arm, s, args) for s in seeds} for arm in ("plain", "augmented")}
    text = (f"cpt.max_steps={args.cpt_steps}, seeds {seeds}, contains:\n\n{table(results, seeds)}\n\n"
            f"augment stage (seed 0, shared by every seed):\n{augment_counts(results['augmented'][seeds[0]])}\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
