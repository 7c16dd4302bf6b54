"""Small pieces every stage uses: the one error type, atomic and resumable stage outputs, device/dtype choice, model
loading, and the training loop's arguments, checkpoint resumption and non-finite-loss stop."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Optional

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


# Whether logs may quote the user's data (corpus text, SFT records, QA answers): off unless `log_examples=true`,
# because run.log files travel (bug reports, shared drives) and the data is confidential. Set once by run.py.
_LOG_EXAMPLES = False


def log_examples(enabled: bool) -> None:
    global _LOG_EXAMPLES
    _LOG_EXAMPLES = bool(enabled)


def example(text: str, limit: int = 80) -> str:
    """A piece of the user's data for a log line, or a note that it is hidden."""
    return repr(text[:limit]) if _LOG_EXAMPLES else "(hidden: log_examples=true shows examples)"


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


BUILD_SUFFIX = ".build"
TRAINER_DIR = "trainer"  # inside a build directory: the Trainer's checkpoints, the only thing a later build reuses


def build_dir(final: str | os.PathLike) -> Path:
    """Where `resumable_output` builds `final`: a fixed sibling name, so that the next build finds it."""
    final = Path(final)
    return final.with_name(final.name + BUILD_SUFFIX)


@contextlib.contextmanager
def resumable_output(final: str | os.PathLike):
    """Build a training stage's output in `<final>.build/` and publish it by rename, like atomic_output, except
    that the build directory survives a crash: its Trainer checkpoints (`trainer/checkpoint-*`, every save_steps)
    let the next build of the same output resume where the dead one stopped (`train_stage`).

    The directory is kept when the process dies or the stage raises; the next build deletes everything in it but the
    checkpoints, and deletes the checkpoints before the output is published. The caller guarantees one builder per
    output and that the same path means the same settings: the stage cache's lock and key do both (without the
    cache, each run builds into its own new run directory, so nothing is resumed).
    """
    final = Path(final)
    if final.exists():
        raise PipelineError(f"{final}: output directory already exists; refusing to overwrite it")
    final.parent.mkdir(parents=True, exist_ok=True)
    build = build_dir(final)
    build.mkdir(exist_ok=True)
    for leftover in build.iterdir():  # a dead build's half-saved model, stats, ...: never part of this output
        if leftover.name != TRAINER_DIR:
            shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()
    yield build
    shutil.rmtree(build / TRAINER_DIR, ignore_errors=True)
    (build / COMPLETE_MARKER).write_text("ok\n")
    os.replace(build, final)


# One GPU per process: (the device index asked for, the CUDA_VISIBLE_DEVICES this process was pinned to).
_PINNED_GPU: Optional[tuple] = None


def resolve_device(device: str) -> torch.device:
    """`auto` (a GPU when there is one, else the CPU), `cpu`, `cuda` (the first visible GPU) or `cuda:N`.

    A CUDA run is pinned to its one GPU by setting CUDA_VISIBLE_DEVICES before CUDA is first used: the Trainer
    places the model on cuda:0 whatever the arguments say, and with several GPUs visible it would wrap the model in
    DataParallel (another effective batch size, other results). So device=cuda:1 makes physical GPU 1 (the second
    entry of an existing CUDA_VISIBLE_DEVICES) this process's only GPU, which it calls cuda.
    """
    if device == "cpu" or not (device == "auto" or device == "cuda" or device.startswith("cuda:")):
        return torch.device(device)
    if device == "auto" and torch.cuda.device_count() == 0:  # counts via NVML where it can: CUDA stays uninitialised
        return torch.device("cpu")
    index = device.partition(":")[2] if device.startswith("cuda:") else "0"
    if not index.isdigit():
        raise PipelineError(f"device={device}: use auto, cpu, cuda or cuda:N (N = the GPU's index)")
    return _pin_gpu(int(index), device)


def _pin_gpu(index: int, device: str) -> torch.device:
    global _PINNED_GPU
    if _PINNED_GPU is not None:
        if _PINNED_GPU[0] != index:
            raise PipelineError(f"device={device}: this process already trains on GPU {_PINNED_GPU[0]} "
                                f"(CUDA_VISIBLE_DEVICES={_PINNED_GPU[1]}); one GPU per process")
        return torch.device("cuda")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count()  # the GPUs CUDA_VISIBLE_DEVICES lets through, counted without starting CUDA
    if count == 0:
        raise PipelineError(f"device={device} but CUDA is not available on this machine (use device=cpu or auto)")
    if index >= count:
        raise PipelineError(f"device={device}: only {count} GPU(s) visible (cuda:0 to cuda:{count - 1}"
                            + (f", CUDA_VISIBLE_DEVICES={visible})" if visible else ")"))
    entries = [v.strip() for v in visible.split(",")] if visible else None
    pinned = entries[index] if entries and index < len(entries) else str(index)
    os.environ["CUDA_VISIBLE_DEVICES"] = pinned
    if not torch.cuda.is_available():
        raise PipelineError(f"device={device} but CUDA is not available on this machine (use device=cpu or auto)")
    torch.cuda.init()
    if torch.cuda.device_count() != 1:  # CUDA had read CUDA_VISIBLE_DEVICES already: the pin came too late
        raise PipelineError(f"device={device}: CUDA was initialised in this process before the GPU could be chosen; "
                            f"start the run with CUDA_VISIBLE_DEVICES={pinned} and device=cuda")
    _PINNED_GPU = (index, pinned)
    if pinned != visible:
        log.info("device=%s: this process uses only GPU %s (CUDA_VISIBLE_DEVICES=%s), which it calls cuda:0", device,
                 pinned, pinned)
    return torch.device("cuda")


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


