"""Which stack trains: plain transformers + PEFT (+ TRL for SFT), or unsloth's fast path on a CUDA GPU.

    python -m pipeline.run backend=auto      # unsloth when CUDA, unsloth and settings it can train are there
    python -m pipeline.run backend=unsloth   # unsloth or a clear error (never its silent CPU fallback)
    python -m pipeline.run backend=hf        # the plain path everywhere

The backends differ only in how CPT, SFT and eval load the model, how the stages wrap it with LoRA, and unsloth's
inference mode in eval: the data, the target_modules presets, the trainers and the embedding learning rate, the
merge (PEFT, fp32, on the 16-bit weights at model.path, verified by logits) and the scoring are the same code.
unsloth's own `save_pretrained_merged` is not used: the pipeline's merge is checked against the adapter model's
logits, and unsloth's has known failure modes (it fetches 16-bit weights by name unless the base is a local
directory, merged twice into a reused directory: unsloth #3633).

unsloth must be imported before transformers, PEFT and TRL (it patches them), so `activate` runs first thing in a
run; it also refuses CPUs (UNSLOTH_DISABLE_CPU_FALLBACK, set in pipeline/__init__.py) instead of silently becoming
the plain path, and sees the offline variables set there (no statistics download, no model-name lookups).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from pipeline.core.outputs import PipelineError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "hf", "unsloth")


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def trains_embeddings(spec: Any, modules: Dict[str, Any] | None = None) -> bool:
    """Whether a target_modules setting (preset or list) trains the embedding or the head, read without a model."""
    from pipeline.core.modules import EMBED_NAMES, PRESETS

    if isinstance(spec, str):
        return any(g in ("embed", "lm_head") for g in PRESETS.get(spec, ()))
    names = set(EMBED_NAMES) | {str(v) for k, v in (modules or {}).items() if k in ("embed", "lm_head")}
    return any(str(x) in names for x in spec)


def unsloth_blockers(model_cfg, stages: List[str], cpt_targets: Any, sft_targets: Any,
                     tied: bool | None) -> List[str]:
    """The settings of this run that unsloth's get_peft_model cannot train as the plain path does (empty: none).

    `tied=None` (not known before the model is read) counts as tied: `auto` then takes the plain path, and an explicit
    backend=unsloth is checked again against the real model before training (run.validate).
    """
    out = []
    if model_cfg.add_special_tokens:
        out.append("model.add_special_tokens (new token rows are trained with PEFT's trainable tokens, which "
                   "unsloth's get_peft_model does not take)")
    for stage, spec in (("cpt", cpt_targets), ("sft", sft_targets)):
        if stage in stages and tied is not False and trains_embeddings(spec, model_cfg.modules):
            out.append(f"{stage}.target_modules={spec} (embedding training on a model with "
                       f"{'tied' if tied else 'possibly tied'} embeddings: unsloth cannot keep the head tied to the "
                       f"trained copy, unsloth #1971)")
    return out


def resolve_backend(name: str, device: torch.device, blockers: List[str] = ()) -> str:
    """`auto` → unsloth when the run trains on CUDA, unsloth is installed and the settings are ones it can train,
    else hf; `unsloth` insists on all three."""
    if name not in BACKENDS:
        raise PipelineError(f"backend={name!r}: use one of {', '.join(BACKENDS)}")
    if name == "hf":
        return "hf"
    if device.type == "cuda" and device.index not in (None, 0):
        blockers = [f"device={device} (unsloth places the model on the first visible GPU itself: select the GPU with "
                    f"CUDA_VISIBLE_DEVICES={device.index} and device=cuda)", *blockers]
    if name == "unsloth":
        if device.type != "cuda":
            raise PipelineError(f"backend=unsloth needs a CUDA GPU, but this run's device is {device} "
                                f"(torch.cuda.is_available()={torch.cuda.is_available()}); unsloth's CPU fallback "
                                f"would silently run the plain path: use backend=hf or backend=auto")
        if not unsloth_installed():
            raise PipelineError("backend=unsloth: unsloth is not installed; pip install -e '.[gpu]' (or use "
                                "backend=auto, which takes the plain path without it)")
        if blockers:
            raise PipelineError(f"backend=unsloth cannot run with {blockers[0]}; use backend=hf (or backend=auto)")
        return "unsloth"
    if device.type == "cuda" and unsloth_installed():
        if blockers:
            log.info("backend=auto: the plain path, because unsloth cannot run with %s", "; ".join(blockers))
            return "hf"
        return "unsloth"
    return "hf"


def activate(backend: str) -> None:
    """Import unsloth before any Hugging Face library is imported, so that its patches apply."""
    if backend != "unsloth":
        return
    import sys

    late = [m for m in ("transformers", "peft", "trl") if m in sys.modules]
    if late:
        log.warning("unsloth is imported after %s: some of its speed-ups may not apply", ", ".join(late))
    import unsloth  # noqa: F401


# --- argument mapping: the pipeline's settings in unsloth's terms (pure functions, unit-tested on CPU) -------------

def unsloth_load_kwargs(path: str | Path, max_seq_length: int, dtype: torch.dtype, load_in_4bit: bool,
                        trust_remote_code: bool) -> Dict[str, Any]:
    """FastLanguageModel.from_pretrained arguments. The path is made absolute: unsloth looks names of the form
    `org/name` (which a relative path like `outputs/cpt` matches) up online."""
    return {
        "model_name": str(Path(path).resolve()),
        "max_seq_length": max_seq_length,
        "dtype": dtype,
        "load_in_4bit": load_in_4bit,  # unsloth defaults to True; the pipeline's default is 16-bit
        "load_in_8bit": False,
        "full_finetuning": False,
        "trust_remote_code": trust_remote_code,
        "local_files_only": True,
    }


def unsloth_peft_kwargs(targets, r: int, alpha: float, dropout: float, use_rslora: bool, seed: int,
                        trainable_tokens: Dict[str, List[int]] | None = None) -> Dict[str, Any]:
    """FastLanguageModel.get_peft_model arguments for the same LoRA the plain path builds (modules.lora_config).

    embed/lm_head are passed as modules_to_save (trained in full), as the plain path does; with tied embeddings only
    the embedding, as there.
    """
    if trainable_tokens:
        raise PipelineError("model.add_special_tokens with backend=unsloth: new tokens are trained with PEFT's "
                            "trainable tokens, which unsloth's get_peft_model does not take; use backend=hf")
    if targets.tied and targets.modules_to_save:
        raise PipelineError("backend=unsloth with tied embeddings and embed training (target_modules with embed): "
                            "unsloth cannot keep the head tied to the trained copy (unsloth #1971); use backend=hf, "
                            "or target_modules=attn_mlp")
    return {
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": list(targets.lora),
        "modules_to_save": list(targets.modules_to_save) or None,
        "bias": "none",
        "use_rslora": use_rslora,
        "layers_to_transform": targets.layers,  # cpt.layers / sft.layers (None: all), as modules.lora_config
        "layers_pattern": targets.layers_pattern,
        # "unsloth" (offloaded activations) is unsloth's memory saving, but with embed/lm_head in modules_to_save it
        # also offloads the frozen embeddings to os.path.join(temporary_location, config._name_or_path): with the
        # absolute local path that is the model directory itself (unsloth 2026.10.9, models/_utils.py offload_to_disk),
        # which would write into model.path or a cached CPT model. Plain checkpointing there, offloaded elsewhere.
        "use_gradient_checkpointing": True if targets.modules_to_save else "unsloth",
        "random_state": seed,
    }


# --- the two stages' shared steps, per backend ----------------------------------------------------------------------

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def check_attn_implementation(name: Optional[str], device: torch.device, key: str) -> None:
    """A stage's attn_implementation, checked before any model loads (transformers fails deep inside the load)."""
    if name is None:
        return
    if name not in ATTN_IMPLEMENTATIONS:
        raise PipelineError(f"{key}={name!r}: use one of {', '.join(ATTN_IMPLEMENTATIONS)} (or null for the default)")
    if name == "flash_attention_2":
        if device.type != "cuda":
            raise PipelineError(f"{key}=flash_attention_2 needs a CUDA GPU, but this run's device is {device}; use "
                                f"sdpa or null")
        if importlib.util.find_spec("flash_attn") is None:
            raise PipelineError(f"{key}=flash_attention_2: the flash-attn package is not installed "
                                f"(pip install flash-attn), or use sdpa")


