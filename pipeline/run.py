"""The pipeline entry point: compose conf/ with Hydra and run CPT → merge → SFT → eval.

    python -m pipeline.run                                   # the offline demo, all four stages
    python -m pipeline.run stages=[cpt,merge]                # a prefix of the chain
    python -m pipeline.run stages=[sft,eval] inputs.cpt_model=outputs/runs/<run>/cpt_model
    python -m pipeline.run -m cpt.lora_alpha=32,128 sft.lora_alpha=8,32 sft.target_modules=attn_mlp,attn

Each stage is a plain function of its config section and input paths that returns its output path; this file only
decides which stages run, checks every input before any training starts, and writes the run's summary.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

import pipeline  # noqa: F401  (sets the offline environment before any Hugging Face import)

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .backend import activate, resolve_backend, unsloth_blockers
from .cache import StageCache, fingerprint_files, fingerprint_model, stage_key
from .common import (PipelineError, check_4bit_support, check_model_dir, declared_tied, is_complete, is_prequantized,
                     load_tokenizer, resolve_device, resolve_dtype, write_json)
from .config import EvalConfig, MergeConfig, flat_config, typed
from .data import CPT_SUFFIXES, resolve_files
from .eval import TRANSITIONS
from .sft import chat_template_text

log = logging.getLogger("pipeline.run")

STAGES = ("cpt", "merge", "sft", "eval")
# What each stage consumes, and the inputs.* key that supplies it when the producing stage is not run.
NEEDS = {"merge": "cpt_adapter", "sft": "cpt_model"}


def _quiet_libraries() -> None:
    import warnings

    import datasets
    import transformers

    # transformers 5 renamed gradient_checkpointing; TRL and PEFT still use the old name internally.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)

    # bitsandbytes' CPU backend looks for an optional faster nf4 kernel from the Hub's `kernels` package at import
    # and warns on every run without it; offline it could not be fetched anyway, and the built-in kernel is used.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()  # per-load "Loading weights" bars; training progress stays
    datasets.disable_progress_bars()


def _stage_list(cfg: DictConfig) -> list:
    stages = list(cfg.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise PipelineError(f"stages={stages}: use a non-empty subset of {list(STAGES)}")
    if stages != [s for s in STAGES if s in stages]:
        raise PipelineError(f"stages={stages}: stages run in the order {list(STAGES)}")
    return stages


def _require(path: Optional[str], key: str, stage: str) -> str:
    """The completed output directory that `stage` reads (from this run, or from inputs.<key>)."""
    producer = {"cpt_adapter": "cpt", "cpt_model": "merge", "sft_adapter": "sft"}[key]
    if not path:
        raise PipelineError(f"stage {stage} needs a {key.replace('_', ' ')}: add {producer} to stages or set "
                            f"inputs.{key}=PATH")
    if not Path(path).is_dir():
        raise PipelineError(f"inputs.{key}={path}: no such directory")
    if not is_complete(path):
        raise PipelineError(f"inputs.{key}={path}: not a completed stage output (no .complete marker)")
    return path


def validate(cfg: DictConfig, stages: list, backend: str = "hf") -> None:
    """Check every input the requested stages will read, so bad input fails before minutes of training."""
    from .data import load_cpt_documents, load_qa, load_sft_records
    from .modules import add_tokens, embedding_rows, is_tied, meta_model, resolve_targets
    from .scoring import HEADLINE_METRICS

    model_cfg, data_cfg, ev = typed(cfg, "model"), typed(cfg, "data"), typed(cfg, "eval")
    for s in ("cpt", "merge", "sft"):
        typed(cfg, s)
    if "cpt" in stages:
        load_cpt_documents(data_cfg.cpt.path, data_cfg.cpt.text_field)
    if "sft" in stages:
        load_sft_records(data_cfg.sft.path)
    if "eval" in stages:
        load_qa(data_cfg.qa.path)
        if data_cfg.general_qa.path:
            load_qa(data_cfg.general_qa.path, key="data.general_qa.path")
        if data_cfg.heldout.path:
            load_cpt_documents(data_cfg.heldout.path, data_cfg.heldout.text_field, key="data.heldout.path")
        if ev.judge_path:
            check_model_dir(ev.judge_path, key="eval.judge_path")
        if ev.expected_format:
            try:
                re.compile(ev.expected_format)
            except re.error as e:
                raise PipelineError(f"eval.expected_format={ev.expected_format!r}: not a valid regex ({e})") from None
        if ev.headline_metric not in HEADLINE_METRICS:
            raise PipelineError(f"eval.headline_metric={ev.headline_metric!r}: use one of "
                                f"{', '.join(HEADLINE_METRICS)}")
        bad = [m for m in ev.models if m not in ("base", "cpt", "sft")]
        if bad:
            raise PipelineError(f"eval.models: unknown model(s) {bad}; use base, cpt, sft")
        has_cpt = "merge" in stages or cfg.inputs.get("cpt_model")
        has_sft = "sft" in stages or cfg.inputs.get("sft_adapter")
        available = {"base"} | ({"cpt"} if has_cpt else set()) | ({"sft"} if has_cpt and has_sft else set())
        if not set(ev.models) & available:
            raise PipelineError(f"eval.models={list(ev.models)}: none of these models is available in this run "
                                f"(available: {sorted(available)}; add stages or set inputs.cpt_model)")
        if cfg.inputs.get("sft_adapter") and not has_cpt:
            raise PipelineError("inputs.sft_adapter is set but there is no CPT model to load it on: set "
                                "inputs.cpt_model (the model the adapter was trained on) or run merge")
    for key in ("cpt_adapter", "cpt_model", "sft_adapter"):
        if cfg.inputs.get(key):
            _require(cfg.inputs.get(key), key, "eval")
    for stage, key in NEEDS.items():
        if stage in stages and STAGES[STAGES.index(stage) - 1] not in stages:
            _require(cfg.inputs.get(key), key, stage)
    if "sft" in stages or "eval" in stages:
        chat_template_text(model_cfg.chat_template)  # a missing .jinja file is an error, not a template
    if model_cfg.load_in_4bit and ("cpt" in stages or "sft" in stages):
        check_4bit_support(resolve_device(str(cfg.device)))
    if not (model_cfg.build_demo_if_missing and not Path(model_cfg.path).exists()):
        check_model_dir(model_cfg.path)
        meta = meta_model(model_cfg.path, model_cfg.trust_remote_code)
        if model_cfg.tied_embeddings is not None and is_tied(meta) != model_cfg.tied_embeddings:
            raise PipelineError(f"model.tied_embeddings={str(model_cfg.tied_embeddings).lower()} but the checkpoint "
                                f"at model.path={model_cfg.path} has {'tied' if is_tied(meta) else 'untied'} "
                                f"embeddings: is this the model family the config was written for?")
        if "merge" in stages and is_prequantized(model_cfg.path):
            raise PipelineError(f"model.path={model_cfg.path}: a pre-quantized checkpoint; the merge needs the 16-bit "
                                f"weights (point model.path at the 16-bit model; model.load_in_4bit=true trains in "
                                f"4-bit)")
        if "cpt" in stages:
            resolve_targets(cfg.cpt.target_modules, meta, model_cfg.modules, key="cpt.target_modules")
            add_tokens(load_tokenizer(model_cfg.path, model_cfg.trust_remote_code), model_cfg.add_special_tokens,
                       embedding_rows(meta), f"model.path={model_cfg.path}")
        if "sft" in stages:
            resolve_targets(cfg.sft.target_modules, meta, model_cfg.modules, key="sft.target_modules")
        if backend == "unsloth":  # config.json may not have said whether the embeddings are tied; the model does
            blockers = unsloth_blockers(model_cfg, stages, cfg.cpt.target_modules, cfg.sft.target_modules,
                                        is_tied(meta))
            if blockers:
                raise PipelineError(f"backend={cfg.backend} chose unsloth, which cannot run with {blockers[0]}; use "
                                    f"backend=hf")


def _settings(section) -> dict:
    """A stage's settings as they enter its cache key: without those that change only how it runs or reports."""
    d = asdict(section)
    d.pop("logging_steps", None)
    if isinstance(section, MergeConfig):  # the check's tolerances decide pass/fail, not the merged weights
        for k in ("max_abs_logit_diff", "rel_logit_diff", "check_tokens"):
            d.pop(k, None)
    if isinstance(section, EvalConfig):
        d.pop("batch_size", None)  # batched and one-at-a-time greedy answers agree in fp32 (benchmarks/batched_eval.py)
    return d


