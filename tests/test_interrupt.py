"""Ctrl-C and SIGTERM: one line saying what was kept and that the same command resumes, exit status 130 / 143, no
traceback (unless debug=true), nothing half-written published.

Real subprocesses get real signals: sent by the process to itself at an exact point (an audit hook fires when a
checkpoint file is opened for writing, as in tests/test_crash.py), or from outside once a checkpoint is on disk, as
a user's Ctrl-C or a scheduler's pre-emption arrives."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_overrides
from test_cli import ROOT, run_cli, user_env

SIGNAL_ON_WRITE = """
import os, re, signal, sys
_pattern, _sent = re.compile(os.environ["SIGNAL_ON_WRITE"]), []
def _signal(event, args):
    if event != "open" or _sent or not _pattern.search(str(args[0])):
        return
    mode, flags = args[1], args[2] if len(args) > 2 else 0
    if any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR)):
        _sent.append(1)
        os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
sys.addaudithook(_signal)
"""


def _cpt_args(model, data, tmp_path, **extra):
    return tiny_overrides(model, data, **{"cache.dir": tmp_path / "cache", "hydra.run.dir": tmp_path / "run",
                                          "stages": "[cpt]", "cpt.save_steps": 1, **extra})


def _lines(stderr: str) -> list:
    """stderr without the progress bars' carriage-return redraws and blank lines."""
    return [line.rsplit("\r", 1)[-1] for line in stderr.splitlines() if line.rsplit("\r", 1)[-1].strip()]


def _published(cache: Path) -> list:
    return sorted(p.name for p in (cache / "cpt").glob("*") if (p / ".complete").is_file()) if cache.exists() else []


def test_ctrl_c_mid_cpt_says_what_was_kept_and_the_same_command_resumes(tiny_model, data_files, tmp_path):
    """Ctrl-C arrives while checkpoint 3 of 4 is being written: the line names checkpoint 2 (the last complete one),
    the status is 130, nothing is published, and the same command then resumes at step 2 and finishes."""
    args = _cpt_args(tiny_model, data_files, tmp_path, **{"cpt.max_steps": 4})
    r = run_cli(args, prelude=SIGNAL_ON_WRITE, env={"SIGNAL_ON_WRITE": r"/checkpoint-3/", "SIGNAL": "SIGINT"})
    assert r.returncode == 130, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr, r.stderr[-3000:]
    build = next((tmp_path / "cache" / "cpt").glob("*.build"))
    checkpoint = build / "trainer" / "checkpoint-2"
    assert _lines(r.stderr)[-1] == (f"interrupted by SIGINT in stage cpt: its last checkpoint, step 2 of 4, is kept "
                                    f"in {checkpoint}; run the same command to resume from it")
    assert (checkpoint / "trainer_state.json").is_file()
    assert _published(tmp_path / "cache") == []  # nothing half-trained is a finished output
    assert (tmp_path / "run" / "error.txt").read_text().startswith("Interrupted: interrupted by SIGINT in stage cpt")

    again = run_cli(args)
    assert again.returncode == 0, again.stderr[-3000:]
    key = build.name.removesuffix(".build")
    assert _published(tmp_path / "cache") == [key]
    stats = json.loads((tmp_path / "cache" / "cpt" / key / "cpt_stats.json").read_text())
    assert (stats["resumed_from_step"], stats["steps"]) == (2, 4)


