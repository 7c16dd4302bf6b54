"""The pipeline entry point: compose conf/ with Hydra and run CPT → merge → SFT → eval.

    python -m pipeline.run                                   # the offline demo, all four stages
    python -m pipeline.run stages=[cpt,merge]                # a prefix of the chain
    python -m pipeline.run stages=[sft,eval] inputs.cpt_model=outputs/runs/<run>/cpt_model
    python -m pipeline.run -m cpt.lora_alpha=32,128 sft.lora_alpha=8,32 sft.target_modules=attn_mlp,attn

Each stage is a plain function of its config section and input paths that returns its output path; this file only
decides which stages run, checks every input before any training starts, and writes the run's summary.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import pipeline  # noqa: F401  (sets the offline environment before any Hugging Face import)

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.core.backend import activate, check_attn_implementation, resolve_backend, unsloth_blockers
from pipeline.cache import StageCache, fingerprint_model, stage_key
from pipeline.core.data import use_datasets_cache
from pipeline.core.outputs import PipelineError, is_complete, log_examples, write_json
from pipeline.core.devices import check_4bit_support, resolve_device, resolve_dtype
from pipeline.core.checkpoints import declared_tied, inspect_checkpoint, is_prequantized, resolve_model_path
from pipeline.core.config import (DEMO_GENERATOR_PATH, DEMO_INSTRUCT_PATH, DEMO_MODEL_PATH, SECTIONS, cache_settings,
                                  check_ranges, check_run, flat_config, typed)
from pipeline.stages.eval import TRANSITIONS
from pipeline.core.mixing import leak_metrics
from pipeline.core.progress import CONSOLE, route_library_logs
from pipeline.core.lineage import check_input, check_pair
from pipeline.core.prompts import FORMAT_FIELDS, chat_template_text, check_chat_template, check_format, \
    check_sft_lengths
from pipeline.core.tracking import check as check_tracking, log_run
from pipeline.core.interrupt import exit_status, ignore_further, interruptible, kept_line

log = logging.getLogger("pipeline.run")

STAGES = ("augment", "cpt", "merge", "chat_vector", "sft", "eval", "export")
# What each stage consumes, and the inputs.* key that supplies it when the producing stage is not run.
NEEDS = {"merge": "cpt_adapter", "chat_vector": "cpt_model", "sft": "cpt_model", "export": "cpt_model"}
PRODUCERS = {"cpt_adapter": "cpt", "cpt_model": "merge"}  # chat_vector is optional between merge and sft


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
    route_library_logs()  # their messages into run.log, not onto the console (pipeline/core/progress.py)


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
    producer = {"augmented": "augment", "cpt_adapter": "cpt", "cpt_model": "merge", "sft_adapter": "sft"}[key]
    if not path:
        raise PipelineError(f"stage {stage} needs a {key.replace('_', ' ')}: add {producer} to stages or set "
                            f"inputs.{key}=PATH")
    if not Path(path).is_dir():
        raise PipelineError(f"inputs.{key}={path}: no such directory")
    if not is_complete(path):
        raise PipelineError(f"inputs.{key}={path}: not a completed stage output (no .complete marker)")
    return path


def validate(cfg: DictConfig, stages: list, backend: str = "hf") -> None:
    """Check every input the requested stages will read, so bad input fails before minutes of training.

    Order: the config itself (types and the ranges declared in pipeline/core/config.py, format strings), the model
    directory, every data file (opened and parsed in full, its content checked: pipeline/core/content.py), earlier
    stages' outputs (kind and lineage), then what needs the checkpoint read without its weights (module names,
    positions, vocabulary, LoRA ranks, the chat template, SFT prompt lengths)."""
    from pipeline.core.content import check_qa_content, check_sft_content, check_tokenizable
    from pipeline.core.data import check_cpt_documents, load_qa, load_sft_records, qa_fields
    from pipeline.stages.chat_vector import check_instruct
    from pipeline.core.mixing import check_lever_inputs
    from pipeline.core.modules import add_tokens, check_rank, embedding_rows, is_tied, resolve_layers, resolve_targets
    from pipeline.core.scoring import HEADLINE_METRICS

    sections = {name: typed(cfg, name) for name in SECTIONS}
    for name, section in sections.items():
        check_ranges(section, name)
    check_tracking(cfg)  # tracking=mlflow: installed, and a local store
    model_cfg, data_cfg, ev = sections["model"], sections["data"], sections["eval"]
    for name in ("cpt", "sft"):
        if sections[name].max_steps == 0:
            raise PipelineError(f"{name}.max_steps=0: use -1 (train {name}.num_epochs) or a positive step count")
    # Format strings, checked where a stage will format them: a missing field fails only in that stage.
    readers = {"model.prompt_template": {"sft", "eval", "chat_vector"}, "eval.completion_prompt": {"eval"},
               "cpt.qa_template": {"cpt"} if sections["cpt"].qa_mix else set(),
               "eval.judge_prompt": {"eval"} if ev.judge_path else set()}
    for k in FORMAT_FIELDS:
        if readers[k] & set(stages):
            section, name = k.split(".")
            check_format(getattr(sections[section], name), k)
    check_output_dir(cfg)
    check_model_path(model_cfg)
    for name in ("cpt", "sft"):
        if name in stages:
            check_attn_implementation(sections[name].attn_implementation, resolve_device(str(cfg.device)),
                                      f"{name}.attn_implementation")
    if "cpt" in stages or "augment" in stages:
        check_cpt_documents(data_cfg.cpt.path, data_cfg.cpt.text_field)
    if "augment" in stages:
        check_augment(sections["augment"], model_cfg, data_cfg, str(cfg.device))
    sft_records = load_sft_records(data_cfg.sft.path, messages_field=data_cfg.sft.messages_field, where=True) \
        if "sft" in stages else []
    check_sft_content(sft_records)
    for part, used in (("cpt_qa", "cpt" in stages and sections["cpt"].qa_mix),
                       ("dev_qa", "sft" in stages and sections["sft"].early_stopping_patience)):
        spec = getattr(data_cfg, part).path
        if used and spec:  # QA pairs trained on or scored against: the same content rules as data.qa
            check_qa_content(load_qa(spec, key=f"data.{part}.path", **qa_fields(getattr(data_cfg, part))),
                             f"data.{part}.path")
    qa_items = []  # tokenized below, once the tokenizer is known
    if "eval" in stages:
        qa_items = load_qa(data_cfg.qa.path, **qa_fields(data_cfg.qa))
        check_qa_content(qa_items, "data.qa.path")
        if data_cfg.general_qa.path:
            check_qa_content(load_qa(data_cfg.general_qa.path, key="data.general_qa.path",
                                     **qa_fields(data_cfg.general_qa)), "data.general_qa.path")
        if data_cfg.heldout.path:
            check_cpt_documents(data_cfg.heldout.path, data_cfg.heldout.text_field, key="data.heldout.path")
        if ev.judge_path:
            inspect_checkpoint(ev.judge_path, "eval.judge_path", model_cfg.trust_remote_code)
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
        has_sft = "sft" in stages or cfg.inputs.get("sft_adapter") or "chat_vector" in stages  # the final chat model
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
            check_input(cfg.inputs[key], key, key, model_cfg.path)  # its kind, and built on model.path
    if cfg.inputs.get("sft_adapter") and cfg.inputs.get("cpt_model") and "chat_vector" not in stages:
        check_pair(cfg.inputs.sft_adapter, cfg.inputs.cpt_model)
    if cfg.inputs.get("augmented") and "cpt" in stages and "augment" not in stages:
        _require(cfg.inputs.get("augmented"), "augmented", "cpt")
    for stage, key in NEEDS.items():
        if stage in stages and PRODUCERS[key] not in stages:
            _require(cfg.inputs.get(key), key, stage)
    if "export" in stages:
        if not ("sft" in stages or "chat_vector" in stages or cfg.inputs.get("sft_adapter")):
            raise PipelineError("stage export needs the final chat model: add sft (or chat_vector) to stages or set "
                                "inputs.sft_adapter=PATH")
        if sections["export"].gguf:
            from pipeline.core.gguf_export import check_request

            check_request(sections["export"])  # types, the converter, llama-quantize: before any training
    check_lever_inputs(sections, stages)  # replay text, QA pairs for CPT, SFT dev set (docs/levers.md)
    if "chat_vector" in stages and not _demo_builds_instruct(model_cfg):
        check_instruct(model_cfg)
        inspect_checkpoint(model_cfg.instruct_path, "model.instruct_path", model_cfg.trust_remote_code)
    if "sft" in stages or "eval" in stages:
        chat_template_text(model_cfg.chat_template)  # a missing .jinja file is an error, not a template
    if model_cfg.load_in_4bit and ("cpt" in stages or "sft" in stages):
        check_4bit_support(resolve_device(str(cfg.device)))
    if Path(model_cfg.path).exists():
        # safetensors headers, shapes against config.json, model_type, custom code, the tokenizer
        checkpoint = inspect_checkpoint(model_cfg.path, "model.path", model_cfg.trust_remote_code,
                                        model_cfg.add_special_tokens)
        config, meta, tokenizer = checkpoint.config, checkpoint.meta, checkpoint.tokenizer
        positions = config.get("max_position_embeddings") or (config.get("text_config") or {}).get(
            "max_position_embeddings")
        lengths = {"model.max_seq_length": model_cfg.max_seq_length, "sft.max_length": sections["sft"].max_length}
        for k, v in lengths.items():
            if isinstance(positions, int) and v and v > positions:
                raise PipelineError(f"{k}={v}: longer than the model's {positions} positions "
                                    f"(max_position_embeddings in {model_cfg.path}/config.json)")
        if model_cfg.tied_embeddings is not None and is_tied(meta) != model_cfg.tied_embeddings:
            raise PipelineError(f"model.tied_embeddings={str(model_cfg.tied_embeddings).lower()} but the checkpoint "
                                f"at model.path={model_cfg.path} has {'tied' if is_tied(meta) else 'untied'} "
                                f"embeddings: is this the model family the config was written for?")
        if "merge" in stages and is_prequantized(model_cfg.path):
            raise PipelineError(f"model.path={model_cfg.path}: a pre-quantized checkpoint; the merge needs the 16-bit "
                                f"weights (point model.path at the 16-bit model; model.load_in_4bit=true trains in "
                                f"4-bit)")
        for name in ("cpt", "sft"):  # cpt.layers / sft.layers against num_hidden_layers
            if name in stages:
                resolve_layers(sections[name].layers, meta, key=f"{name}.layers")
        if "cpt" in stages:
            check_rank(sections["cpt"].r, resolve_targets(cfg.cpt.target_modules, meta, model_cfg.modules,
                                                          key="cpt.target_modules"), meta, "cpt.target_modules")
        add_tokens(tokenizer, model_cfg.add_special_tokens, embedding_rows(meta), f"model.path={model_cfg.path}")
        if "sft" in stages:
            check_rank(sections["sft"].r, resolve_targets(cfg.sft.target_modules, meta, model_cfg.modules,
                                                          key="sft.target_modules"), meta, "sft.target_modules")
        if {"sft", "eval", "chat_vector"} & set(stages):  # the chat template parses and renders
            check_chat_template(tokenizer, model_cfg, f"model.path={model_cfg.path}", full="sft" in stages)
        check_tokenizable([(q.where, t) for q in qa_items for t in (q.question, q.answer)], tokenizer, "data.qa.path")
        check_tokenizable([(r["where"], r["messages"][-1]["content"]) for r in sft_records], tokenizer,
                          "data.sft.path answers")
        if "sft" in stages:  # every record's prompt leaves room for its answer
            length_key = "sft.max_length" if sections["sft"].max_length else "model.max_seq_length"
            check_sft_lengths(sft_records, tokenizer, model_cfg, sections["sft"].max_length
                              or model_cfg.max_seq_length, length_key)
        if backend == "unsloth":  # config.json may not have said whether the embeddings are tied; the model does
            blockers = unsloth_blockers(model_cfg, stages, cfg.cpt.target_modules, cfg.sft.target_modules,
                                        is_tied(meta))
            if blockers:
                raise PipelineError(f"backend={cfg.backend} chose unsloth, which cannot run with {blockers[0]}; use "
                                    f"backend=hf")
    elif model_cfg.build_demo_if_missing:  # built after these checks, but its shapes are known from model.demo now
        from pipeline.demo_model import demo_meta_model

        meta = demo_meta_model(model_cfg.demo, model_cfg.max_seq_length)
        positions, length = meta.config.max_position_embeddings, sections["sft"].max_length
        if length and length > positions:
            raise PipelineError(f"sft.max_length={length}: longer than the demo model's {positions} positions (it is "
                                f"built with max(2048, model.max_seq_length))")
        for name in ("cpt", "sft"):
            if name in stages:
                resolve_layers(sections[name].layers, meta, key=f"{name}.layers")
                resolve_targets(cfg[name].target_modules, meta, model_cfg.modules, key=f"{name}.target_modules")


def check_model_path(model_cfg) -> None:
    """model.path must exist, except the demo model's own path, which the demo builds on first use. Anything else
    that is missing is a typo: never build a toy model there and train it as if it were the user's checkpoint."""
    path, is_demo_path = Path(model_cfg.path), Path(model_cfg.path).resolve() == Path(DEMO_MODEL_PATH).resolve()
    if model_cfg.build_demo_if_missing and not is_demo_path:
        raise PipelineError(f"model.path={model_cfg.path}: model=demo (the default model config) is the embedded "
                            f"demo, built only at {DEMO_MODEL_PATH}; for your checkpoint pick its family config, "
                            f"e.g. model=llm_jp_3 model.path=... (conf/model/)")
    if not path.exists() and not (model_cfg.build_demo_if_missing and is_demo_path):
        raise PipelineError(f"model.path={model_cfg.path}: no such directory (expected a local Hugging Face "
                            f"checkpoint)")


