"""One results table per sweep: a 2x2 grid end to end, aggregation of a sweep with a failed job, and the statistics
(gain_kept with its threshold, intervals, paired differences) on small fake sweeps whose numbers are known by hand."""

import json
import math
import shutil

import pandas as pd
import pytest

from conftest import tiny_overrides
from pipeline.aggregate import main as aggregate_main
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
    assert {"sft.lora_alpha", "sft.target_modules", "contains", "gain_kept/contains", "gain_kept/logprob",
            "gain_kept_reason/contains", "eval.min_gain", "eval.min_logprob_gain"} <= set(df.columns)
    assert sorted(zip(jobs["sft.lora_alpha"], jobs["sft.target_modules"])) == [
        (8, "attn"), (8, "attn_mlp"), (32, "attn"), (32, "attn_mlp")]
    assert list(jobs["stage/cpt"]).count("built") == 1  # the CPT stage was trained once for the four cells
    # best first by the SFT model's score on the injected facts (the headline metric), equal scores in job order
    # (test_sft_rows_best_first_then_in_job_order has scores that differ)
    order = [(-score, int(job)) for score, job in zip(jobs["contains"], jobs["job"])]
    assert order == sorted(order)
    md = (sweep / "results.md").read_text()
    assert "| row" in md and "sft.lora_alpha" in md and "## Columns" in md
    assert "- `gain_kept/logprob`: (SFT − base) ÷ (CPT − base) of logprob" in md
    for metric in ("gain_kept_contains", "sft_contains", "gain_kept_logprob"):
        assert (sweep / f"heatmap_{metric}.png").stat().st_size > 1000
    # every SFT adapter records the prompt format it was trained with, for eval
    fmt = json.loads((sweep / "0" / "sft_adapter" / "prompt_format.json").read_text())
    assert fmt["chat_template"] and fmt["prompt_template"] == "質問: {prompt}\n回答:\n"
    # every cell against the first one (job 0), over the same 3 questions
    diffs = pd.read_csv(sweep / "differences.csv")
    assert len(diffs) == 3 * 2 and set(diffs["n_questions"]) == {3}
    assert "## Best vs baseline" in md
    assert (sweep / "differences.png").stat().st_size > 1000  # the same as a forest plot, also in report.html
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


def test_sft_rows_best_first_then_in_job_order(tmp_path):
    """results.csv's SFT rows: finished jobs by sft/contains, best first, equal scores in job order (9 before 10,
    numbers not strings), failed jobs last; the reference rows stay on top."""
    from pipeline.sweep.tables import read_jobs, results_table

    for job, sft in [(0, [1, 0, 0, 0]), (1, [1, 1, 1, 0]), (9, [0, 1, 1, 0]), (10, [1, 1, 0, 0])]:
        fake_job(tmp_path, job, {"sft.lora_alpha": 8 * (job + 1)},
                 {"base": {"contains": BASE}, "cpt": {"contains": CPT}, "sft": {"contains": sft}})
    failed = tmp_path / "2"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text("- sft.lora_alpha=24\n")
    (failed / "error.txt").write_text("PipelineError: out of memory\n")
    df, _ = results_table(read_jobs(tmp_path))
    assert list(df["row"]) == ["base", "cpt"] + ["sft"] * 5
    sft = df[df["row"] == "sft"]
    assert list(sft["job"]) == ["1", "9", "10", "0", "2"]
    assert list(sft["contains"])[:4] == [0.75, 0.5, 0.5, 0.25]


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
    assert len(cells) == 4 and all(cells["interval"].str.startswith("paired bootstrap over 3 questions"))
    defined = cells["sft/contains ci_low"].notna()
    assert (cells.loc[defined, "sft/contains ci_low"] <= cells.loc[defined, "sft/contains"]).all()
    assert (cells.loc[defined, "sft/contains"] <= cells.loc[defined, "sft/contains ci_high"]).all()
    assert "## Per grid cell: value and 95% interval" in (sweep / "results.md").read_text()


