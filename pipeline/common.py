"""Small pieces every stage uses: the one error type, atomic stage outputs, device/dtype choice, model loading."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch

log = logging.getLogger("pipeline")

COMPLETE_MARKER = ".complete"


class PipelineError(Exception):
    """Bad input or a failed check: reported as one line, no traceback (unless `debug=true`)."""


@contextlib.contextmanager
def atomic_output(final: str | os.PathLike):
    """Build a stage output in a temporary sibling directory and publish it by rename.

    The completion marker is written last, then the directory is renamed into place, so a stage that dies midway
    leaves only a `*.tmp-*` directory that nothing ever reads as a finished output.
    """
    final = Path(final)
    if final.exists():
        raise PipelineError(f"{final}: output directory already exists; refusing to overwrite it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"device={device} but CUDA is not available on this machine (use device=cpu or auto)")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is fp32 on CPU (bf16 matmuls are ~4x slower there) and bf16 on a GPU that supports it."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise PipelineError(f"model.dtype={dtype!r} is not one of auto, {', '.join(table)}")
    if device.type == "cpu" and table[dtype] != torch.float32:
        log.warning("model.dtype=%s on CPU: training in float32 instead (half precision is slow and lossy on CPU)",
                    dtype)
        return torch.float32
    return table[dtype]


def check_model_dir(path: str | os.PathLike, key: str = "model.path") -> Path:
    p = Path(path)
    if not p.is_dir():
        raise PipelineError(f"{key}={path}: no such directory (expected a local Hugging Face checkpoint)")
    if not (p / "config.json").is_file():
        raise PipelineError(f"{key}={path}: no config.json in this directory; not a Hugging Face checkpoint")
    return p


def load_tokenizer(path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise PipelineError(f"{path}: the tokenizer has no eos_token; CPT needs one to separate documents")
    if tok.pad_token_id is None:
        # Padding positions are masked out of the loss and attention, so reusing EOS as pad is harmless.
        tok.pad_token = tok.eos_token
    return tok


def check_4bit_support(device: torch.device) -> None:
    """model.load_in_4bit needs bitsandbytes and a 4-bit kernel for `device`: try one tiny nf4 round trip first, so
    a machine that cannot run it fails with one line before any training, not deep inside a model load."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise PipelineError("model.load_in_4bit=true needs bitsandbytes: pip install bitsandbytes (or the [gpu] "
                            "extra)") from None
    try:
        q, state = bnb.functional.quantize_4bit(torch.randn(64, 64, device=device), quant_type="nf4")
        bnb.functional.dequantize_4bit(q, state)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot run 4-bit on this device"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PipelineError(f"model.load_in_4bit=true: bitsandbytes {bnb.__version__} cannot run 4-bit (nf4) on "
                            f"{device} here ({first}); set model.load_in_4bit=false") from None


def count_4bit_linears(model) -> int:
    """bitsandbytes 4-bit linear layers in `model` (also under a LoRA wrapper): what was really trained in 4-bit."""
    return sum(1 for m in model.modules()
               if type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes"))


def load_model(path, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False,
               load_in_4bit: bool = False):
    """A causal LM from a local checkpoint; with `load_in_4bit` its linear layers are quantized to nf4 on load.

    The 4-bit settings are QLoRA's (nf4, double quantization, compute in `dtype`). A quantized model is placed on
    `device` while loading: it cannot be moved afterwards.
    """
    from transformers import AutoModelForCausalLM

    kwargs = {}
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
    """A checkpoint's config.json as plain JSON ({} if there is none): readable before transformers is imported."""
    file = Path(path) / "config.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


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


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically (temp file + rename), so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _logged_losses(trainer) -> list:
    """The training losses the trainer logged (every logging_steps); empty for a run shorter than that."""
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def final_loss(trainer, mean_loss: float) -> float:
    """The last logged loss; the run's mean loss when it was too short to log one."""
    return (_logged_losses(trainer) or [mean_loss])[-1]


def loss_summary(trainer, mean_loss: float) -> str:
    """`loss first -> last` for the stage's log line, or the mean when the run was too short for a curve."""
    losses = _logged_losses(trainer)
    if len(losses) > 1:
        return f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    return f"mean loss {mean_loss:.4f} (fewer steps than 2 x logging_steps: no loss curve)"


def training_arguments(cls, stage_cfg, out_dir, device: torch.device, dtype: torch.dtype, seed: int, **extra):
    """TrainingArguments (or TRL's SFTConfig) from a LoRA stage section; nothing is saved or reported mid-run."""
    extra.setdefault("num_train_epochs", stage_cfg.num_epochs)
    return cls(
        output_dir=str(out_dir),
        max_steps=stage_cfg.max_steps,
        per_device_train_batch_size=stage_cfg.batch_size,
        gradient_accumulation_steps=stage_cfg.gradient_accumulation_steps,
        learning_rate=stage_cfg.learning_rate,
        weight_decay=stage_cfg.weight_decay,
        warmup_steps=stage_cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps (transformers 5)
        lr_scheduler_type=stage_cfg.lr_scheduler,
        logging_steps=stage_cfg.logging_steps,
        save_strategy="no",
        report_to="none",  # no wandb/tensorboard/comet: the pipeline never phones home
        use_cpu=device.type == "cpu",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=seed,
        data_seed=seed,
        **extra,
    )


def count_trainable(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