def check_augment(aug, model_cfg, data_cfg, device: str) -> None:
    """The augment stage's inputs: its prompt templates, the engine, the generator (unless the demo builds it), and
    the scored QA set its test-question filter reads."""
    from pipeline.core.data import load_qa
    from pipeline.core.generate import check_engine
    from pipeline.stages.augment import generator_path, load_templates

    load_templates(aug)
    check_engine(aug.engine, device)
    path = generator_path(aug, model_cfg)
    if not _demo_builds(model_cfg, path):
        # the same checks as model.path: headers, shapes, model_type, custom code, the tokenizer
        inspect_checkpoint(path, "augment.generator_path" if aug.generator_path else "model.instruct_path "
                           "(augment.generator_path's default)", model_cfg.trust_remote_code)
    if data_cfg.qa.path:
        load_qa(data_cfg.qa.path)


def _demo_builds(model_cfg, path: Optional[str]) -> bool:
    """The demo's instruct sibling and augmentation generator are built on first use, at their own paths only."""
    return bool(model_cfg.build_demo_if_missing and path and not Path(path).exists() and Path(path).resolve() in
                (Path(DEMO_INSTRUCT_PATH).resolve(), Path(DEMO_GENERATOR_PATH).resolve()))


def resolve_models(cfg: DictConfig, stages: list) -> DictConfig:
    """The config with every model this run reads given as a directory: a Hub id (`org/name[@revision]`) becomes
    its snapshot in the local Hugging Face cache (checkpoints.resolve_model_path; never downloaded). The stages, the
    keys (the snapshot's commit, cache.fingerprint_model), config.yaml and metrics.json then see the directory."""
    model_cfg = typed(cfg, "model")
    keys = ["model.path"] if not (model_cfg.build_demo_if_missing and Path(model_cfg.path).resolve()
                                  == Path(DEMO_MODEL_PATH).resolve()) else []
    generator = cfg.get("augment", {}).get("generator_path") if "augment" in stages else None
    if ("chat_vector" in stages or ("augment" in stages and not generator)) and model_cfg.instruct_path \
            and not _demo_builds_instruct(model_cfg):
        keys.append("model.instruct_path")
    if generator and not _demo_builds(model_cfg, generator):
        keys.append("augment.generator_path")
    if "eval" in stages and cfg.eval.get("judge_path"):
        keys.append("eval.judge_path")
    resolved = {key: resolve_model_path(str(OmegaConf.select(cfg, key)), key) for key in keys}
    changed = {k: v for k, v in resolved.items() if v != str(OmegaConf.select(cfg, k))}
    if not changed:
        return cfg
    cfg = copy.deepcopy(cfg)
    for key, path in changed.items():
        log.info("%s=%s: %s (local Hugging Face cache)", key, OmegaConf.select(cfg, key), path)
        OmegaConf.update(cfg, key, path)
    return cfg