def _optional_fingerprint(spec: Optional[str], key: str, suffixes: tuple) -> Optional[str]:
    return fingerprint_files(resolve_files(spec, key, suffixes)) if spec else None


def run_pipeline(cfg: DictConfig, run_dir: str | Path) -> Dict:
    """Run the configured stages into `run_dir`; returns the metrics written to metrics.json."""
    from . import cpt, merge, sft
    from . import eval as evaluation
    from .demo_model import ensure_demo_model

    seed, device = int(cfg.seed), str(cfg.device)
    stages = _stage_list(cfg)
    # Before any Hugging Face import: unsloth patches transformers, PEFT and TRL when it is imported first. So what
    # unsloth cannot train is judged from the config and config.json alone here, and against the model in validate.
    model_cfg = typed(cfg, "model")
    tied = declared_tied(model_cfg.path)
    blockers = unsloth_blockers(model_cfg, stages, cfg.cpt.target_modules, cfg.sft.target_modules,
                                model_cfg.tied_embeddings if tied is None else tied)
    backend = resolve_backend(str(cfg.backend), resolve_device(device), blockers)
    activate(backend)
    _quiet_libraries()
    log.info("backend: %s (backend=%s, device=%s)", backend, cfg.backend, resolve_device(device))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    validate(cfg, stages, backend)
    data_cfg = typed(cfg, "data")
    if model_cfg.build_demo_if_missing:
        ensure_demo_model(model_cfg.demo, model_cfg.path, model_cfg.max_seq_length)
        validate(cfg, stages, backend)  # now the target modules can be checked against the built model
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")

    paths: Dict[str, Optional[str]] = {k: cfg.inputs.get(k) for k in ("cpt_adapter", "cpt_model", "sft_adapter")}
    cache = StageCache(cfg.cache.dir, bool(cfg.cache.enabled))
    record: Dict[str, object] = {"backend_used": backend}  # + time/<stage>, stage/<stage> (built|reused), key/<stage>

    def run_stage(name: str, link: str, material: dict, build) -> str:
        """Build (or reuse) one stage's output; the run directory gets it as `link` (a symlink into the cache)."""
        key = stage_key(name, material)
        log.info("== stage %s (key %s) ==", name, key)
        t0 = time.time()
        if cache.enabled:
            out, reused = cache.get_or_build(name, key, build, material)
            target = run_dir / link
            if target.is_symlink():
                target.unlink()
            target.symlink_to(out, target_is_directory=True)
        else:
            out, reused = Path(build(run_dir / link)), False
        record.update({f"time/{name}": round(time.time() - t0, 2), f"stage/{name}": "reused" if reused else "built",
                       f"key/{name}": key})
        log.info("== stage %s %s in %.1fs: %s", name, "REUSED" if reused else "built", time.time() - t0, out)
        return str(out)

    def identity(stage: str, key: str) -> str:
        """What a downstream key depends on: this run's key for the producing stage, else the input's identity."""
        return record.get(f"key/{stage}") or fingerprint_model(paths[key])

    base_id = fingerprint_model(model_cfg.path)
    # The resolved dtype, not "auto": a CPU (fp32) result is not a GPU (bf16) result. The device itself is not keyed.
    dtype = str(resolve_dtype(model_cfg.dtype, resolve_device(device))).replace("torch.", "")
    model_settings = {"base": base_id, "dtype": dtype, "max_seq_length": model_cfg.max_seq_length,
                      "modules": model_cfg.modules, "trust_remote_code": model_cfg.trust_remote_code,
                      "load_in_4bit": model_cfg.load_in_4bit, "add_special_tokens": model_cfg.add_special_tokens,
                      "backend": backend}  # unsloth's kernels give other numbers than the plain path
    template = {"prompt_template": model_cfg.prompt_template, "chat_template": chat_template_text(model_cfg.chat_template)}

    if "cpt" in stages:
        c = typed(cfg, "cpt")
        material = {**model_settings, "cpt": _settings(c), "seed": seed, "text_field": data_cfg.cpt.text_field,
                    "data": fingerprint_files(resolve_files(data_cfg.cpt.path, "data.cpt.path", CPT_SUFFIXES))}
        paths["cpt_adapter"] = run_stage("cpt", "cpt_adapter", material, lambda out: cpt.train_cpt(
            c, model_cfg, data_cfg.cpt, seed, out, device, backend))
    if "merge" in stages:
        m, adapter = typed(cfg, "merge"), _require(paths["cpt_adapter"], "cpt_adapter", "merge")
        material = {"base": base_id, "cpt": identity("cpt", "cpt_adapter"), "merge": _settings(m)}
        paths["cpt_model"] = run_stage("merge", "cpt_model", material, lambda out: merge.merge_adapter(
            m, model_cfg, adapter, out, device))
    if "sft" in stages:
        s_cfg, cpt_model = typed(cfg, "sft"), _require(paths["cpt_model"], "cpt_model", "sft")
        material = {**model_settings, **template, "cpt_model": identity("merge", "cpt_model"),
                    "sft": _settings(s_cfg), "seed": seed,
                    "data": fingerprint_files(resolve_files(data_cfg.sft.path, "data.sft.path", (".jsonl",)))}
        paths["sft_adapter"] = run_stage("sft", "sft_adapter", material, lambda out: sft.train_sft(
            s_cfg, model_cfg, data_cfg.sft, cpt_model, seed, out, device, backend))
    if "eval" in stages:
        ev = typed(cfg, "eval")
        models = {"base": (model_cfg.path, None)}
        if paths["cpt_model"]:
            models["cpt"] = (paths["cpt_model"], None)
            if paths["sft_adapter"]:
                models["sft"] = (paths["cpt_model"], paths["sft_adapter"])
        models = {k: v for k, v in models.items() if k in ev.models}
        material = {**model_settings, **template, "eval": _settings(ev), "models": sorted(models),
                    "cpt_model": identity("merge", "cpt_model") if {"cpt", "sft"} & set(models) else None,
                    "sft_adapter": identity("sft", "sft_adapter") if "sft" in models else None,
                    "qa": fingerprint_files(resolve_files(data_cfg.qa.path, "data.qa.path", (".jsonl",))),
                    "general_qa": _optional_fingerprint(data_cfg.general_qa.path, "data.general_qa.path", (".jsonl",)),
                    "heldout": _optional_fingerprint(data_cfg.heldout.path, "data.heldout.path", CPT_SUFFIXES),
                    "judge": fingerprint_model(ev.judge_path) if ev.judge_path else None}
        eval_dir = Path(run_stage("eval", "eval", material, lambda out: evaluation.evaluate(
            ev, model_cfg, data_cfg.qa.path, models, out, device, data_cfg.general_qa.path, data_cfg.heldout.path,
            backend)))
        for name in ("answers.jsonl", "lost_questions.jsonl"):
            shutil.copyfile(eval_dir / name, run_dir / name)
        metrics = json.loads((eval_dir / "eval_metrics.json").read_text(encoding="utf-8"))
    else:
        metrics = {}
    metrics.update(record)
    metrics.update(merge_metrics(paths["cpt_model"]))
    metrics.update({k: v for k, v in paths.items() if v})
    metrics.update(flat_config(cfg))
    write_json(run_dir / "metrics.json", metrics)
    if "eval" in stages:
        print(format_table(metrics))
    return metrics