def load_for_training(backend: str, path, model_cfg, dtype: torch.dtype, device: torch.device,
                      attn_implementation: Optional[str] = None):
    """The model a LoRA stage trains: 16-bit (moved to the device by the trainer), or 4-bit placed on the device.

    `attn_implementation` applies to the plain path; unsloth uses its own attention kernels.
    """
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        if attn_implementation:
            log.info("attn_implementation=%s is not passed to unsloth, which uses its own attention kernels",
                     attn_implementation)
        model, _ = FastLanguageModel.from_pretrained(**unsloth_load_kwargs(
            path, model_cfg.max_seq_length, dtype, model_cfg.load_in_4bit, model_cfg.trust_remote_code))
        return model
    from pipeline.core.checkpoints import load_model

    return load_model(path, dtype, device if model_cfg.load_in_4bit else torch.device("cpu"),
                      model_cfg.trust_remote_code, load_in_4bit=model_cfg.load_in_4bit,
                      attn_implementation=attn_implementation)


def keep_fp32_masters(model) -> int:
    """Cast the trainable parameters that are in 16 bits to fp32; returns how many were cast.

    With the model in bf16/fp16, PEFT keeps LoRA weights in fp32 but copies modules_to_save (embed_tokens, lm_head
    trained in full) in the model's dtype: AdamW updates of size lr * 1 on weights of size ~1 would then round away
    in bf16's 8-bit mantissa. The frozen base stays 16-bit; the Trainer's autocast (bf16/fp16 arguments) runs the
    matmuls in 16 bits, so only the trained copies cost fp32 memory.
    """
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
            cast += 1
    return cast


def add_lora(backend: str, model, targets, stage_cfg, seed: int, load_in_4bit: bool,
             trainable_tokens: Dict[str, List[int]] | None = None):
    """Wrap `model` with the stage's LoRA (and fully trained embedding copies / new token rows)."""
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        return FastLanguageModel.get_peft_model(model, **unsloth_peft_kwargs(
            targets, stage_cfg.r, stage_cfg.lora_alpha, stage_cfg.lora_dropout, stage_cfg.use_rslora, seed,
            trainable_tokens))
    from peft import get_peft_model

    from pipeline.core.modules import lora_config

    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        # QLoRA's preparation: norms and the unquantized embedding/head in fp32, inputs that carry gradients.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if getattr(stage_cfg, "gradient_checkpointing", False):
        # With frozen embeddings the checkpointed blocks' inputs carry no gradient; the Trainer's non-reentrant
        # checkpointing copes, and this makes any (reentrant) variant back-propagate into the LoRA weights too.
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(targets, stage_cfg.r, stage_cfg.lora_alpha, stage_cfg.lora_dropout,
                                              stage_cfg.use_rslora, trainable_tokens))
    if keep_fp32_masters(model):
        log.info("trainable 16-bit parameters (fully trained embed/head copies) cast to fp32 master weights")
    return model


def for_inference(backend: str, model):
    """unsloth's faster generation path (its own KV cache and kernels); the plain path needs nothing."""
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    return model