def _demo_builds_instruct(model_cfg) -> bool:
    """The demo's instruct sibling is built on first use (at its own path only), after validation."""
    return bool(model_cfg.build_demo_if_missing and model_cfg.instruct_path
                and Path(model_cfg.instruct_path).resolve() == Path(DEMO_INSTRUCT_PATH).resolve()
                and not Path(model_cfg.instruct_path).exists())


def check_output_dir(cfg: DictConfig) -> None:
    """The stage cache (or, without it, the run directory) must be writable before hours of training go into it."""
    import tempfile

    target = Path(cfg.cache.dir) if cfg.cache.enabled else None
    key = "cache.dir"
    if target is None:
        return
    probe = target
    while not probe.exists():  # the nearest existing ancestor decides whether the directory can be created
        probe = probe.parent
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise PipelineError(f"{key}={cfg.cache.dir}: not writable ({e.strerror or e}); set {key} to a writable "
                            f"directory") from None


def eval_models(cfg: DictConfig, stages: list) -> list:
    """The models eval scores in this run: those of eval.models that this run has (built here or from inputs.*)."""
    has_cpt = "merge" in stages or bool(cfg.inputs.get("cpt_model"))
    # the final chat model: an SFT adapter and/or the chat-vector model, on the CPT model
    has_sft = has_cpt and ("sft" in stages or "chat_vector" in stages or bool(cfg.inputs.get("sft_adapter")))
    available = {"base": True, "cpt": has_cpt, "sft": has_sft}
    return [m for m in ("base", "cpt", "sft") if available[m] and m in cfg.eval.models]