def merge_metrics(cpt_model: Optional[str]) -> Dict:
    """The merge verification of the CPT model in use, as flat metrics (merge/...)."""
    check_file = Path(cpt_model) / "merge_check.json" if cpt_model else None
    if not check_file or not check_file.is_file():
        return {}
    check = json.loads(check_file.read_text(encoding="utf-8"))
    out = {f"merge/{k}": check.get(k) for k in ("max_abs_logit_diff", "tolerance", "reload_max_abs_logit_diff")}
    for k, v in (check.get("quantized_training_drift") or {}).items():
        if isinstance(v, (int, float)):  # not the reason when it could not be measured (merge_check.json has it)
            out[f"merge/4bit_{k}"] = v
    return out


def format_table(metrics: Dict) -> str:
    """The compact end-of-run table: one row per evaluated model, then gain and retention."""
    import pandas as pd

    cols = ["exact_match", "contains", "char_f1", "logprob", "eos_rate"]
    rows = {k: {c: metrics.get(f"{k}/{c}") for c in cols} for k in ("base", "cpt", "sft")
            if f"{k}/contains" in metrics}
    if not rows:
        return "\n(no model was evaluated)\n"
    table = pd.DataFrame.from_dict(rows, orient="index")[cols]
    for col in ("general_contains", "heldout_ppl", "judge"):  # present only when configured
        if any(f"{k}/{col}" in metrics for k in rows):
            table[col] = [metrics.get(f"{k}/{col}") for k in rows]

    def fmt(v):
        return "-" if v is None else f"{v:+.3f}" if isinstance(v, float) else str(v)

    text = table.to_string(float_format=lambda x: f"{x:.3f}", na_rep="-")
    if "transitions/learned_lost" in metrics:
        text += "\n\nper question (contains): " + ", ".join(
            f"{t} {metrics[f'transitions/{t}']}" for t in TRANSITIONS)
    h = metrics.get("headline_metric")
    groups = sorted({k.split("@", 1)[1] for k in metrics if "@" in k})
    if groups:
        per_group = pd.DataFrame({g: {k: metrics.get(f"{k}/{h}@{g}") for k in rows} for g in groups})
        text += f"\n\n{h} by question group:\n" + per_group.to_string(float_format=lambda x: f"{x:.3f}", na_rep="-")
    return (f"\n{text}\n\nheadline {h}: knowledge_gain (cpt - base) {fmt(metrics.get('knowledge_gain'))}, "
            f"retention (sft / cpt) {fmt(metrics.get('retention'))}; logprob gain {fmt(metrics.get('logprob_gain'))}"
            f", share of it kept after SFT {fmt(metrics.get('logprob_gain_kept'))}\n")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> Optional[float]:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        metrics = run_pipeline(cfg, run_dir)
    except BaseException as e:
        # The sweep table reports failed jobs with this one line (python -m pipeline.aggregate SWEEP_DIR).
        first_line = (str(e).strip().splitlines() or [""])[0]
        (run_dir / "error.txt").write_text(f"{type(e).__name__}: {first_line}\n", encoding="utf-8")
        if not isinstance(e, PipelineError) or cfg.get("debug"):
            raise
        print(f"error: {e}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return None  # the other cells still run; the sweep's table lists this one as failed and exits 1
        sys.exit(2)
    log.info("run directory: %s", run_dir)
    return metrics.get("retention")


if __name__ == "__main__":
    main()
