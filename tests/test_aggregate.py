"""One results table per sweep: a 2x2 grid end to end, and aggregation of a sweep with a failed job."""

import json
import shutil

import pandas as pd
import pytest

from conftest import tiny_overrides
from pipeline.aggregate import aggregate, main as aggregate_main
from test_cli import run_cli


@pytest.fixture(scope="module")
def grid(tiny_model, data_files, tmp_path_factory):
    sweep = tmp_path_factory.mktemp("grid") / "sweep"
    own_cache = sweep.parent / "cache"  # not the session's: this test counts how often CPT is built
    r = run_cli(["-m", *tiny_overrides(tiny_model, data_files, **{"hydra.sweep.dir": sweep, "cache.dir": own_cache}),
                 "sft.lora_alpha=8,32", "sft.target_modules=attn_mlp,attn"])
    assert r.returncode == 0, r.stderr[-3000:]
    return sweep, r


def test_grid_writes_the_sweep_files(grid):
    sweep, r = grid
    assert f"sweep results: {sweep / 'results.md'}" in r.stdout  # the end-of-multirun callback ran
    df = pd.read_csv(sweep / "results.csv")
    assert list(df["row"]) == ["base", "cpt", "sft", "sft", "sft", "sft"]  # one CPT setting: one CPT reference row
    jobs = df[df["row"] == "sft"]
    assert {"sft.lora_alpha", "sft.target_modules", "contains", "retention", "logprob_gain_kept"} <= set(df.columns)
    assert sorted(zip(jobs["sft.lora_alpha"], jobs["sft.target_modules"])) == [
        (8, "attn"), (8, "attn_mlp"), (32, "attn"), (32, "attn_mlp")]
    assert list(jobs["stage/cpt"]).count("built") == 1  # the CPT stage was trained once for the four cells
    ret = pd.to_numeric(jobs["retention"], errors="coerce").fillna(-1).tolist()
    assert ret == sorted(ret, reverse=True)
    md = (sweep / "results.md").read_text()
    assert "| row" in md and "sft.lora_alpha" in md
    for metric in ("retention", "sft_contains", "logprob_gain_kept"):
        assert (sweep / f"heatmap_{metric}.png").stat().st_size > 1000
    sheet = (sweep / "answers.md").read_text()
    assert sheet.count("## q") == 3 and sheet.count("| sft (sft.lora_alpha=") == 3 * 4
    assert "| base |" in sheet and "gold: **880トン** (also: 880t)" in sheet


def test_aggregate_with_a_failed_job(grid, tmp_path):
    sweep, _ = grid
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, symlinks=True)
    for f in copy.glob("results.*"):
        f.unlink()
    failed = copy / "4"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text("- sft.lora_alpha=64\n- sft.target_modules=attn\n")
    (failed / "error.txt").write_text("PipelineError: sft.target_modules: module 'x' does not exist\n")
    assert aggregate_main([str(copy)]) == 0
    df = pd.read_csv(copy / "results.csv", dtype={"job": str})
    row = df[df["job"] == "4"].iloc[0]
    assert row["status"] == "failed" and "does not exist" in row["error"] and row["sft.lora_alpha"] == 64
    assert df.iloc[-1]["job"] == "4"  # failed jobs sort last


def test_aggregate_of_an_empty_directory(tmp_path, capsys):
    assert aggregate_main([str(tmp_path)]) == 2
    assert "no job directories" in capsys.readouterr().err


def test_a_failing_cell_does_not_stop_the_sweep(tiny_model, data_files, tmp_path):
    """One cell names a module the model lacks: the other cell still runs, the table lists the failure, exit 1."""
    sweep = tmp_path / "sweep"
    r = run_cli(["-m", *tiny_overrides(tiny_model, data_files, **{"hydra.sweep.dir": sweep}),
                 "sft.target_modules=attn,[c_attn]"])
    assert r.returncode == 1, r.stderr[-2000:]
    assert "error: 1 job(s) failed: 1" in r.stderr
    df = pd.read_csv(sweep / "results.csv", dtype={"job": str})
    jobs = df[df["row"] == "sft"].set_index("job")
    assert jobs.loc["0", "status"] == "ok" and jobs.loc["1", "status"] == "failed"
    assert "module 'c_attn' does not exist" in jobs.loc["1", "error"]


def test_cells_with_one_seed_get_question_intervals(grid):
    sweep, _ = grid
    cells = pd.read_csv(sweep / "cells.csv")
    assert len(cells) == 4 and set(cells["interval_over"]) == {"questions"}
    assert (cells["logprob_gain_kept ci_low"] <= cells["logprob_gain_kept"]).all()
    assert (cells["logprob_gain_kept"] <= cells["logprob_gain_kept ci_high"]).all()
    assert "## Per grid cell: mean and 95% bootstrap interval" in (sweep / "results.md").read_text()


def test_cells_over_seeds_by_hand(tmp_path):
    from pipeline.aggregate import bootstrap_ci, cells_table

    jobs = [{"job": str(i), "dir": tmp_path, "status": "ok", "error": None,
             "overrides": {"sft.lora_alpha": 8, "seed": seed},
             "metrics": {"sft/contains": v, "retention": v * 2, "logprob_gain_kept": 0.5, "cpt/contains": 0.5}}
            for i, (seed, v) in enumerate([(1, 0.1), (2, 0.2), (3, 0.3)])]
    df, cell_keys = cells_table(jobs, ["sft.lora_alpha", "seed"])
    assert cell_keys == ["sft.lora_alpha"] and len(df) == 1
    row = df.iloc[0]
    assert row["n_seeds"] == 3 and row["interval_over"] == "seeds"
    assert row["sft/contains"] == pytest.approx(0.2) and row["retention"] == pytest.approx(0.4)
    lo, hi = row["sft/contains 95% CI"]
    assert 0.1 <= lo <= 0.2 <= hi <= 0.3  # resampled means of {0.1, 0.2, 0.3} stay within their range
    assert row["logprob_gain_kept 95% CI"] == (0.5, 0.5)  # a constant has a zero-width interval
    assert bootstrap_ci(4, lambda i: 1.0) == (1.0, 1.0)