def stage_materials(cfg: DictConfig, stages: list, backend: str) -> Dict[str, dict]:
    """What each requested stage's cache key hashes (cache.stage_key), in stage order, computed before anything runs.

    A key holds the stage's settings (every key of its section not declared runtime), the files it reads (each stage
    module's key_material, next to the code that reads them), the model settings it uses, and the identity of each
    stage output it builds on: that stage's key when it runs here, else the fingerprint of the inputs.* directory.
    tests/test_cache_keys.py changes every config key and input file and checks which keys follow."""
    from pipeline.stages import augment, chat_vector, cpt, export, sft
    from pipeline.stages import eval as evaluation

    model_cfg, data_cfg, seed = typed(cfg, "model"), typed(cfg, "data"), int(cfg.seed)
    materials: Dict[str, dict] = {}
    keys: Dict[str, str] = {}

    def identity(stage: str, input_key: str) -> Optional[str]:
        # Written as fingerprint_model writes a cached output's identity, so that a later stage run on its own from
        # inputs.* (a run directory's link into the cache) gets the key it has in the chained run, and is reused.
        if stage in keys:
            return f"cache:{stage}/{keys[stage]}"
        path = cfg.inputs.get(input_key)
        return fingerprint_model(path) if path else None

    def add(stage: str, material: dict) -> None:
        materials[stage], keys[stage] = material, stage_key(stage, material)

    base_id = fingerprint_model(model_cfg.path)
    # The resolved dtype, not "auto": a CPU (fp32) result is not a GPU (bf16) result. The device itself is not keyed.
    dtype = str(resolve_dtype(model_cfg.dtype, resolve_device(str(cfg.device)))).replace("torch.", "")
    model_settings = {"base": base_id, "dtype": dtype, "max_seq_length": model_cfg.max_seq_length,
                      "modules": model_cfg.modules, "trust_remote_code": model_cfg.trust_remote_code,
                      "load_in_4bit": model_cfg.load_in_4bit, "add_special_tokens": model_cfg.add_special_tokens,
                      "backend": backend}  # unsloth's kernels give other numbers than the plain path
    template = {"prompt_template": model_cfg.prompt_template,
                "chat_template": chat_template_text(model_cfg.chat_template)}
    if "augment" in stages:
        a = typed(cfg, "augment")
        add("augment", augment.key_material(a, model_cfg, data_cfg, seed if a.seed is None else a.seed, dtype))
    if "cpt" in stages:
        c = typed(cfg, "cpt")
        # The generated text is part of CPT's data: the augment output's identity enters CPT's key (only when there
        # is one, so that the keys of runs without augmentation stay what they were).
        augmented = identity("augment", "augmented")
        add("cpt", {**model_settings, **cpt.key_material(c, data_cfg, seed if c.seed is None else c.seed),
                    **({"augmented": augmented} if augmented else {})})
    if "merge" in stages:
        add("merge", {"base": base_id, "cpt": identity("cpt", "cpt_adapter"),
                      "merge": cache_settings(typed(cfg, "merge"))})
    if "chat_vector" in stages:
        add("chat_vector", {**template, **chat_vector.key_material(typed(cfg, "chat_vector"), model_cfg),
                            "base": base_id, "cpt_model": identity("merge", "cpt_model")})
    if "sft" in stages:
        s = typed(cfg, "sft")
        add("sft", {**model_settings, **template, **sft.key_material(s, data_cfg, seed if s.seed is None else s.seed),
                    "cpt_model": identity("merge", "cpt_model"),
                    "chat_vector": keys.get("chat_vector")})  # SFT on the CPT model + chat vector
    if "eval" in stages:
        models = eval_models(cfg, stages)
        add("eval", {**model_settings, **template, **evaluation.key_material(typed(cfg, "eval"), data_cfg),
                     "models": sorted(models),
                     "cpt_model": identity("merge", "cpt_model") if {"cpt", "sft"} & set(models) else None,
                     "sft_adapter": identity("sft", "sft_adapter") if "sft" in models else None,
                     "chat_vector": keys.get("chat_vector")})
    if "export" in stages:
        add("export", {**model_settings, **template, **export.key_material(typed(cfg, "export")),
                       "cpt_model": identity("merge", "cpt_model"), "chat_vector": keys.get("chat_vector"),
                       "sft_adapter": identity("sft", "sft_adapter"),
                       "eval": keys.get("eval")})  # the model card's table and the answers check
    return materials


