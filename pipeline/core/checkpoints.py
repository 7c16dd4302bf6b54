"""Checkpoints on disk: where a model named by its Hub id sits in the local Hugging Face cache, what a model
directory must hold (read as JSON before anything loads), and loading a tokenizer and a model (16-bit or 4-bit)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

from pipeline.core.devices import check_4bit_support
from pipeline.core.outputs import PipelineError

# .../models--<org>--<name>/snapshots/<commit>: a checkpoint in the Hub's cache layout (huggingface_hub)
SNAPSHOT = re.compile(r"models--(?P<repo>.+)/snapshots/(?P<commit>[0-9a-f]{40})$")


def hub_snapshot(path: str | os.PathLike) -> Optional[tuple[str, str]]:
    """(repo id, commit) when `path` is a snapshot directory of the Hugging Face cache, else None."""
    m = SNAPSHOT.search(Path(path).absolute().as_posix())
    return (m["repo"].replace("--", "/"), m["commit"]) if m else None


def resolve_model_path(spec: str, key: str = "model.path") -> str:
    """A model given as a local directory, or as a Hub id (`org/name`, optionally `@revision`: a branch, tag or
    commit) found in the local Hugging Face cache (HF_HUB_CACHE, or HF_HOME/hub): the directory to read it from.

    Nothing is ever downloaded (local_files_only, and HF_HUB_OFFLINE is set on import): a model that is not in the
    cache is refused with the directory that was searched. A local directory always wins over a Hub id of the same
    spelling; anything that is neither is returned as it is, for check_model_dir to refuse."""
    if not spec or Path(spec).exists():
        return spec
    repo, _, revision = str(spec).partition("@")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        return spec  # a path, not an id
    cache = Path(constants.HF_HUB_CACHE)
    try:
        return snapshot_download(repo, revision=revision or None, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError:
        where = cache / f"models--{repo.replace('/', '--')}"
        what = f"revision {revision!r} of {repo}" if revision and where.is_dir() else repo
        raise PipelineError(f"{key}={spec}: no such directory, and {what} is not in the local Hugging Face cache "
                            f"(searched {where}); nothing is downloaded: copy the model there or give its "
                            f"directory") from None


def check_model_dir(path: str | os.PathLike, key: str = "model.path") -> dict:
    """A local causal-LM checkpoint with safetensors weights; returns its config.json. Read as JSON, without loading
    transformers, so a wrong directory fails in a second with one line instead of a traceback from deep inside."""
    p = Path(path)
    if not p.is_dir():
        raise PipelineError(f"{key}={path}: no such directory (expected a local Hugging Face checkpoint)")
    if not (p / "config.json").is_file():
        raise PipelineError(f"{key}={path}: no config.json in this directory; not a Hugging Face checkpoint")
    try:
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineError(f"{key}={path}: config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise PipelineError(f"{key}={path}: config.json has no model_type; not a transformers model checkpoint")
    archs = config.get("architectures") or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise PipelineError(f"{key}={path}: a {', '.join(archs)} checkpoint, not a causal language model "
                            f"(architectures in config.json)")
    if not any(p.glob("*.safetensors")):
        other = sorted(f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".gguf"))
        raise PipelineError(f"{key}={path}: no .safetensors weights"
                            + (f" (found {', '.join(other[:3])}: weights are only ever read as safetensors, which "
                               f"cannot run code on load; convert them)" if other else ""))
    return config


def load_tokenizer(path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise PipelineError(f"{path}: the tokenizer has no eos_token; CPT needs one to separate documents")
    if tok.pad_token_id is None:
        # Padding positions are masked out of the loss and attention, so reusing EOS as pad is harmless.
        tok.pad_token = tok.eos_token
    return tok


def count_4bit_linears(model) -> int:
    """bitsandbytes 4-bit linear layers in `model` (also under a LoRA wrapper): what was really trained in 4-bit."""
    return sum(1 for m in model.modules()
               if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes"))


def load_model(path, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False,
               load_in_4bit: bool = False, attn_implementation: Optional[str] = None):
    """A causal LM from a local checkpoint; with `load_in_4bit` its linear layers are quantized to nf4 on load.

    The 4-bit settings are QLoRA's (nf4, double quantization, compute in `dtype`). A quantized model is placed on
    `device` while loading: it cannot be moved afterwards. `attn_implementation` (eager, sdpa, flash_attention_2)
    is passed to transformers as is; None leaves its default.
    """
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        check_4bit_support(device)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": str(device)}
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs
    )
    return model if load_in_4bit else model.to(device)


def _config_json(path) -> dict:
    """A checkpoint's config.json as plain JSON ({} if there is none or it is unreadable: check_model_dir reports
    that with one line): readable before transformers is imported."""
    file = Path(path) / "config.json"
    try:
        cfg = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def is_prequantized(path) -> bool:
    """A checkpoint saved already quantized (config.json has a quantization_config): its 16-bit weights are gone."""
    return "quantization_config" in _config_json(path)


def declared_tied(path) -> "bool | None":
    """`tie_word_embeddings` as config.json states it (or its text_config, for multimodal wrappers); None if it
    does not say. Read as JSON, without transformers: the backend is chosen before any Hugging Face import."""
    cfg = _config_json(path)
    for section in (cfg, cfg.get("text_config") or {}):
        if isinstance(section.get("tie_word_embeddings"), bool):
            return section["tie_word_embeddings"]
    return None
