"""Crashes lose nothing and half-written outputs are never reused: a sweep killed with SIGKILL (no cleanup runs) at
several points, then re-run, ends with the same table as a sweep that was never interrupted. Also: two sweeps
started together never share a directory.

The kill comes from inside the process, at an exact point: an audit hook sends SIGKILL to the process itself when
it opens a matching file for writing (the same hook mechanism as the no-network test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import tiny_overrides
from test_cli import ROOT, run_cli

KILL = """
import os, re, signal, sys
_pattern = re.compile(os.environ["KILL_ON_WRITE"])
def _kill(event, args):
    if event != "open" or not _pattern.search(str(args[0])):
        return
    mode, flags = args[1], args[2] if len(args) > 2 else 0
    writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
    if writing:
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(_kill)
"""

# Where a real crash hurts most: mid-CPT (checkpoint 2 half written, checkpoint 1 complete), while the merged model
# is being saved, and while the evaluation writes its answers.
KILL_POINTS = {
    "cpt": r"/cache/cpt/[0-9a-f]{16}[^/]*/.*checkpoint-2/",
    "merge save": r"/cache/merge/[0-9a-f]{16}[^/]+/",
    "eval": r"/cache/eval/[0-9a-f]{16}[^/]+/answers\.jsonl",
}
# Columns that say how a run went (built or reused, seconds, paths), not what it measured.
VOLATILE = ("time/", "stage/", "key/", "job", "dir", "cpt_adapter", "cpt_model", "sft_adapter")


def _sweep(model, data, sweep_dir: Path, cache: Path, kill: str | None = None):
    args = ["-m", *tiny_overrides(model, data, **{"hydra.sweep.dir": sweep_dir, "cache.dir": cache,
                                                  "cpt.max_steps": 3, "cpt.save_steps": 1, "sft.max_steps": 2,
                                                  "eval.max_questions": 2})]
    return run_cli(args, prelude=KILL if kill else None, env={"KILL_ON_WRITE": kill} if kill else None)


def _table(sweep_dir: Path) -> pd.DataFrame:
    df = pd.read_csv(sweep_dir / "results.csv")
    # a one-cell sweep lists its overrides as columns: the directories differ between the two sweeps by design
    return df[[c for c in df.columns if not c.startswith(VOLATILE) and not c.endswith((".dir", ".path"))]]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, data_files, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    r = _sweep(tiny_model, data_files, tmp / "sweep", tmp / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    return _table(tmp / "sweep")


def _killed_then_rerun(point, tiny_model, data_files, tmp_path, uninterrupted):
    cache, sweep = tmp_path / "cache", tmp_path / "sweep"
    killed = _sweep(tiny_model, data_files, sweep, cache, kill=KILL_POINTS[point])
    assert killed.returncode == -9, f"the kill point was never reached: {killed.stderr[-2000:]}"
    assert not (sweep / "results.csv").exists()
    again = _sweep(tiny_model, data_files, sweep, cache)
    assert again.returncode == 0, again.stderr[-3000:]
    pd.testing.assert_frame_equal(_table(sweep), uninterrupted)
    # nothing half-built is left where a finished output would be read, and nothing partial was published
    for stage_dir in cache.iterdir():
        if stage_dir.is_dir():
            for entry in stage_dir.iterdir():
                if entry.is_dir() and len(entry.name) == 16:
                    assert (entry / ".complete").is_file(), entry


def test_killed_while_saving_the_merge_then_rerun_gives_the_same_table(tiny_model, data_files, tmp_path,
                                                                         uninterrupted):
    _killed_then_rerun("merge save", tiny_model, data_files, tmp_path, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["cpt", "eval"])
def test_killed_elsewhere_then_rerun_gives_the_same_table(point, tiny_model, data_files, tmp_path, uninterrupted):
    _killed_then_rerun(point, tiny_model, data_files, tmp_path, uninterrupted)


def test_two_sweeps_started_together_never_share_a_directory(tiny_model, data_files, tmp_path):
    """The default sweep directory (outputs/sweeps/<time>) of two sweeps started in the same second."""
    args = [sys.executable, "-m", "pipeline.run", "-m", *map(str, tiny_overrides(
        tiny_model, data_files, **{"cache.dir": tmp_path / "cache", "stages": "[cpt]", "cpt.max_steps": 1})),
            "seed=1,2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    sweeps = sorted((tmp_path / "outputs" / "sweeps").iterdir())
    assert len(sweeps) == 2
    for s in sweeps:  # each sweep has its own two jobs, nobody else's
        assert sorted(p.name for p in s.iterdir() if p.is_dir() and p.name.isdigit()) == ["0", "1"]


OOM = """
import torch
import pipeline.stages.sft
_train = pipeline.stages.sft.train_sft
def _train_or_oom(cfg, *args, **kwargs):
    if cfg.lora_alpha == 8:  # one cell of the sweep runs out of GPU memory
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return _train(cfg, *args, **kwargs)
pipeline.stages.sft.train_sft = _train_or_oom
"""


def test_a_cell_out_of_memory_does_not_stop_the_sweep(tiny_model, data_files, tmp_path):
    """The failing cell is reported with what to lower; the other cell runs; the table is written; exit 1."""
    sweep = tmp_path / "sweep"
    r = run_cli(["-m", *tiny_overrides(tiny_model, data_files, **{"hydra.sweep.dir": sweep, "eval.max_questions": 1}),
                 "sft.lora_alpha=8,32"], prelude=OOM)
    assert r.returncode == 1, r.stderr[-3000:]
    error = (sweep / "0" / "error.txt").read_text()
    assert error.startswith("PipelineError: stage sft: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB);"
                            " lower sft.batch_size (raise sft.gradient_accumulation_steps"), error
    assert (sweep / "1" / "metrics.json").is_file()
    table = pd.read_csv(sweep / "results.csv")
    sft_rows = table[table["row"] == "sft"].set_index("job")
    assert sft_rows.loc[0, "status"] == "failed" and sft_rows.loc[1, "status"] == "ok"