def run_pipeline(cfg: DictConfig, run_dir: str | Path) -> Dict:
    """Run the configured stages into `run_dir`; returns the metrics written to metrics.json."""
    from pipeline.stages import augment, chat_vector, cpt, export, merge, sft
    from pipeline.stages import eval as evaluation
    from pipeline.demo_model import ensure_demo_generator_model, ensure_demo_instruct_model, ensure_demo_model

    check_run(cfg)  # seed, device, backend, stages: typed and in range before anything uses them
    seed, device = int(cfg.seed), str(cfg.device)
    log_examples(bool(cfg.get("log_examples", False)))
    stages = _stage_list(cfg)
    cfg = resolve_models(cfg, stages)  # Hub ids -> their snapshots in the local Hugging Face cache
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
    use_datasets_cache((Path(cfg.cache.dir) if cfg.cache.enabled else run_dir) / ".datasets")
    validate(cfg, stages, backend)
    data_cfg = typed(cfg, "data")
    if model_cfg.build_demo_if_missing:
        ensure_demo_model(model_cfg.demo, model_cfg.path, model_cfg.max_seq_length)
        if "chat_vector" in stages and _demo_builds_instruct(model_cfg):
            ensure_demo_instruct_model(model_cfg.demo, model_cfg.path, model_cfg.instruct_path,
                                       model_cfg.max_seq_length)
        if "augment" in stages:
            generator = augment.generator_path(typed(cfg, "augment"), model_cfg)
            if _demo_builds(model_cfg, generator):
                build = (ensure_demo_generator_model if Path(generator).resolve() == Path(DEMO_GENERATOR_PATH).resolve()
                         else ensure_demo_instruct_model)
                build(model_cfg.demo, model_cfg.path, generator, model_cfg.max_seq_length)
        validate(cfg, stages, backend)  # now the target modules can be checked against the built model
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")

    paths: Dict[str, Optional[str]] = {k: cfg.inputs.get(k) for k in ("augmented", "cpt_adapter", "cpt_model",
                                                                       "sft_adapter")}
    cache = StageCache(cfg.cache.dir, bool(cfg.cache.enabled))
    record: Dict[str, object] = {"backend_used": backend}  # + time/<stage>, stage/<stage> (built|reused), key/<stage>
    # QA files a lever trains or stops on that ask about scored facts: flagged, not refused (pipeline/core/mixing.py)
    record.update(leak_metrics(data_cfg, typed(cfg, "cpt"), typed(cfg, "sft"), stages))

    def run_stage(name: str, link: str, material: dict, build) -> str:
        """Build (or reuse) one stage's output; the run directory gets it as `link` (a symlink into the cache)."""
        key = stage_key(name, material)
        log.info("== stage %s (key %s) ==", name, key)
        t0 = time.time()
        try:
            if cache.enabled:
                out, reused = cache.get_or_build(name, key, build, material)
                target = run_dir / link
                if target.is_symlink():
                    target.unlink()
                target.symlink_to(out, target_is_directory=True)
            else:
                out, reused = Path(build(run_dir / link)), False
        except KeyboardInterrupt as e:  # SIGINT/SIGTERM: run_and_report says what of this stage was kept
            e.stage, e.output = name, cache.path(name, key) if cache.enabled else run_dir / link
            e.finished = [s for s in STAGES if f"stage/{s}" in record]
            e.save_steps = cfg[name].get("save_steps") if name in ("cpt", "sft") else None
            raise
        except BaseException as e:
            raise stage_failure(name, e) from e
        record.update({f"time/{name}": round(time.time() - t0, 2), f"stage/{name}": "reused" if reused else "built",
                       f"key/{name}": key})
        log.info("== stage %s %s in %.1fs: %s", name, "REUSED" if reused else "built", time.time() - t0, out,
                 extra=CONSOLE)
        return str(out)

    materials = stage_materials(cfg, stages, backend)  # every key before the first stage runs
    if "augment" in stages:
        a = typed(cfg, "augment")
        paths["augmented"] = run_stage("augment", "augmented", materials["augment"], lambda out: augment.augment_corpus(
            a, model_cfg, data_cfg, seed if a.seed is None else a.seed, out, device))
    if "cpt" in stages:
        c = typed(cfg, "cpt")
        cpt_seed = seed if c.seed is None else c.seed
        paths["cpt_adapter"] = run_stage("cpt", "cpt_adapter", materials["cpt"], lambda out: cpt.train_cpt(
            c, model_cfg, data_cfg.cpt, cpt_seed, out, device, backend, qa_pairs=data_cfg.cpt_qa,
            scored_qa=data_cfg.qa, augmented=paths.get("augmented")))
    if "merge" in stages:
        m, adapter = typed(cfg, "merge"), _require(paths["cpt_adapter"], "cpt_adapter", "merge")
        paths["cpt_model"] = run_stage("merge", "cpt_model", materials["merge"], lambda out: merge.merge_adapter(
            m, model_cfg, adapter, out, device))
    if "chat_vector" in stages:
        cv, cpt_model = typed(cfg, "chat_vector"), _require(paths["cpt_model"], "cpt_model", "chat_vector")
        paths["cv_model"] = run_stage("chat_vector", "cv_model", materials["chat_vector"], lambda out:
                                      chat_vector.apply_chat_vector(cv, model_cfg, cpt_model, out, device))
    if "sft" in stages:
        s_cfg, cpt_model = typed(cfg, "sft"), _require(paths["cpt_model"], "cpt_model", "sft")
        replay = data_cfg.replay if data_cfg.replay.path else data_cfg.cpt  # sft.replay_ratio's text
        sft_seed = seed if s_cfg.seed is None else s_cfg.seed
        paths["sft_adapter"] = run_stage("sft", "sft_adapter", materials["sft"], lambda out: sft.train_sft(
            s_cfg, model_cfg, data_cfg.sft, paths.get("cv_model") or cpt_model, sft_seed, out, device, backend,
            replay=replay, dev_qa=data_cfg.dev_qa, scored_qa=data_cfg.qa))
    if "eval" in stages:
        ev = typed(cfg, "eval")
        if cfg.inputs.get("sft_adapter") and "sft" not in stages and paths["cpt_model"]:
            check_pair(paths["sft_adapter"], paths.get("cv_model") or paths["cpt_model"])  # trained on this model
        models = {"base": (model_cfg.path, None), "cpt": (paths["cpt_model"], None),
                  "sft": (paths.get("cv_model") or paths["cpt_model"], paths["sft_adapter"])}
        models = {k: models[k] for k in eval_models(cfg, stages)}
        eval_dir = Path(run_stage("eval", "eval", materials["eval"], lambda out: evaluation.evaluate(
            ev, model_cfg, data_cfg.qa, models, out, device, data_cfg.general_qa, data_cfg.heldout.path,
            backend, heldout_text_field=data_cfg.heldout.text_field)))
        for name in ("answers.jsonl", "lost_questions.jsonl"):
            shutil.copyfile(eval_dir / name, run_dir / name)
        metrics = json.loads((eval_dir / "eval_metrics.json").read_text(encoding="utf-8"))
    else:
        metrics = {}
    if "export" in stages:
        ex, base = typed(cfg, "export"), paths.get("cv_model") or _require(paths["cpt_model"], "cpt_model", "export")
        info = {"base_model": model_cfg.path, "base_identity": materials.get("export", {}).get("base"),
                "stages": export.lineage(materials, cfg.cache.dir if cfg.cache.enabled else None)}
        info["corpus_fingerprint"] = (info["stages"].get("cpt") or {}).get("data")
        # eval's SFT answers are compared only when eval scored this adapter (or the chat-vector model it replaces)
        scored = "eval" in stages and "sft" in eval_models(cfg, stages)
        paths["export"] = run_stage("export", "export", materials["export"], lambda out: export.export_model(
            ex, typed(cfg, "merge"), model_cfg, base, paths.get("sft_adapter"), out, device,
            typed(cfg, "eval") if scored else None, data_cfg.qa.path, str(eval_dir) if scored else None, info))
        metrics.update(export_metrics(paths["export"]))
    metrics.update(record)
    metrics.update(merge_metrics(paths["cpt_model"]))
    metrics.update(lever_metrics(paths))
    metrics.update(augment_metrics(paths.get("augmented")))
    metrics.update({k: v for k, v in paths.items() if v})
    metrics.update(flat_config(cfg))
    write_json(run_dir / "metrics.json", metrics)
    log_run(cfg, run_dir, metrics)  # tracking=mlflow: this run (a sweep's job: a child run) into the local store
    if "eval" in stages:
        print(format_table(metrics))
    return metrics


