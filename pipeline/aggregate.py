"""One results table per sweep: read every job directory of a multirun and write the sweep-wide files.

    python -m pipeline.aggregate outputs/sweeps/<time>     # on demand (interrupted sweeps, failed jobs)
    python -m pipeline.aggregate outputs/sweeps/<time> --baseline 'sft.lora_alpha=8,sft.target_modules=attn'

It also runs by itself when a multirun ends (conf/config.yaml registers AggregateCallback); Hydra skips that callback
when a job fails, hence the command. Written into the sweep directory:
- results.csv / results.md: one row per job (the swept override keys as columns, named like the keys, then the
  metrics of the row's model and gain_kept per metric), reference rows for the base model and for each distinct CPT
  model, failed jobs with their error; SFT rows sorted by the SFT model's score on the injected facts
  (sft/<eval.headline_metric>). results.md ends with a legend: every column and its formula.
- cells.csv (and a section of results.md): per grid cell (the swept keys except seed), each statistic with its 95%
  interval: over questions (paired bootstrap) when the cell ran with one seed, over seeds (t) when with several.
- differences.csv (and the "Best vs baseline" section of results.md): every cell against the baseline cell (the
  sweep's first cell, or --baseline), as a paired difference over the same questions and seeds with its 95% bootstrap
  interval (paired_difference, which other tools call too).
- heatmap_<statistic>.png: SFT lora_alpha × SFT target_modules (the swept sft.* keys), one panel per CPT setting.
- answers.md: per question, the gold answer, the base and CPT answers and every cell's SFT answer side by side.

The pieces: pipeline/sweep/tables.py (jobs, tables, results.md), pipeline/sweep/stats.py (intervals, differences),
pipeline/sweep/plots.py (heatmaps, differences.png), pipeline/sweep/report.py (report.html).

"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from hydra.experimental.callback import Callback

from pipeline.core.outputs import PipelineError
from pipeline.sweep.plots import differences_plot, heatmaps
from pipeline.sweep.report import write_report
from pipeline.sweep.stats import SEED_KEYS, headline_metric, cells_table, differences_table
from pipeline.sweep.tables import answer_sheet, read_jobs, results_markdown, results_table

log = logging.getLogger(__name__)


def aggregate(sweep_dir: str | Path, baseline: Optional[str] = None) -> Path:
    """Write results.csv/.md, cells.csv, differences.csv, heatmaps and answers.md into `sweep_dir`; returns
    results.csv's path. `baseline`: the reference cell of differences.csv, as 'key=value,key=value'."""
    sweep_dir = Path(sweep_dir)
    jobs = read_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir}: no job directories (with .hydra/overrides.yaml) found")
    df, keys = results_table(jobs)
    df.to_csv(sweep_dir / "results.csv", index=False)
    cells, cell_keys = cells_table(jobs, keys)
    if not cells.empty:
        cells.to_csv(sweep_dir / "cells.csv", index=False)
    diffs, summary = differences_table(jobs, keys, baseline)
    if not diffs.empty:
        diffs.to_csv(sweep_dir / "differences.csv", index=False)
        differences_plot(diffs, [k for k in keys if k not in SEED_KEYS], summary, sweep_dir / "differences.png")
    (sweep_dir / "results.md").write_text(results_markdown(sweep_dir, jobs, df, keys, cells, cell_keys, summary,
                                                           diffs),
                                          encoding="utf-8")
    heatmaps(df, keys, sweep_dir, headline_metric(jobs))
    answer_sheet(jobs, keys, sweep_dir / "answers.md")
    write_report(sweep_dir, jobs, df, keys, sorted(sweep_dir.glob("heatmap_*.png")) + sorted(
        sweep_dir.glob("differences.png")))  # report.html (pipeline/sweep/report.py)
    log.info("sweep results: %s (%d jobs, %d ok)", sweep_dir / "results.md", len(jobs),
             sum(j["status"] == "ok" for j in jobs))
    return sweep_dir / "results.csv"


class AggregateCallback(Callback):
    """Hydra callback: aggregate the sweep when a multirun ends (a failed cell does not stop the sweep: run.py
    records it in error.txt and returns, so this always runs)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        path = aggregate(sweep_dir)
        print(f"sweep results: {path.with_suffix('.md')}")


class ExitStatusCallback(Callback):
    """Hydra callback, run last: a sweep with a failed cell ran to the end and wrote its table, but it did not
    succeed, so the process exits 1. Separate from AggregateCallback so that sys.exit cannot cut off the callbacks
    that run after it (tracking attaches the sweep's files to its parent run)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        failed = [j["job"] for j in read_jobs(Path(config.hydra.sweep.dir)) if j["status"] != "ok"]
        if failed:
            print(f"error: {len(failed)} job(s) failed: {', '.join(failed)} (see results.md)", file=sys.stderr)
            sys.exit(1)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.aggregate", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR")
    parser.add_argument("--baseline", metavar="KEY=VALUE,...", default=None,
                        help="the reference cell of differences.csv (default: the sweep's first cell)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = aggregate(args.sweep_dir, args.baseline)
    except (FileNotFoundError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"sweep results: {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
