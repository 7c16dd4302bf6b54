"""Ctrl-C (SIGINT) and a scheduler's pre-emption (SIGTERM): one line saying what was kept, and the status a shell
expects (128 + the signal's number: 130, 143), instead of a long traceback or a silent exit.

Both signals raise `Interrupted` (a KeyboardInterrupt, so every `except Exception` lets it through) wherever the
main thread is; the stage in progress dies as if killed, and what survives is what survives a kill: the stage cache's
finished outputs and a training stage's last complete checkpoint (pipeline/core/outputs.py, resumable_output). Nothing
half-written is ever published. run.py adds the stage in progress to the exception and turns it into the line.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Iterable, Iterator, Optional

from pipeline.core.outputs import TRAINER_DIR, build_dir

CAUGHT = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(error: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process that a signal stopped (130 for Ctrl-C, 143 for
    SIGTERM). A plain KeyboardInterrupt came from SIGINT."""
    return 128 + getattr(error, "signum", signal.SIGINT)


def _raise(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within: SIGINT and SIGTERM raise Interrupted (Python's default SIGTERM ends the process on the spot, without a
    word and without `finally` blocks). The previous handlers come back afterwards. Only the main thread can set
    handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in CAUGHT}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def ignore_further() -> None:
    """A second Ctrl-C while the first is being reported would print a traceback over the line."""
    if threading.current_thread() is threading.main_thread():
        for s in CAUGHT:
            signal.signal(s, signal.SIG_IGN)


def kept_line(error: KeyboardInterrupt, stage: Optional[str], output: Optional[Path], finished: Iterable[str],
              cache_enabled: bool, save_steps: Optional[int] = None) -> str:
    """The one line for an interruption: which signal, the stage it stopped, what of that stage was kept (a training
    stage's last complete checkpoint and its step), which stages are cached, and that the same command goes on."""
    from pipeline.core.training import checkpoint_step, newest_checkpoint

    name = signal.Signals(exit_status(error) - 128).name
    finished = list(finished)
    done = f"; stage(s) {', '.join(finished)} finished and cached" if finished and cache_enabled else ""
    if not cache_enabled:
        return (f"interrupted by {name}{f' in stage {stage}' if stage else ''}: cache.enabled=false, so nothing is "
                f"resumed; the same command starts over")
    if stage is None:
        where = "after its last stage" if finished else "before the first stage started (checks, demo model build)"
        return f"interrupted by {name} {where}{done}; nothing half-done was kept; run the same command to continue"
    checkpoint = newest_checkpoint(build_dir(output) / TRAINER_DIR) if output is not None else None
    if checkpoint is not None:
        step, total = checkpoint_step(checkpoint)
        return (f"interrupted by {name} in stage {stage}: its last checkpoint, step {step}"
                f"{f' of {total}' if total else ''}, is kept in {checkpoint}{done}; run the same command to resume "
                f"from it")
    why = (f"before its first checkpoint ({stage}.save_steps={save_steps})" if save_steps else
           "(it saves no checkpoints)" if save_steps == 0 else "(it keeps no partial output)")
    return (f"interrupted by {name} in stage {stage} {why}: it starts over{done}; run the same command to continue")