def stage_failure(stage: str, error: BaseException) -> BaseException:
    """The one line a user needs for the failures that are not bugs: out of memory (what to lower) and a full disk
    (where). Anything else is returned unchanged (a PipelineError already is one line)."""
    import errno

    import torch

    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
        section = stage if stage in ("cpt", "sft") else "eval" if stage == "eval" else "model"
        if section in ("cpt", "sft"):
            hint = (f"lower {section}.batch_size (raise {section}.gradient_accumulation_steps to keep the step size), "
                    f"set {section}.gradient_checkpointing=true, lower model.max_seq_length or set "
                    f"model.load_in_4bit=true (conf/hardware/ has presets)")
        elif section == "eval":
            hint = "lower eval.batch_size"
        else:
            hint = "run the merge on a machine with more memory (it holds one model at a time)"
        return PipelineError(f"stage {stage}: out of memory ({str(error).strip().splitlines()[0][:160]}); {hint}")
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return PipelineError(f"stage {stage}: disk full while writing {error.filename or 'its output'}; nothing was "
                             f"published; free space or set cache.dir to a larger disk")
    return error


def lever_metrics(paths: Dict[str, Optional[str]]) -> Dict:
    """What the retention levers did (docs/levers.md), from the stages' stats files: each stage's LoRA scale (alpha/r,
    alpha/sqrt(r) with rsLoRA), SFT's trained answer and replayed tokens, the chat vector's ratio."""
    out: Dict[str, object] = {}
    for stage, key, fname, names in (
            ("cpt", "cpt_adapter", "cpt_stats.json", ("lora_scale",)),
            ("sft", "sft_adapter", "sft_stats.json", ("lora_scale", "answer_tokens", "replay_tokens", "replay_share",
                                                      "best_eval_loss", "best_checkpoint_step", "steps")),
            ("chat_vector", "cv_model", "chat_vector.json", ("ratio", "tensors_added"))):
        f = Path(paths[key]) / fname if paths.get(key) else None
        if f and f.is_file():
            stats = json.loads(f.read_text(encoding="utf-8"))
            out.update({f"{stage}/{n}": stats[n] for n in names if stats.get(n) is not None})
    return out


