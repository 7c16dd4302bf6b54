"""One results table per sweep: read every job directory of a multirun and write the sweep-wide files.

    python -m pipeline.aggregate outputs/sweeps/<time>     # on demand (interrupted sweeps, failed jobs)

It also runs by itself when a multirun ends (conf/config.yaml registers AggregateCallback); Hydra skips that callback
when a job fails, hence the command. Written into the sweep directory:
- results.csv / results.md: one row per job (the swept override keys as columns, named like the keys, then the
  metrics), reference rows for the base model and for each distinct CPT model, failed jobs with their error; sorted by
  retention of the headline metric.
- heatmap_<metric>.png: SFT lora_alpha × SFT target_modules (the swept sft.* keys), one panel per CPT setting.
- answers.md: per question, the gold answer, the base and CPT answers and every cell's SFT answer side by side.
- cells.csv (and a section of results.md): per grid cell, mean and 95% bootstrap interval of the headline metrics,
  over seeds when the cell was run with several seeds, over questions otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)

METRICS = ["exact_match", "contains", "char_f1", "logprob", "eos_rate"]
HEATMAP_METRICS = ["retention", "sft/contains", "logprob_gain_kept"]


def _value(text: str):
    """'32' → 32, '0.5' → 0.5, anything else stays a string (as typed in the override)."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def read_jobs(sweep_dir: Path) -> List[dict]:
    from omegaconf import OmegaConf

    jobs = []
    dirs = [d for d in sweep_dir.iterdir() if d.is_dir() and (d / ".hydra" / "overrides.yaml").is_file()]
    for d in sorted(dirs, key=lambda p: (len(p.name), p.name)):
        overrides = {}
        for o in OmegaConf.load(d / ".hydra" / "overrides.yaml"):
            key, _, val = str(o).partition("=")
            key = key.lstrip("+~")
            if not key.startswith("hydra."):
                overrides[key] = _value(val)
        job = {"job": d.name, "dir": d, "overrides": overrides, "metrics": {}, "error": None}
        if (d / "metrics.json").is_file():
            job["metrics"] = json.loads((d / "metrics.json").read_text(encoding="utf-8"))
            job["status"] = "ok"
        elif (d / "error.txt").is_file():
            job["status"], job["error"] = "failed", (d / "error.txt").read_text(encoding="utf-8").strip()
        else:
            job["status"], job["error"] = "incomplete", "no metrics.json (interrupted or still running)"
        jobs.append(job)
    return jobs


def swept_keys(jobs: List[dict]) -> List[str]:
    """Override keys whose value differs between jobs (all override keys for a single job), in first-seen order."""
    keys: List[str] = []
    for j in jobs:
        keys += [k for k in j["overrides"] if k not in keys]
    if len(jobs) <= 1:
        return keys
    return [k for k in keys if len({repr(j["overrides"].get(k)) for j in jobs}) > 1]


def _model_metrics(m: Dict, model: str) -> Dict:
    out = {name: m.get(f"{model}/{name}") for name in METRICS}
    out.update({k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(f"{model}/") and "@" in k})
    return out