# ------------------------------------------------------------------ fake sweeps: numbers known by hand

def fake_job(sweep, job, overrides, scores, ids=None, min_gain=0.02, extra=None):
    """A finished job: overrides.yaml, answers.jsonl and metrics.json computed by eval.summarize from per-question
    `scores` ({model: {"contains": [...], "logprob": [...]}}; exact_match and char_f1 copy contains)."""
    from pipeline.stages.eval import summarize

    d = sweep / str(job)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {k}={v}\n" for k, v in overrides.items()))
    n = len(scores["base"]["contains"])
    ids = ids or [f"q{i}" for i in range(n)]
    per_model = {model: [{"answer": "a", "exact_match": c, "contains": c, "char_f1": c,
                          "logprob": s.get("logprob", [-1.0] * n)[i], "ended_with_eos": True, "repetitive": False,
                          "in_format": True} for i, c in enumerate(s["contains"])] for model, s in scores.items()}
    metrics = summarize(per_model, "contains", min_gain=min_gain, min_logprob_gain=0.1)
    metrics.update({"eval.min_gain": min_gain, "eval.min_logprob_gain": 0.1, "seed": overrides.get("seed", 42),
                    "key/merge": "cpt-model-1", "n_questions": n, **(extra or {})})
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "answers.jsonl").write_text("".join(
        json.dumps({"id": q, "question": f"{q}?", "gold": "x", "aliases": [], "group": None,
                    **{m: per_model[m][i] for m in per_model}}, ensure_ascii=False) + "\n" for i, q in enumerate(ids)))
    return d


BASE = [0, 0, 1, 0]
CPT = [1, 1, 1, 0]


