"""Batched vs one-at-a-time greedy generation on the demo QA set, in one run: speed and identical answers.

    python benchmarks/batched_eval.py [--model outputs/demo_base_model] [--batch-size 16]

Generates the answers of all 126 demo questions with the completion prompt twice, one question at a time and in
left-padded batches, prints both wall times, their ratio (target >= 4x) and how many answers are identical (target:
all). The demo model is built first if it is missing (not timed).
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402,F401  (offline environment)
import torch  # noqa: E402

from pipeline.core.checkpoints import load_model, load_tokenizer
from pipeline.core.config import EvalConfig
from pipeline.core.data import load_qa
from pipeline.stages.eval import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/demo_base_model")
    parser.add_argument("--qa", default="eval_sets/qa.jsonl")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=EvalConfig().max_new_tokens)
    args = parser.parse_args()
    if args.model == "outputs/demo_base_model" and not (ROOT / args.model / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "pipeline.demo_model"], cwd=ROOT, check=True)
    cpu = torch.device("cpu")
    model = load_model(ROOT / args.model, torch.float32, cpu).eval()
    tok = load_tokenizer(ROOT / args.model)
    cfg = EvalConfig()
    prompts = [cfg.completion_prompt.format(question=q.question) for q in load_qa(str(ROOT / args.qa))]
    stop = [tok.eos_token_id]

    t0 = time.time()
    single = [generate(model, tok, [p], args.max_new_tokens, 1, cpu, stop, cfg.completion_stop)[0] for p in prompts]
    t_single = time.time() - t0
    t0 = time.time()
    batched = generate(model, tok, prompts, args.max_new_tokens, args.batch_size, cpu, stop, cfg.completion_stop)
    t_batched = time.time() - t0

    same = sum(a == b for a, b in zip(single, batched))
    print(f"{len(prompts)} questions, {torch.get_num_threads()} threads, model {args.model}")
    print(f"one at a time: {t_single:6.2f} s")
    print(f"batch of {args.batch_size:3d}:  {t_batched:6.2f} s")
    print(f"speed-up: {t_single / t_batched:.1f}x (target >= 4x); identical answers: {same}/{len(prompts)}")
    for (a, _), (b, _) in [(x, y) for x, y in zip(single, batched) if x != y][:5]:
        print(f"  differs: {a!r} vs {b!r}")


if __name__ == "__main__":
    main()