def results_table(jobs: List[dict]):
    import pandas as pd

    keys = swept_keys(jobs)
    ok = [j for j in jobs if j["status"] == "ok"]
    rows = []
    if ok and "base/contains" in ok[0]["metrics"]:
        m0 = ok[0]["metrics"]
        rows.append({"row": "base", "job": "", "status": "reference", **{k: None for k in keys},
                     **_model_metrics(m0, "base"), "general_contains": m0.get("base/general_contains"),
                     "heldout_ppl": m0.get("base/heldout_ppl")})
    seen = set()
    for j in ok:
        m = j["metrics"]
        key = m.get("key/merge") or m.get("cpt_model")
        if key and key not in seen and "cpt/contains" in m:
            seen.add(key)
            rows.append({"row": "cpt", "job": j["job"], "status": "reference",
                         **{k: (j["overrides"].get(k) if not k.startswith(("sft.", "eval.")) else None)
                            for k in keys},
                         **_model_metrics(m, "cpt"), "knowledge_gain": m.get("knowledge_gain"),
                         "logprob_gain": m.get("logprob_gain"), "general_contains": m.get("cpt/general_contains"),
                         "heldout_ppl": m.get("cpt/heldout_ppl")})
    for j in jobs:
        m = j["metrics"]
        rows.append({"row": "sft", "job": j["job"], "status": j["status"],
                     **{k: j["overrides"].get(k) for k in keys}, **_model_metrics(m, "sft"),
                     "retention": m.get("retention"), "knowledge_gain": m.get("knowledge_gain"),
                     "logprob_gain": m.get("logprob_gain"), "logprob_gain_kept": m.get("logprob_gain_kept"),
                     **{k: v for k, v in m.items() if k.startswith("transitions/")},
                     "general_contains": m.get("sft/general_contains"), "heldout_ppl": m.get("sft/heldout_ppl"),
                     "headline_metric": m.get("headline_metric"), "stage/cpt": m.get("stage/cpt"),
                     "error": j["error"]})
    df = pd.DataFrame(rows)
    for k in keys:  # keep swept values as typed (32, not 32.0, beside the reference rows' blanks)
        df[k] = pd.Series([r.get(k) for r in rows], dtype=object)
    order = {"base": 0, "cpt": 1, "sft": 2}
    df["_kind"] = df["row"].map(order)
    df["_failed"] = df["status"].isin(["failed", "incomplete"])
    sort_ret = df["retention"] if "retention" in df else 0
    df["_ret"] = pd.to_numeric(sort_ret, errors="coerce").fillna(-math.inf)
    df = df.sort_values(["_kind", "_failed", "_ret"], ascending=[True, True, False], kind="stable")
    df = df.drop(columns=["_kind", "_failed", "_ret"])
    return df.reset_index(drop=True), keys


def _order(v):
    """Numbers in numeric order, then strings."""
    return (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v))