def test_gain_kept_interval_is_paired_over_questions(tmp_path):
    """SFT answers exactly what CPT answered: gain_kept is 1 on every draw that resamples the questions for all three
    models at once (resampling each model on its own would give a wide interval)."""
    from pipeline.sweep.stats import cells_table
    from pipeline.sweep.tables import read_jobs

    n = 20
    base, cpt = [0] * n, [1, 0] * (n // 2)
    fake_job(tmp_path, 0, {"sft.lora_alpha": 8}, {"base": {"contains": base}, "cpt": {"contains": cpt},
                                                   "sft": {"contains": list(cpt)}})
    cells, _ = cells_table(read_jobs(tmp_path), ["sft.lora_alpha"])
    row = cells.iloc[0]
    assert row["gain_kept/contains"] == 1.0
    assert (row["gain_kept/contains ci_low"], row["gain_kept/contains ci_high"]) == (1.0, 1.0)
    assert row["gain_kept/contains undefined"] == 0  # P(no taught question drawn) = 0.5^20
    # sft/contains: 0.5 ± 1.96 · √(0.25 / 20) = [0.28, 0.72] by the normal approximation, on a 0.05 grid
    assert 0.25 <= row["sft/contains ci_low"] <= 0.35 and 0.65 <= row["sft/contains ci_high"] <= 0.75
    # gain_kept of logprob: CPT - base = 0, undefined
    assert pd.isna(row["gain_kept/logprob"]) and row["gain_kept/logprob note"] == "undefined on the full data"


def test_undefined_draws_are_kept_at_both_ends(tmp_path):
    """4 questions, CPT taught 2: gain_kept = (0.5 - 0.25) / (0.75 - 0.25) = 0.5 (metrics.json too). A draw without
    either taught question has CPT - base = 0 and SFT - base = 0 (q2, q3: all three models alike): a ratio without a
    sign, counted at both ends. That happens with probability (2/4)^4 = 6.25%, more than the 2.5% tail on each side,
    so both sides are unbounded."""
    from pipeline.sweep.stats import MAX_UNDEFINED, N_RESAMPLES, cells_table
    from pipeline.sweep.tables import read_jobs

    d = fake_job(tmp_path, 0, {"sft.lora_alpha": 8}, {"base": {"contains": BASE}, "cpt": {"contains": CPT},
                                                       "sft": {"contains": [1, 0, 1, 0]}})
    assert json.loads((d / "metrics.json").read_text())["gain_kept/contains"] == 0.5
    cells, _ = cells_table(read_jobs(tmp_path), ["sft.lora_alpha"])
    row = cells.iloc[0]
    assert row["gain_kept/contains"] == 0.5
    undefined = row["gain_kept/contains undefined"]
    assert undefined == pytest.approx(0.0625 * N_RESAMPLES, rel=0.1) and undefined > MAX_UNDEFINED * N_RESAMPLES
    assert (row["gain_kept/contains ci_low"], row["gain_kept/contains ci_high"]) == (-math.inf, math.inf)
    assert "0/0 at both ends" in row["gain_kept/contains note"] and "lower and upper side unbounded" in \
        row["gain_kept/contains note"]


def test_undefined_draws_go_to_the_infinity_of_their_sign(tmp_path):
    """CPT taught q0 and q1; SFT lost q0 and answers q1, q2, q3: gain_kept = (0.75 - 0) / (0.5 - 0) = 1.5. A draw of
    q2 and q3 only (probability 1/16 = 6.25%) has CPT - base = 0 but SFT - base > 0: +inf, so the upper side is
    unbounded; no draw goes to -inf, so the lower bound is a draw's value (a finite ratio of the drawn questions)."""
    from pipeline.sweep.stats import N_RESAMPLES, cells_table
    from pipeline.sweep.tables import read_jobs

    fake_job(tmp_path, 0, {"sft.lora_alpha": 8}, {"base": {"contains": [0, 0, 0, 0]}, "cpt": {"contains": [1, 1, 0, 0]},
                                                   "sft": {"contains": [0, 1, 1, 1]}})
    row = cells_table(read_jobs(tmp_path), ["sft.lora_alpha"])[0].iloc[0]
    assert row["gain_kept/contains"] == 1.5
    assert row["gain_kept/contains ci_high"] == math.inf and math.isfinite(row["gain_kept/contains ci_low"])
    assert row["gain_kept/contains undefined"] == pytest.approx(N_RESAMPLES / 16, rel=0.1)
    assert " at +inf, 0 at -inf" in row["gain_kept/contains note"]


def test_ratio_by_hand():
    from pipeline.sweep.stats import ratio

    got = ratio([0.5, 0.5, -0.25, 0.5, 0.0], [0.5, 0.0, 0.0, -0.01, 0.0], 0.02)
    assert got[0] == 1.0 and got[1] == math.inf and got[2] == -math.inf
    assert got[3] == -math.inf  # below the threshold, negative denominator: the ratio's own sign
    assert math.isnan(got[4])


def test_gain_kept_below_the_threshold_in_the_table(tmp_path):
    """CPT gained 1 question of 4 (0.25) but the sweep asked for eval.min_gain 0.3: no ratio, and the reason."""
    from pipeline.aggregate import aggregate

    fake_job(tmp_path, 0, {"sft.lora_alpha": 8}, {"base": {"contains": BASE}, "cpt": {"contains": [1, 0, 1, 0]},
                                                   "sft": {"contains": [1, 0, 1, 0]}}, min_gain=0.3)
    aggregate(tmp_path)
    df = pd.read_csv(tmp_path / "results.csv")
    sft = df[df["row"] == "sft"].iloc[0]
    assert pd.isna(sft["gain_kept/contains"])
    assert sft["gain_kept_reason/contains"] == "|CPT - base| = 0.25 < eval.min_gain 0.3"
    assert sft["eval.min_gain"] == 0.3
    md = (tmp_path / "results.md").read_text()
    assert "- gain_kept/contains: |CPT - base| = 0.25 < eval.min_gain 0.3 (job 0)" in md
    cells = pd.read_csv(tmp_path / "cells.csv")  # the interval's statistic follows the same threshold
    assert pd.isna(cells["gain_kept/contains"].iloc[0])
    assert cells["gain_kept/contains note"].iloc[0] == "undefined on the full data"


def test_cells_over_seeds_by_hand(tmp_path):
    from pipeline.sweep.stats import cells_table

    jobs = [{"job": str(i), "dir": tmp_path, "status": "ok", "error": None,
             "overrides": {"sft.lora_alpha": 8, "seed": seed},
             "metrics": {"headline_metric": "contains", "sft/contains": v, "gain_kept/contains": v * 2,
                         "gain_kept/logprob": 0.5, "cpt/contains": 0.5,
                         "gain_kept/exact_match": None if seed == 2 else 0.1}}
            for i, (seed, v) in enumerate([(1, 0.1), (2, 0.2), (3, 0.3)])]
    df, cell_keys = cells_table(jobs, ["sft.lora_alpha", "seed"])
    assert cell_keys == ["sft.lora_alpha"] and len(df) == 1
    row = df.iloc[0]
    assert row["n_models"] == 3 and row["interval"] == "t over 3 models" and row["seeds"] == "1,2,3"
    # `seed` reseeds CPT too, and these jobs name no CPT model: three CPT runs
    assert row["covers"] == "CPT and SFT seeds (3 SFT runs), 3 CPT runs, these questions fixed"
    assert row["sft/contains"] == pytest.approx(0.2) and row["gain_kept/contains"] == pytest.approx(0.4)
    # mean 0.2, sd 0.1: 0.2 ± t(0.975, 2) · 0.1 / √3 = 0.2 ± 4.302653 · 0.057735
    assert row["sft/contains ci_low"] == pytest.approx(0.2 - 0.248414, abs=1e-6)
    assert row["sft/contains ci_high"] == pytest.approx(0.2 + 0.248414, abs=1e-6)
    assert row["sft/contains per_model"] == "0.100, 0.200, 0.300"
    assert (row["gain_kept/logprob ci_low"], row["gain_kept/logprob ci_high"]) == (0.5, 0.5)
    # one seed's value undefined: the cell's is too (not the mean of the other two), and the table says why
    assert pd.isna(row["gain_kept/exact_match"]) and row["gain_kept/exact_match note"] == "undefined for 1 of 3 models"


def two_cells(tmp_path, seeds=(1, 2), shuffle_b=False):
    """Cells A (sft.lora_alpha=32) and B (=8) on the same CPT model and questions, one job per seed."""
    from pipeline.sweep.tables import read_jobs

    sft_a = {1: [1, 1, 0, 0], 2: [1, 0, 0, 0]}
    job = 0
    for alpha in (8, 32):
        for seed in seeds:
            sft = sft_a.get(seed, [1, 1, 0, 0]) if alpha == 32 else [1, 0, 0, 0]
            scores = {"base": {"contains": BASE}, "cpt": {"contains": CPT}, "sft": {"contains": sft}}
            ids = None
            if shuffle_b and alpha == 8:  # the same questions in another order: paired by id, not by line
                order = [3, 2, 1, 0]
                scores = {m: {"contains": [s["contains"][i] for i in order]} for m, s in scores.items()}
                ids = [f"q{i}" for i in order]
            fake_job(tmp_path, job, {"sft.lora_alpha": alpha, "seed": seed}, scores, ids)
            job += 1
    jobs = read_jobs(tmp_path)
    return [j for j in jobs if j["overrides"]["sft.lora_alpha"] == 32], [j for j in jobs
                                                                          if j["overrides"]["sft.lora_alpha"] == 8]


@pytest.mark.parametrize("shuffle_b", [False, True])
def test_paired_difference_by_hand(tmp_path, shuffle_b):
    """Per seed, A - B in sft/contains: seed 1 +0.25 (question q1), seed 2 0; mean +0.125. With 2 seeds only the
    questions are resampled: the per-question difference averaged over seeds is [0, 0.5, 0, 0], so a draw of 4
    questions is 0.125 × (times q1 is drawn), Binomial(4, 1/4): 0 with 31.6%, at most 2 with 94.9%, at most 3 with
    99.6%; the 2.5% and 97.5% quantiles are 0 and 3 × 0.125."""
    from pipeline.sweep.stats import paired_difference

    a, b = two_cells(tmp_path, shuffle_b=shuffle_b)
    d = paired_difference(a, b, "sft/contains")
    assert d["a"] == pytest.approx(0.375) and d["b"] == 0.25 and d["difference"] == pytest.approx(0.125)
    assert (d["ci_low"], d["ci_high"]) == (0.0, pytest.approx(0.375))
    assert d["n_questions"] == 4 and d["seeds"] == "1,2" and d["resampled"] == "questions (seeds fixed)"
    # gain_kept on the same CPT model (gain 0.5): A - B = mean over seeds of (sft_A - sft_B) / 0.5 = 0.25
    g = paired_difference(a, b, "gain_kept/contains")
    assert g["difference"] == pytest.approx(0.25) and g["undefined"] > 0  # draws without q0/q1: counted
    assert paired_difference(b, b, "sft/contains")["difference"] == 0.0


def test_paired_difference_resamples_seeds_from_five_on(tmp_path):
    from pipeline.sweep.stats import paired_difference

    a, b = two_cells(tmp_path, seeds=(1, 2, 3, 4, 5))  # A: seed 1 [1,1,0,0], seed 2 [1,0,0,0], 3-5 [1,1,0,0]
    d = paired_difference(a, b, "sft/contains")
    assert d["resampled"] == "seeds and questions" and d["difference"] == pytest.approx(0.25 * 4 / 5)
    assert d["ci_low"] <= d["difference"] <= d["ci_high"]


def test_differences_against_a_chosen_baseline(tmp_path, capsys):
    from pipeline.sweep.stats import parse_cell_spec

    two_cells(tmp_path)
    assert aggregate_main([str(tmp_path)]) == 0  # default baseline: the first cell (job 0: sft.lora_alpha=8)
    diffs = pd.read_csv(tmp_path / "differences.csv")
    assert list(diffs["sft.lora_alpha"]) == [32, 32] and list(diffs["metric"]) == ["sft/contains",
                                                                                   "gain_kept/contains"]
    assert diffs["difference"].iloc[0] == pytest.approx(0.125)
    results = pd.read_csv(tmp_path / "results.csv")
    sft = results[results["row"] == "sft"]  # sorted by sft/contains: job 2 (0.5) first, then the 0.25s
    assert list(sft["job"])[0] == 2 and list(sft["contains"]) == sorted(sft["contains"], reverse=True)
    md = (tmp_path / "results.md").read_text()
    assert "Baseline: sft.lora_alpha=8 (the sweep's first cell, job 0;" in md and "Best: " in md
    assert "| sft/contains | 0.375 | 0.250 | +0.125 | [+0.000, +0.375] |" in md
    assert aggregate_main([str(tmp_path), "--baseline", "sft.lora_alpha=32"]) == 0
    diffs = pd.read_csv(tmp_path / "differences.csv")
    assert list(diffs["sft.lora_alpha"]) == [8, 8] and diffs["difference"].iloc[0] == pytest.approx(-0.125)
    assert aggregate_main([str(tmp_path), "--baseline", "sft.lora_alpha=64"]) == 2
    assert "--baseline 'sft.lora_alpha=64' matches 0 evaluated cells" in capsys.readouterr().err
    assert parse_cell_spec("sft.lora_alpha=8,sft.target_modules=[q_proj,v_proj]") == {
        "sft.lora_alpha": 8, "sft.target_modules": "[q_proj,v_proj]"}


def test_n_counts_distinct_models(tmp_path):
    """Three jobs whose sft.seed does not reach their model (the chat_vector cells: one key) are one model: its
    interval is over questions, not a t over three copies of one value. Three SFT models are three."""
    from pipeline.sweep.stats import cells_table
    from pipeline.sweep.tables import read_jobs

    scores = {"base": {"contains": BASE}, "cpt": {"contains": CPT}, "sft": {"contains": [1, 0, 1, 0]}}
    for seed in (1, 2, 3):
        fake_job(tmp_path, seed, {"lever": "chat_vector", "sft.seed": seed}, scores, extra={"key/chat_vector": "cv"})
        fake_job(tmp_path, 10 + seed, {"lever": "baseline", "sft.seed": seed}, scores,
                 extra={"key/sft": f"sft-{seed}"})
    cells, _ = cells_table(read_jobs(tmp_path), ["lever", "sft.seed"])
    cv, sft = (cells[cells["lever"] == lever].iloc[0] for lever in ("chat_vector", "baseline"))
    assert (cv["n_models"], cv["n_jobs"]) == (1, 3) and cv["interval"].startswith("paired bootstrap over 4 questions")
    assert cv["covers"] == ("these 4 questions (resampled), one CPT run, one chat-vector model (3 jobs whose seeds do "
                            "not reach it)")
    assert (sft["n_models"], sft["interval"]) == (3, "t over 3 models")
    assert sft["covers"] == "SFT seeds (3 SFT runs), one CPT run, these 4 questions fixed"
    # the CPT model is one run, whatever the SFT seeds: its interval is over the questions, not [x, x] over seeds
    assert sft["cpt/contains"] == 0.75 and sft["cpt/contains ci_low"] < 0.75 < sft["cpt/contains ci_high"]
    assert sft["cpt/contains note"] == "one CPT run: over these 4 questions (resampled)"


def test_retention_with_its_exact_interval(tmp_path):
    """CPT taught 10 questions, SFT kept 5, and answered one more on its own: retention 5/10 with the Clopper–Pearson
    interval [0.187, 0.813] (the textbook value for 5 of 10), sft_only 1 on its own; the normal approximation would
    give 0.5 ± 0.31 = [0.190, 0.810]."""
    from pipeline.aggregate import aggregate

    base, cpt, sft = [0] * 12, [1] * 10 + [0, 0], [1] * 5 + [0] * 5 + [1, 0]
    fake_job(tmp_path, 0, {"sft.lora_alpha": 8}, {"base": {"contains": base}, "cpt": {"contains": cpt},
                                                   "sft": {"contains": sft}},
             extra={"transitions/learned_kept": 5, "transitions/learned_lost": 5, "transitions/sft_only": 1})
    aggregate(tmp_path)
    row = pd.read_csv(tmp_path / "results.csv").query("row == 'sft'").iloc[0]
    assert row["retention"] == 0.5 and row["transitions/sft_only"] == 1
    assert row["retention ci_low"] == pytest.approx(0.1871, abs=1e-4)
    assert row["retention ci_high"] == pytest.approx(0.8129, abs=1e-4)
    cell = pd.read_csv(tmp_path / "cells.csv").iloc[0]
    assert (cell["retention"], cell["sft_only"]) == (0.5, 1)
    assert cell["retention ci_low"] == pytest.approx(0.1871, abs=1e-4)


def test_unpaired_seeds_are_named(tmp_path):
    """A ran seeds 1, 2, 3 and B 1, 2: the difference pairs seeds 1 and 2 and says that seed 3 was left out."""
    from pipeline.sweep.stats import paired_difference

    a, b = two_cells(tmp_path, seeds=(1, 2, 3))
    b = [j for j in b if j["overrides"]["seed"] != 3]
    d = paired_difference(a, b, "sft/contains")
    assert d["seeds"] == "1,2" and d["unpaired"] == "only A: 3" and "unpaired seeds left out (only A: 3)" in d["note"]
    assert d["covers"] == "these 4 questions (resampled), seeds 1, 2 held fixed; 3 vs 2 distinct models"


def test_holm_by_hand():
    from pipeline.sweep.stats import holm

    # sorted: 0.01 × 3 = 0.03; 0.03 × 2 = 0.06; 0.04 × 1 = 0.04, raised to the 0.06 before it
    assert holm([0.01, 0.04, 0.03, None]) == [pytest.approx(0.03), pytest.approx(0.06), pytest.approx(0.06), None]
    assert holm([0.6, 0.9]) == [1.0, 1.0]  # capped at 1


def test_power_by_hand():
    """(z(0.975) + z(0.8)) · sd / √n = (1.959964 + 0.841621) · 0.33 / √126 = 0.08236; 0.05 needs
    (2.801585 · 0.33 / 0.05)² = 341.9, so 342 questions."""
    from pipeline.sweep.stats import minimum_detectable_difference, questions_needed

    assert minimum_detectable_difference(0.33, 126) == pytest.approx(0.08236, abs=1e-5)
    assert questions_needed(0.33, 0.05) == 342


def test_differences_are_one_holm_family_per_metric(tmp_path):
    """Two cells against a baseline: each metric's two comparisons form one family; results.md lists every cell with
    its verdict and states what the QA set can detect."""
    two_cells(tmp_path)
    for job, alpha in ((4, 64), (5, 64)):  # a third cell, equal to the baseline
        fake_job(tmp_path, job, {"sft.lora_alpha": alpha, "seed": job - 3},
                 {"base": {"contains": BASE}, "cpt": {"contains": CPT}, "sft": {"contains": [1, 0, 0, 0]}})
    assert aggregate_main([str(tmp_path)]) == 0
    diffs = pd.read_csv(tmp_path / "differences.csv")
    family = diffs[diffs["metric"] == "sft/contains"]
    assert list(family["family"]) == ["2 cells vs sft.lora_alpha=8 in sft/contains"] * 2
    assert (family["p_holm"] >= family["p"]).all() and set(family["verdict"]) == {"no measurable difference"}
    md = (tmp_path / "results.md").read_text()
    assert "## Every cell vs the baseline" in md and "## What this QA set can detect" in md
    assert "| 64 | sft/contains | +0.000 |" in md
    # the cell equal to the baseline has no spread to take a median of, but it is one of Holm's two comparisons
    assert "the median over the 1 comparisons with the baseline that differ from it at all" in md
    assert "at Holm's first step over 2 comparisons (0.05/2)" in md


def test_exported_columns_and_the_leak_flag(tmp_path):
    """results.csv and report.html carry what docs cite: SFT's steps, the checkpoint early stopping kept, answer
    length and format rate; a job whose QA file asks about scored facts is flagged in results.md."""
    from pipeline.aggregate import aggregate

    fake_job(tmp_path, 0, {"sft.lora_alpha": 8}, {"base": {"contains": BASE}, "cpt": {"contains": CPT},
                                                   "sft": {"contains": [1, 0, 1, 0]}},
             extra={"sft/steps": 30, "sft/best_checkpoint_step": 15, "leak/dev_qa_shared_facts": 63})
    aggregate(tmp_path)
    row = pd.read_csv(tmp_path / "results.csv").query("row == 'sft'").iloc[0]
    assert (row["sft/steps"], row["sft/best_checkpoint_step"], row["format_rate"]) == (30, 15, 1.0)
    assert row["answer_chars"] == 1.0 and row["leak/dev_qa_shared_facts"] == 63
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert all(f"<th>{c}</th>" in html for c in ("sft/steps", "sft/best_checkpoint_step", "answer_chars",
                                                   "format_rate"))
    md = (tmp_path / "results.md").read_text()
    assert "## Leak check" in md and "- dev_qa: jobs 0 use a file asking about 63 scored facts" in md
