"""What a person sees while the pipeline runs: one progress bar per training stage, one line per finished stage,
then the final table. Everything else (the trainer's per-step dicts, model and data details, library messages) goes
to `run.log` in the run directory.

The split is made by Hydra's job logging (conf/hydra/job_logging/pipeline.yaml): the file handler takes every INFO
line, the console handler only what `ConsoleFilter` lets through. Training stages replace the Trainer's default
printer (which prints every logged dict to the console) with `ConsoleProgress`:

    trainer = Trainer(...)
    attach_progress(trainer, "cpt")     # a tqdm bar: step/total, loss, tokens/s, ETA; the dicts go to run.log
    log.info("stage cpt built in 12.3s", extra=CONSOLE)   # a line that also goes to the console
"""

from __future__ import annotations

import logging
import sys
import time
from typing import List, Optional

CONSOLE = {"console": True}  # pass as `extra=` to put an INFO line on the console as well as in run.log

# The trainer's logged dicts, one line per logging step. Not a console logger: ConsoleFilter keeps its INFO lines
# in run.log.
steps_log = logging.getLogger("pipeline.steps")


class ConsoleFilter(logging.Filter):
    """The console handler's filter: lines logged with `extra=CONSOLE`, the pipeline's own warnings (each written
    because it changes what a result means), and errors from anywhere. Library warnings (deprecations, "this
    argument is ignored" notes) and every INFO line stay in run.log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "console", False) or record.levelno >= logging.ERROR:
            return True
        return record.levelno >= logging.WARNING and record.name.split(".")[0] == "pipeline"


class ConsoleFormatter(logging.Formatter):
    """The message alone for console lines; `warning: ...` / `error: ...` (and the logger's name, for a library's)
    otherwise."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno < logging.WARNING:
            return text
        source = "" if record.name.split(".")[0] == "pipeline" else f" [{record.name}]"
        return f"{record.levelname.lower()}{source}: {text}"


def route_library_logs() -> None:
    """Send transformers' and datasets' log records, and Python warnings, through the root logger (so into run.log
    and past ConsoleFilter) instead of their own stderr handlers, which bypass both."""
    import datasets
    import transformers

    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    datasets.utils.logging.get_logger()  # creates the library's root logger with its own stream handler...
    for h in list(logging.getLogger("datasets").handlers):  # ...which would print to stderr as well as propagate
        logging.getLogger("datasets").removeHandler(h)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger


def _tokens_per_step(trainer) -> Optional[float]:
    """Mean tokens of a training row (up to 200 rows, evenly spaced) x rows per optimizer step; None when the
    dataset does not say. An estimate for the bar's tokens/s: CPT blocks all have the block length but the last,
    SFT records vary (TRL truncates them to max_length)."""
    ds = getattr(trainer, "train_dataset", None)
    try:
        n = len(ds)
        rows = [ds[i * n // min(n, 200)]["input_ids"] for i in range(min(n, 200))]
    except Exception:  # noqa: BLE001  (no length, no input_ids: the bar shows no tokens/s)
        return None
    if not rows:
        return None
    args = trainer.args
    max_len = getattr(args, "max_length", None) or float("inf")
    mean = sum(min(len(r), max_len) for r in rows) / len(rows)
    return mean * args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)


def loss_history(trainer) -> List[List[float]]:
    """[[step, loss], ...]: every training loss the trainer logged (every `logging_steps` steps)."""
    return [[e["step"], e["loss"]] for e in trainer.state.log_history if "loss" in e and "step" in e]


class ConsoleProgress:
    """A TrainerCallback (duck-typed, so this module imports without transformers): a tqdm bar per training run on
    the console, each logged dict as one line of run.log."""

    def __init__(self, stage: str, tokens_per_step: Optional[float] = None):
        self.stage, self.tokens_per_step = stage, tokens_per_step
        self.bar, self.t0, self.start_step, self.loss, self.tty = None, 0.0, 0, None, False

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if not state.is_world_process_zero:
            return
        self.tty = sys.stderr.isatty()
        self.t0, self.start_step = time.time(), state.global_step
        # On a terminal the bar redraws in place; in a log file (CI, nohup) every redraw is kept, so redraw rarely.
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.stage, unit="step",
                        dynamic_ncols=True, mininterval=0.5 if self.tty else 30.0, file=sys.stderr,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps "
                                   "[{elapsed}<{remaining}{postfix}]")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        self.bar.update(state.global_step - self.bar.n)
        self._postfix(refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        steps_log.info("%s step %d/%d: %s", self.stage, state.global_step, state.max_steps,
                       {k: round(v, 6) if isinstance(v, float) else v for k, v in logs.items()})
        if "loss" in logs and self.bar is not None:
            self.loss = float(logs["loss"])
            self._postfix(refresh=self.tty)  # a new loss shows at once on a terminal, at the next redraw in a log

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:  # the postfix keeps the last step's tokens/s (the time from here on is saving)
            self.bar.update(state.global_step - self.bar.n)
            self.bar.close()
            self.bar = None

    def _postfix(self, refresh: bool) -> None:
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        seconds = time.time() - self.t0
        if self.tokens_per_step and seconds > 0 and self.bar.n > self.start_step:
            parts.append(f"{self.tokens_per_step * (self.bar.n - self.start_step) / seconds:,.0f} tokens/s")
        if parts:
            self.bar.set_postfix_str(", ".join(parts), refresh=refresh)

    def __getattr__(self, name):
        # The Trainer calls every on_* event on every callback; the ones not defined above do nothing.
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def attach_progress(trainer, stage: str) -> ConsoleProgress:
    """Replace the Trainer's console printer (ProgressCallback, or PrinterCallback when tqdm is disabled) with a
    ConsoleProgress for `stage`; returns it."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cls in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cls)
    progress = ConsoleProgress(stage, _tokens_per_step(trainer))
    trainer.add_callback(progress)
    return progress