def heatmaps(df, keys: List[str], out_dir: Path) -> List[Path]:
    """One PNG per metric: x = first swept sft.* key, y = second (if any), one panel per CPT setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sft_keys = [k for k in keys if k.startswith("sft.")]
    cpt_keys = [k for k in keys if not k.startswith(("sft.", "eval."))]
    jobs = df[(df["row"] == "sft") & (df["status"] == "ok")]
    if not sft_keys or jobs.empty:
        log.info("no heatmap: the sweep varies no sft.* key")
        return []
    x_key = "sft.lora_alpha" if "sft.lora_alpha" in sft_keys else sft_keys[0]
    y_key = next((k for k in sft_keys if k != x_key), None)
    panels = [tuple(r) for r in jobs[cpt_keys].drop_duplicates().itertuples(index=False)] if cpt_keys else [()]
    written = []
    for metric in HEATMAP_METRICS:
        col = metric.split("/", 1)[1] if metric.startswith("sft/") else metric
        if col not in jobs:
            continue
        xs = sorted(jobs[x_key].dropna().unique(), key=_order)
        ys = sorted(jobs[y_key].dropna().unique(), key=_order) if y_key else [None]
        fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 1.6 * len(xs) * len(panels), 1.6 + 0.7 * len(ys)),
                                 squeeze=False)
        vals = jobs[col].astype(float)
        vmin, vmax = (np.nanmin(vals), np.nanmax(vals)) if vals.notna().any() else (0, 1)
        for ax, panel in zip(axes[0], panels):
            sel = jobs
            for k, v in zip(cpt_keys, panel):
                sel = sel[sel[k] == v]
            grid = np.full((len(ys), len(xs)), np.nan)
            for _, r in sel.iterrows():
                if r[x_key] not in xs or (y_key and r[y_key] not in ys):
                    continue  # a job without this override (e.g. added to the sweep dir by hand)
                grid[ys.index(r[y_key]) if y_key else 0, xs.index(r[x_key])] = r[col]
            im = ax.imshow(grid, vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto")
            for yi in range(len(ys)):
                for xi in range(len(xs)):
                    v = grid[yi, xi]
                    ax.text(xi, yi, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                            color="black" if np.isnan(v) or v >= (vmin + vmax) / 2 else "white")
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
            ax.set_yticks(range(len(ys)), [str(y) for y in ys] if y_key else [""])
            ax.set_xlabel(x_key)
            ax.set_ylabel(y_key or "")
            ax.set_title(", ".join(f"{k}={v}" for k, v in zip(cpt_keys, panel)) or "all jobs", fontsize=9)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
        fig.suptitle(metric, y=1.04)
        path = out_dir / f"heatmap_{metric.replace('/', '_')}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def answer_sheet(jobs: List[dict], keys: List[str], path: Path) -> None:
    """Per question: gold, base, each distinct CPT model's and each cell's SFT answer, side by side."""
    ok = [j for j in jobs if j["status"] == "ok" and (j["dir"] / "answers.jsonl").is_file()]
    if not ok:
        path.write_text("# Answers\n\nNo job finished its evaluation.\n", encoding="utf-8")
        return
    per_job = {j["job"]: {a["id"]: a for a in map(json.loads, (j["dir"] / "answers.jsonl").read_text(
        encoding="utf-8").splitlines())} for j in ok}

    def label(j, only_cpt=False):
        ks = [k for k in keys if not (only_cpt and k.startswith(("sft.", "eval.")))]
        return ", ".join(f"{k}={j['overrides'].get(k)}" for k in ks) or f"job {j['job']}"

    def cell(text):
        return str(text).replace("|", "\\|").replace("\n", " ") or "(empty)"

    # one CPT model per distinct merge key, however many cells share it
    cpt_jobs = {}
    for j in ok:
        cpt_jobs.setdefault(j["metrics"].get("key/merge") or label(j, only_cpt=True), j)
    lines = [f"# Answers side by side ({len(ok)} jobs)", ""]
    ids = list(dict.fromkeys(qid for j in ok for qid in per_job[j["job"]]))
    for qid in ids:
        q = next(per_job[j["job"]][qid] for j in ok if qid in per_job[j["job"]])
        alias = f" (also: {', '.join(q['aliases'])})" if q.get("aliases") else ""
        lines += [f"## {q['id']} {q['question']}", "", f"gold: **{q['gold']}**{alias}", "",
                  "| model | answer | contains |", "|---|---|---|"]
        if "base" in q:
            lines.append(f"| base | {cell(q['base']['answer'])} | {q['base']['contains']:.0f} |")
        for j in cpt_jobs.values():
            a = per_job[j["job"]].get(qid)
            if a and "cpt" in a:
                lines.append(f"| cpt ({label(j, only_cpt=True)}) | {cell(a['cpt']['answer'])} | "
                             f"{a['cpt']['contains']:.0f} |")
        for j in ok:
            a = per_job[j["job"]].get(qid)
            if a and "sft" in a:
                lines.append(f"| sft ({label(j)}) | {cell(a['sft']['answer'])} | {a['sft']['contains']:.0f} |")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


INTERVAL_METRICS = ["sft/contains", "retention", "logprob_gain_kept", "cpt/contains"]


def bootstrap_ci(n: int, stat, resamples: int = 2000, seed: int = 0):
    """95% percentile interval of stat(indices) over `resamples` draws of n indices with replacement."""
    import numpy as np

    rng = np.random.default_rng(seed)
    draws = [stat(rng.integers(0, n, n)) for _ in range(resamples)]
    draws = [d for d in draws if d is not None and not math.isnan(d)]
    if not draws:
        return None, None
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def _question_stats(answers: List[dict]):
    """Per-metric statistics over a resample of questions (for a cell run with one seed)."""
    import numpy as np

    def col(model, name):
        return np.array([a[model][name] for a in answers], dtype=float)

    s, c = col("sft", "contains"), col("cpt", "contains")
    lb, lc, ls = col("base", "logprob"), col("cpt", "logprob"), col("sft", "logprob")

    def ratio(num, den):
        return None if den == 0 else num / den

    return {
        "sft/contains": lambda i: s[i].mean(),
        "cpt/contains": lambda i: c[i].mean(),
        "retention": lambda i: ratio(s[i].mean(), c[i].mean()),
        "logprob_gain_kept": lambda i: ratio(ls[i].mean() - lb[i].mean(), lc[i].mean() - lb[i].mean()),
    }


def cells_table(jobs: List[dict], keys: List[str]):
    """Per grid cell (the swept keys except seed): mean and 95% bootstrap interval of the headline metrics — over
    seeds when the cell ran with several, over questions when it ran with one."""
    import pandas as pd

    cell_keys = [k for k in keys if k != "seed"]
    cells: Dict[tuple, List[dict]] = {}
    for j in jobs:
        if j["status"] == "ok" and "sft/contains" in j["metrics"]:
            cells.setdefault(tuple(j["overrides"].get(k) for k in cell_keys), []).append(j)
    rows = []
    for cell, members in cells.items():
        row = {**dict(zip(cell_keys, cell)), "n_seeds": len(members),
               "interval_over": "seeds" if len(members) > 1 else "questions"}
        if len(members) > 1:
            for name in INTERVAL_METRICS:
                vals = [m["metrics"].get(name) for m in members]
                vals = [v for v in vals if v is not None]
                row[name] = sum(vals) / len(vals) if vals else None
                row[f"{name} 95% CI"] = bootstrap_ci(len(vals), lambda i, v=vals: sum(v[k] for k in i) / len(i)) \
                    if vals else (None, None)
        else:
            answers = [json.loads(x) for x in (members[0]["dir"] / "answers.jsonl").read_text(encoding="utf-8")
                       .splitlines()]
            if not all({"base", "cpt", "sft"} <= set(a) for a in answers):
                continue
            stats = _question_stats(answers)
            for name, stat in stats.items():
                row[name] = members[0]["metrics"].get(name)
                row[f"{name} 95% CI"] = bootstrap_ci(len(answers), stat)
        rows.append(row)
    return pd.DataFrame(rows), cell_keys


def _format_cells(df, cell_keys) -> str:
    def fmt(row, name):
        v, ci = row.get(name), row.get(f"{name} 95% CI")
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if not isinstance(ci, tuple) or ci[0] is None:
            return f"{v:.3f}"
        return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"

    out = df[cell_keys + ["n_seeds", "interval_over"]].copy()
    for name in INTERVAL_METRICS:
        if name in df:
            out[name] = [fmt(r, name) for r in df.to_dict("records")]
    return out.to_markdown(index=False)


def aggregate(sweep_dir: str | Path) -> Optional[Path]:
    """Write results.csv, results.md, heatmaps and answers.md into `sweep_dir`; returns results.csv's path."""
    sweep_dir = Path(sweep_dir)
    jobs = read_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir}: no job directories (with .hydra/overrides.yaml) found")
    df, keys = results_table(jobs)
    df.to_csv(sweep_dir / "results.csv", index=False)
    n_ok = sum(j["status"] == "ok" for j in jobs)
    headline = next((j["metrics"].get("headline_metric") for j in jobs if j["metrics"]), "?")
    md = [f"# Sweep {sweep_dir.name}", "",
          f"{len(jobs)} jobs: {n_ok} ok, {len(jobs) - n_ok} failed or incomplete. Swept: {', '.join(keys) or '-'}. "
          f"Headline metric: {headline}; retention = "
          f"{'(SFT - base) / (CPT - base)' if headline == 'logprob' else 'SFT / CPT'}.", "",
          df.astype(object).where(df.notna(), "").to_markdown(index=False, floatfmt=".3f")]
    cells, cell_keys = cells_table(jobs, keys)
    if not cells.empty:
        flat = cells.copy()
        for col in [c for c in flat.columns if c.endswith("95% CI")]:
            flat[f"{col[:-7]} ci_low"] = [ci[0] if isinstance(ci, tuple) else None for ci in flat[col]]
            flat[f"{col[:-7]} ci_high"] = [ci[1] if isinstance(ci, tuple) else None for ci in flat[col]]
            flat = flat.drop(columns=col)
        flat.to_csv(sweep_dir / "cells.csv", index=False)
        md += ["", "## Per grid cell: mean and 95% bootstrap interval", "",
               "Over seeds where a cell ran with several (sweep `seed=1,2,3`), otherwise over questions.", "",
               _format_cells(cells, cell_keys)]
    (sweep_dir / "results.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    heatmaps(df, keys, sweep_dir)
    answer_sheet(jobs, keys, sweep_dir / "answers.md")
    log.info("sweep results: %s (%d jobs, %d ok)", sweep_dir / "results.md", len(jobs), n_ok)
    return sweep_dir / "results.csv"


class AggregateCallback(Callback):
    """Hydra callback: aggregate the sweep when a multirun ends (Hydra skips it if a job failed)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        path = aggregate(sweep_dir)
        print(f"sweep results: {path.with_suffix('.md')}")
        failed = [j["job"] for j in read_jobs(sweep_dir) if j["status"] != "ok"]
        if failed:  # the sweep ran to the end, but it did not succeed: say so in the exit status
            print(f"error: {len(failed)} job(s) failed: {', '.join(failed)} (see results.md)", file=sys.stderr)
            sys.exit(1)


def main(argv: List[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m pipeline.aggregate SWEEP_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = aggregate(argv[0])
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"sweep results: {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