def training_arguments(cls, stage_cfg, out_dir, device: torch.device, dtype: torch.dtype, seed: int,
                       backend: str = "hf", **extra):
    """TrainingArguments (or TRL's SFTConfig) from a LoRA stage section; `extra` overrides any of them.

    A checkpoint every `save_steps` goes to `out_dir` (resumable_output keeps it across a crash, train_stage resumes
    from it); nothing is reported to any service.
    """
    save_steps = getattr(stage_cfg, "save_steps", 0)
    # unsloth sets up its own checkpointing in get_peft_model; the Trainer must not wrap the model a second time.
    checkpointing = bool(getattr(stage_cfg, "gradient_checkpointing", False)) and backend != "unsloth"
    kwargs = dict(
        output_dir=str(out_dir),
        num_train_epochs=stage_cfg.num_epochs,
        max_steps=stage_cfg.max_steps,
        per_device_train_batch_size=stage_cfg.batch_size,
        gradient_accumulation_steps=stage_cfg.gradient_accumulation_steps,
        learning_rate=stage_cfg.learning_rate,
        weight_decay=stage_cfg.weight_decay,
        warmup_steps=stage_cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps (transformers 5)
        lr_scheduler_type=stage_cfg.lr_scheduler,
        logging_steps=stage_cfg.logging_steps,
        # Only the newest checkpoint is needed to resume; the Trainer deletes the older one after the new one is
        # complete, so a kill while saving still leaves one to resume from.
        save_strategy="steps" if save_steps > 0 else "no",
        **({"save_steps": save_steps, "save_total_limit": 1} if save_steps > 0 else {}),
        # By default the Trainer replaces a nan/inf step loss by the running mean in its log, which would hide it
        # from the non-finite-loss stop (train_stage).
        logging_nan_inf_filter=False,
        gradient_checkpointing=checkpointing,
        # Non-reentrant checkpointing also back-propagates into LoRA weights of blocks whose inputs carry no gradient
        # (frozen embeddings); the reentrant variant silently drops them (add_lora also makes inputs require grad).
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        report_to="none",  # no wandb/tensorboard/comet: the pipeline never phones home
        use_cpu=device.type == "cpu",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=seed,
        data_seed=seed,
    )
    kwargs.update(extra)
    return cls(**kwargs)


def resume_checkpoint(trainer_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete Trainer checkpoint in `trainer_dir` (None: none), after deleting the others.

    The Trainer writes a checkpoint's files one after another, trainer_state.json last: a checkpoint whose state file
    is missing or unreadable was cut short by a kill, and older complete ones are superseded by the newest, except
    the best one it names (early stopping loads that at the end).
    """
    found = []
    for path in Path(trainer_dir).glob("checkpoint-*"):
        step = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if step and path.is_dir():
            found.append((int(step[1]), path))
    newest = next((path for _, path in sorted(found, reverse=True) if _trainer_state(path) is not None), None)
    keep = {newest.name, Path(_trainer_state(newest).get("best_model_checkpoint") or "").name} if newest else set()
    for _, path in found:
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)
    return newest


def _trainer_state(checkpoint: Path) -> Optional[dict]:
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "global_step" in state else None


def non_finite_loss_callback(stage: str):
    """A TrainerCallback that stops training with one line when a logged loss is nan or inf (nothing is published).

    The Trainer logs the mean loss of every `logging_steps` steps and the run's mean at the end; one non-finite step
    makes that mean non-finite (logging_nan_inf_filter is off), so the stop names the window it happened in.
    """
    from transformers import TrainerCallback

    class StopOnNonFiniteLoss(TrainerCallback):
        def __init__(self):
            self.last_logged = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.last_logged = state.global_step  # a resumed run starts after its checkpoint

        def on_log(self, args, state, control, logs=None, **kwargs):
            for name in ("loss", "train_loss"):
                value = (logs or {}).get(name)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    first, step = min(self.last_logged + 1, state.global_step), state.global_step
                    where = f"at step {step}" if first == step else f"in steps {first}-{step}"
                    raise PipelineError(
                        f"{stage}: the training loss is {value} {where} (of {state.max_steps}); nothing was "
                        f"published. Lower {stage}.learning_rate, check the {stage} data for empty or garbled "
                        f"records, and with model.dtype=float16 train in bfloat16 (fp16 overflows)")
            if "loss" in (logs or {}):
                self.last_logged = state.global_step

    return StopOnNonFiniteLoss()


def train_stage(trainer, stage: str):
    """`trainer.train()` for a LoRA stage: resumed from the newest complete checkpoint an interrupted build left in
    its output directory, and stopped with a PipelineError when the loss turns nan or inf.

    Returns (the TrainOutput, the trainer state of the checkpoint it resumed from, or None when it started afresh).
    """
    trainer.add_callback(non_finite_loss_callback(stage))
    checkpoint = resume_checkpoint(trainer.args.output_dir)
    resumed = _trainer_state(checkpoint) if checkpoint else None
    if resumed:
        log.info("%s: resuming an interrupted build from %s (step %d of %d)", stage, checkpoint,
                 resumed["global_step"], resumed.get("max_steps") or 0)
    return trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None), resumed


def count_trainable(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
