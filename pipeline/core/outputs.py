"""Stage outputs: the one error type, outputs published atomically (or resumably, for training stages), JSON
written atomically, and whether logs may quote the user's data."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

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


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically (temp file + rename), so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
