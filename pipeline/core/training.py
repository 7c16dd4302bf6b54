"""The training loop's shared pieces: TrainingArguments from a stage section, resuming from the newest complete
checkpoint, the stop on a non-finite loss, and loss summaries."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from pipeline.core.outputs import PipelineError

log = logging.getLogger("pipeline")

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


def newest_checkpoint(trainer_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete Trainer checkpoint in `trainer_dir` (None: none); deletes nothing.

    The Trainer writes a checkpoint's files one after another, trainer_state.json last: a checkpoint whose state file
    is missing or unreadable was cut short by a kill."""
    found = []
    for path in Path(trainer_dir).glob("checkpoint-*"):
        step = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if step and path.is_dir():
            found.append((int(step[1]), path))
    return next((path for _, path in sorted(found, reverse=True) if _trainer_state(path) is not None), None)


def checkpoint_step(checkpoint: Path) -> tuple:
    """(the optimizer step a complete checkpoint was saved at, the run's total steps or None)."""
    state = _trainer_state(checkpoint) or {}
    return state.get("global_step"), state.get("max_steps") or None


def resume_checkpoint(trainer_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete Trainer checkpoint in `trainer_dir` (None: none), after deleting the others: older
    complete ones are superseded by the newest, except the best one it names (early stopping loads that at the end),
    and incomplete ones were cut short by a kill."""
    newest = newest_checkpoint(trainer_dir)
    keep = {newest.name, Path(_trainer_state(newest).get("best_model_checkpoint") or "").name} if newest else set()
    for path in Path(trainer_dir).glob("checkpoint-*"):
        if re.fullmatch(r"checkpoint-\d+", path.name) and path.is_dir() and path.name not in keep:
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