def export_metrics(export_dir: str) -> Dict:
    """The export's checks as flat metrics (export/...): the merge check, the answers against eval's, GGUF sizes."""
    check = json.loads((Path(export_dir) / "export_check.json").read_text(encoding="utf-8"))
    out = {f"export/merge_{k}": v for k, v in (check.get("merge") or {}).items() if isinstance(v, (int, float))}
    answers = check.get("answers") or {}
    if answers:
        out["export/answers_same_as_eval"] = answers["answers_same_as_eval"] / answers["questions"]
    for g in check.get("gguf") or []:
        out[f"export/gguf_{g['type']}_bytes"] = g["bytes"]
        if isinstance(g.get("logits"), dict):
            out[f"export/gguf_{g['type']}_max_abs_logit_diff"] = g["logits"]["max_abs_logit_diff"]
    return out


def augment_metrics(augmented: Optional[str]) -> Dict:
    """What the augment stage generated and kept, per strategy and filter (augment/<strategy>/<count>)."""
    f = Path(augmented) / "augment_stats.json" if augmented else None
    if not f or not f.is_file():
        return {}
    stats = json.loads(f.read_text(encoding="utf-8"))
    out = {f"augment/{k}": stats[k] for k in ("kept", "rejected", "kept_tokens", "source_tokens",
                                              "generated_tokens", "seconds_per_document") if k in stats}
    for name, counts in stats.get("strategies", {}).items():
        out.update({f"augment/{name}/{k}": v for k, v in counts.items()})
    return out


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
    """The compact end-of-run table: one row per evaluated model, a gain_kept row, then the headline."""
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
    kept = [c for c in table.columns if f"gain_kept/{c}" in metrics]
    if kept:  # (SFT - base) / (CPT - base) under each metric it is defined for
        table.loc["gain_kept"] = [metrics.get(f"gain_kept/{c}") for c in table.columns]

    def fmt(v):
        return "-" if v is None else f"{v:+.3f}" if isinstance(v, float) else str(v)

    text = table.to_string(float_format=lambda x: f"{x:.3f}", na_rep="-")
    if kept:
        text += ("\n\ngain_kept = (sft - base) / (cpt - base): the share of what CPT changed that survives SFT; "
                 "'-' where |cpt - base| is below its threshold:")
        text += "".join(f"\n  {c}: {metrics[f'gain_kept_reason/{c}']}" for c in kept
                        if metrics.get(f"gain_kept_reason/{c}"))
    if "transitions/learned_lost" in metrics:
        text += "\n\nper question (contains): " + ", ".join(
            f"{t} {metrics[f'transitions/{t}']}" for t in TRANSITIONS)
    h = metrics.get("headline_metric")
    groups = sorted({k.split("@", 1)[1] for k in metrics if "@" in k})
    if groups:
        per_group = pd.DataFrame({g: {k: metrics.get(f"{k}/{h}@{g}") for k in rows} for g in groups})
        text += f"\n\n{h} by question group:\n" + per_group.to_string(float_format=lambda x: f"{x:.3f}", na_rep="-")
    return (f"\n{text}\n\nheadline {h}: knowledge_gain (cpt - base) {fmt(metrics.get('knowledge_gain'))}, "
            f"gain_kept {fmt(metrics.get(f'gain_kept/{h}'))}\n")


