"""How host memory and time grow with model size: each stage on random-weight Llama checkpoints of three sizes.

    python benchmarks/scale.py                       # 30m and 270m: about 6 minutes on 2 CPU cores
    python benchmarks/scale.py --sizes 1b            # llm-jp-3-1.8b's shape (1.87B parameters): CPT needs ~18 GB
    python benchmarks/scale.py --sizes 270m --stages merge --dtype float32

Each size is a Llama built offline from its config (random weights, a byte-level BPE tokenizer trained on the demo
text; the embedding matrix keeps the size's full vocabulary, as a real tokenizer's would) and saved in `--dtype`
(bfloat16 by default, as llm-jp-3 and most released checkpoints are). Every stage then runs as its own
`python -m pipeline.run stages=[<stage>]` process, reading the previous stage's output through inputs.*, with a few
steps of CPT/SFT and a few eval questions: the memory a stage needs depends on the model, not on how long it trains.
The peak resident set size of each stage's process (os.wait4's ru_maxrss) is reported as a multiple of the
model's float32 size, the copy that training and the merge's verification hold on a CPU. The peak of CPT is also
measured with cpt.num_epochs 1 and 60 (same max_steps): the training data must not grow with the epoch count.

`--pipeline-root DIR` runs another copy of the package (DIR holds `pipeline/` and `conf/`), e.g. an older commit
unpacked with `git archive <commit> pipeline conf | tar -x -C DIR`, to compare a change on the same checkpoints.
Checkpoints and stage outputs stay in `--workdir` (reused by later invocations); delete it when done.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Llama shapes. 270m is the size the merge's memory was first measured on; 1b is llm-jp-3-1.8b's architecture.
SIZES = {
    "30m": dict(hidden_size=384, num_hidden_layers=6, intermediate_size=1024, num_attention_heads=6, vocab_size=32000),
    "270m": dict(hidden_size=1024, num_hidden_layers=16, intermediate_size=2816, num_attention_heads=16,
                 vocab_size=32000),
    "1b": dict(hidden_size=2048, num_hidden_layers=24, intermediate_size=7168, num_attention_heads=16,
               vocab_size=99584),
}
STAGES = ("cpt", "merge", "sft", "eval", "export")
GB = 1e9


def build_checkpoint(size: str, out: Path, dtype: str) -> Path:
    """A random-weight Llama of `size` with the demo-text tokenizer, saved as a normal HF checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.demo_model import train_tokenizer

    if (out / "config.json").is_file():
        return out
    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "data" / "cpt").glob("*.md"))]
    texts += [line for line in (ROOT / "data" / "sft" / "chat.jsonl").read_text(encoding="utf-8").splitlines()]
    tok = train_tokenizer(texts, vocab_size=4000)
    shape = SIZES[size]
    cfg = LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    tmp = out.with_name(out.name + ".tmp")
    # 2 GB shards: the 1b checkpoint is sharded (with an index), as released checkpoints of that size are
    model.save_pretrained(tmp, max_shard_size="2GB")
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def parameters(checkpoint: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                n = 1
                for d in s.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def run_stage(root: Path, run_dir: Path, overrides: list, log: Path) -> dict:
    """One `python -m pipeline.run` process; its wall time and peak RSS (wait4: the process and its children)."""
    cmd = [sys.executable, "-m", "pipeline.run", f"hydra.run.dir={run_dir}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(root)}
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so that Popen does not wait for it again
    seconds = time.time() - t0
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        sys.exit(f"stage failed ({' '.join(overrides)}), exit {proc.returncode}; log {log}:\n{tail}")
    return {"peak_bytes": usage.ru_maxrss * 1024, "seconds": round(seconds, 1)}  # ru_maxrss is in KiB on Linux


def import_baseline(root: Path) -> int:
    """Peak RSS of a process that only imports what a stage imports: the part of every peak no model causes."""
    code = ("import pipeline.run, pipeline.stages.cpt, pipeline.stages.merge, pipeline.stages.sft, "
            "pipeline.stages.eval, pipeline.stages.export, peft, trl")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024


def common_overrides(checkpoint: Path, args) -> list:
    ov = [f"model.path={checkpoint}", "model.build_demo_if_missing=false", "model.max_seq_length=64",
          f"data.cpt.path={ROOT / 'data' / 'cpt'}", f"data.sft.path={ROOT / 'data' / 'sft' / 'chat.jsonl'}",
          f"data.qa.path={ROOT / 'eval_sets' / 'qa.jsonl'}", "data.general_qa.path=null", "data.heldout.path=null",
          "cache.enabled=false", "device=cpu", "backend=hf",
          f"cpt.max_steps={args.steps}", "cpt.batch_size=1", f"sft.max_steps={args.steps}", "sft.batch_size=1",
          f"eval.max_questions={args.questions}", "eval.max_new_tokens=8",
          # LoRA settings pinned, so that the figures do not move with the defaults
          "cpt.r=16", "cpt.lora_alpha=32", "cpt.use_rslora=false", f"cpt.target_modules={args.cpt_targets}",
          "sft.r=16", "sft.lora_alpha=32", "sft.use_rslora=false", "sft.target_modules=attn_mlp"]
    return ov


def bench_size(size: str, args, work: Path, baseline: int) -> dict:
    t0 = time.time()
    checkpoint = build_checkpoint(size, work / f"{size}-{args.dtype}", args.dtype)
    n = parameters(checkpoint)
    fp32 = 4 * n
    print(f"\n{size}: {n / 1e6:,.0f}M parameters, float32 {fp32 / GB:.2f} GB, checkpoint {args.dtype} "
          f"(built/found in {time.time() - t0:.0f}s)", flush=True)
    runs = work / f"runs-{size}-{args.dtype}-{args.tag}"
    runs.mkdir(parents=True, exist_ok=True)
    root = Path(args.pipeline_root).resolve()
    ov = common_overrides(checkpoint, args)
    inputs = {"merge": [f"inputs.cpt_adapter={runs / 'cpt' / 'cpt_adapter'}"],
              "sft": [f"inputs.cpt_model={runs / 'merge' / 'cpt_model'}"],
              "eval": [f"inputs.cpt_model={runs / 'merge' / 'cpt_model'}",
                       f"inputs.sft_adapter={runs / 'sft' / 'sft_adapter'}"],
              # the final merge into one checkpoint, in the checkpoint's dtype (no GGUF: the converter is optional)
              "export": [f"inputs.cpt_model={runs / 'merge' / 'cpt_model'}",
                         f"inputs.sft_adapter={runs / 'sft' / 'sft_adapter'}", "export.gguf=[]"]}
    result = {"size": size, "parameters": n, "fp32_bytes": fp32, "dtype": args.dtype, "stages": {}}
    for stage in args.stages:
        run_dir = runs / stage
        if run_dir.exists():
            shutil.rmtree(run_dir)
        r = run_stage(root, run_dir, ov + [f"stages=[{stage}]"] + inputs.get(stage, []), runs / f"{stage}.log")
        result["stages"][stage] = r
        extra = ""
        if stage == "merge":
            check = json.loads((run_dir / "cpt_model" / "merge_check.json").read_text())
            extra = (f"  (check: max|dlogit| {check['max_abs_logit_diff']:.2g} <= {check['tolerance']:.2g}, "
                     f"file vs expected {check['reload_max_abs_logit_diff']:.2g}, saved {check['save_dtype']})")
        print(f"  {stage:6s} peak {r['peak_bytes'] / GB:6.2f} GB = {r['peak_bytes'] / fp32:4.2f}x fp32 "
              f"({(r['peak_bytes'] - baseline) / fp32:4.2f}x above the imports), {r['seconds']:7.1f} s{extra}",
              flush=True)
    if args.epoch_check:
        result["cpt_epochs"] = {}
        for epochs in (1, 60):
            run_dir = runs / f"cpt-epochs{epochs}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            r = run_stage(root, run_dir, ov + ["stages=[cpt]", f"cpt.num_epochs={epochs}"],
                          runs / f"cpt-epochs{epochs}.log")
            result["cpt_epochs"][epochs] = r
        e1, e60 = result["cpt_epochs"][1], result["cpt_epochs"][60]
        print(f"  cpt peak with num_epochs 1: {e1['peak_bytes'] / GB:.2f} GB, with 60: {e60['peak_bytes'] / GB:.2f} GB "
              f"({e60['peak_bytes'] / e1['peak_bytes']:.2f}x); {e1['seconds']:.0f} s vs {e60['seconds']:.0f} s",
              flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="30m,270m", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in chain order")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                        help="the checkpoints' dtype (merge.save_dtype=auto writes the merge in it)")
    parser.add_argument("--steps", type=int, default=2, help="CPT and SFT optimizer steps")
    parser.add_argument("--questions", type=int, default=4, help="eval.max_questions")
    parser.add_argument("--cpt-targets", default="attn_mlp_embed",
                        help="cpt.target_modules (default: embeddings and head in full, the heavier setting)")
    parser.add_argument("--no-epoch-check", dest="epoch_check", action="store_false",
                        help="skip the CPT runs with num_epochs 1 vs 60")
    parser.add_argument("--pipeline-root", default=str(ROOT), help="directory holding the pipeline/ and conf/ to run")
    parser.add_argument("--tag", default="current", help="names the run directories (e.g. before/after a change)")
    parser.add_argument("--workdir", default="/tmp/keep_knowledge_scale", help="checkpoints and outputs")
    args = parser.parse_args()
    args.stages = [s for s in STAGES if s in args.stages.split(",")]
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        sys.exit(f"--sizes: unknown {unknown}; use {', '.join(SIZES)}")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    import pipeline  # noqa: F401  (offline environment before transformers is imported for the builds)

    baseline = import_baseline(Path(args.pipeline_root).resolve())
    print(f"a stage's imports alone: peak {baseline / GB:.2f} GB", flush=True)
    results = [bench_size(s, args, work, baseline) for s in sizes]
    (work / f"results-{args.tag}.json").write_text(json.dumps({"import_baseline_bytes": baseline, "sizes": results},
                                                               indent=2) + "\n")

    stages = args.stages
    print(f"\npeak host RSS per stage, as a multiple of the model's fp32 size (and of it above the "
          f"{baseline / GB:.2f} GB of imports), and wall time")
    print("\n| size | parameters | fp32 | " + " | ".join(stages) + " |")
    print("|---|---|---|" + "---|" * len(stages))
    for r in results:
        cells = []
        for s in stages:
            peak, fp32 = r["stages"][s]["peak_bytes"], r["fp32_bytes"]
            cells.append(f"{peak / GB:.2f} GB = {peak / fp32:.2f}x ({(peak - baseline) / fp32:.2f}x), "
                         f"{r['stages'][s]['seconds']:.0f} s")
        print(f"| {r['size']} | {r['parameters'] / 1e6:,.0f}M | {r['fp32_bytes'] / GB:.2f} GB | " + " | ".join(cells)
              + " |")


if __name__ == "__main__":
    main()