def test_sigterm_from_outside_is_reported_with_status_143(tiny_model, data_files, tmp_path):
    """A scheduler's SIGTERM at some moment of CPT: the line names the newest complete checkpoint on disk and its
    step; the status is 143 and there is no traceback."""
    args = _cpt_args(tiny_model, data_files, tmp_path, **{"cpt.max_steps": 5000})
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.run", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=user_env(HYDRA_FULL_ERROR="0"))
    deadline = time.time() + 240
    while not list((tmp_path / "cache").glob("cpt/*.build/trainer/checkpoint-*/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    line = _lines(stderr)[-1]
    m = re.fullmatch(r"interrupted by SIGTERM in stage cpt: its last checkpoint, step (\d+) of 5000, is kept in "
                     r"(\S+); run the same command to resume from it", line)
    assert m, line
    kept = Path(m[2])
    assert kept.name == f"checkpoint-{m[1]}"
    assert json.loads((kept / "trainer_state.json").read_text())["global_step"] == int(m[1])
    steps = [int(p.name.split("-")[1]) for p in kept.parent.glob("checkpoint-*")
             if (p / "trainer_state.json").is_file()]
    assert max(steps) == int(m[1])  # the newest complete one, not an older one
    assert _published(tmp_path / "cache") == []


@pytest.fixture
def handlers():
    """Reporting an interruption ignores further signals: give this test process its handlers back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("debug", [False, True])
def test_debug_keeps_the_traceback(tmp_path, capsys, handlers, debug):
    from omegaconf import OmegaConf

    from pipeline.core.interrupt import Interrupted
    from pipeline.run import interrupted

    cfg = OmegaConf.create({"debug": debug, "cache": {"enabled": True}})
    try:
        raise Interrupted(signal.SIGTERM)
    except KeyboardInterrupt as e:
        assert interrupted(e, cfg, tmp_path, multirun=False) == 143
    err = capsys.readouterr().err
    assert ("Traceback (most recent call last)" in err) == debug and ("Interrupted: SIGTERM" in err) == debug
    assert _lines(err)[-1].startswith("interrupted by SIGTERM before the first stage started")


def test_an_interrupted_sweep_stops(tmp_path, capsys, handlers):
    """In a multirun the remaining cells must not start: the job's error.txt says why, and the process exits 130."""
    from omegaconf import OmegaConf

    from pipeline.run import interrupted

    cfg = OmegaConf.create({"debug": False, "cache": {"enabled": True}})
    with pytest.raises(SystemExit) as stop:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            interrupted(e, cfg, tmp_path / "3", multirun=True)
    assert stop.value.code == 130
    line = _lines(capsys.readouterr().err)[-1]
    assert line.startswith("interrupted by SIGINT before the first stage started") and line.endswith(
        f"; the sweep stopped here (python -m pipeline.aggregate {tmp_path} tables the finished cells)")
    assert (tmp_path / "3" / "error.txt").read_text() == f"Interrupted: {line}\n"


# ------------------------------------------------------------------ the line itself, without a process


def test_what_the_line_says_in_each_situation(tmp_path):
    from pipeline.core.interrupt import Interrupted, kept_line

    term, out = Interrupted(signal.SIGTERM), tmp_path / "cache" / "sft" / "0123456789abcdef"
    assert kept_line(KeyboardInterrupt(), None, None, (), True) == (
        "interrupted by SIGINT before the first stage started (checks, demo model build); nothing half-done was "
        "kept; run the same command to continue")
    assert kept_line(term, "sft", out, ["cpt", "merge"], True, save_steps=200) == (
        "interrupted by SIGTERM in stage sft before its first checkpoint (sft.save_steps=200): it starts over; "
        "stage(s) cpt, merge finished and cached; run the same command to continue")
    assert kept_line(term, "eval", out, ["cpt"], True) == (
        "interrupted by SIGTERM in stage eval (it keeps no partial output): it starts over; stage(s) cpt finished "
        "and cached; run the same command to continue")
    assert kept_line(term, "cpt", out, [], False, save_steps=1) == (
        "interrupted by SIGTERM in stage cpt: cache.enabled=false, so nothing is resumed; the same command starts "
        "over")
    # a checkpoint whose trainer_state.json is missing was cut short: the one before it is what was kept
    for step, complete in ((4, True), (6, False)):
        ckpt = tmp_path / "cache" / "sft" / "0123456789abcdef.build" / "trainer" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        if complete:
            (ckpt / "trainer_state.json").write_text('{"global_step": 4, "max_steps": 10}')
    assert kept_line(term, "sft", out, ["cpt", "merge"], True, save_steps=2) == (
        f"interrupted by SIGTERM in stage sft: its last checkpoint, step 4 of 10, is kept in {ckpt.parent}/"
        f"checkpoint-4; stage(s) cpt, merge finished and cached; run the same command to resume from it")


def test_the_handlers_are_restored():
    from pipeline.core.interrupt import Interrupted, interruptible

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as e, interruptible():
        signal.raise_signal(signal.SIGTERM)
    assert e.value.signum == signal.SIGTERM and isinstance(e.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before