def run_and_report(cfg: DictConfig, run_dir: Path, multirun: bool = False) -> int:
    """Run the pipeline; a failure becomes one line on stderr and in error.txt (the sweep table lists it). Returns
    the exit status: 0, 2 for bad input or a stage failure with a known cause (PipelineError), 1 otherwise."""
    try:
        run_pipeline(cfg, run_dir)
        log.info("run directory: %s", run_dir, extra=CONSOLE)
        return 0
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (pipeline/core/interrupt.py): one line, 130 or 143
        return interrupted(e, cfg, run_dir, multirun)
    except BaseException as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        if cfg.get("debug") and not multirun:
            raise
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(f"{type(e).__name__}: {first_line}\n", encoding="utf-8")
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):  # a stage's bar left open: the error gets its own line
            bar.close()
        if isinstance(e, PipelineError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not multirun:
            raise
        # A bug or an unexpected failure in one cell: the traceback goes to run.log, the other cells still run and
        # the sweep's table lists this one as failed (the sweep exits 1 at the end).
        log.exception("job failed")
        print(f"error: {type(e).__name__}: {first_line} (traceback in {run_dir}/run.log)", file=sys.stderr)
        return 1
    finally:
        if multirun:  # the next cell runs in this process: give back what a failed one held on the GPU
            import gc

            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def interrupted(error: KeyboardInterrupt, cfg: DictConfig, run_dir: Path, multirun: bool) -> int:
    """The one line an interruption gets (what was kept, and that the same command resumes), also in error.txt;
    `debug=true` prints the traceback first. Returns 130 (SIGINT) or 143 (SIGTERM); a sweep stops altogether."""
    import traceback

    from tqdm import tqdm

    ignore_further()
    for bar in list(getattr(tqdm, "_instances", ())):  # the training bar: the line goes on a line of its own
        bar.close()
    if cfg.get("debug"):
        traceback.print_exc()
    line = kept_line(error, getattr(error, "stage", None), getattr(error, "output", None),
                     getattr(error, "finished", ()), bool(cfg.cache.enabled), getattr(error, "save_steps", None))
    if multirun:  # the cells that finished can still be tabled
        line += f"; the sweep stopped here (python -m pipeline.aggregate {run_dir.parent} tables the finished cells)"
    print(line, file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.txt").write_text(f"Interrupted: {line}\n", encoding="utf-8")
    if multirun:  # the remaining cells must not start: the user (or the scheduler) stopped the sweep
        raise SystemExit(exit_status(error))
    return exit_status(error)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    with interruptible():  # SIGTERM, like Ctrl-C, ends in run_and_report's one line
        status = run_and_report(cfg, Path(HydraConfig.get().runtime.output_dir), multirun)
    if status and not multirun:
        sys.exit(status)


if __name__ == "__main__":
    main()
