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

Intervals. A statistic is computed from per-question scores in answers.jsonl exactly as eval computes it (gain_kept is
a ratio of means over the same questions, undefined below the same threshold), and every bootstrap draw resamples
question indices once and computes it for all models on that draw (paired). A draw whose gain_kept denominator is
below the threshold is undefined: such draws are counted (`undefined`), and when more than MAX_UNDEFINED of them are,
the interval is reported as undefined rather than computed from the rest.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from hydra.experimental.callback import Callback

from pipeline.core.outputs import PipelineError
from pipeline.core.config import EvalConfig
from pipeline.stages.eval import GAIN_TOLERANCE, MODEL_NAMES, gain_threshold
from pipeline.sweep.report import write_report

log = logging.getLogger(__name__)

QA_METRICS = ["exact_match", "contains", "char_f1", "logprob"]
GENERAL_METRICS = [f"general_{m}" for m in QA_METRICS]
# Per-model columns of results.csv (the row's model), when present; results.md leaves out the rarer ones.
MODEL_COLUMNS = [*QA_METRICS, "judge", "eos_rate", *GENERAL_METRICS, "heldout_ppl"]
N_RESAMPLES = 9999
# A 95% interval leaves 2.5% of the draws in each tail: more undefined draws than one tail holds could decide a bound.
MAX_UNDEFINED = 0.025
# Seeds: below this many, a bootstrap over seeds cannot represent their spread (3 values have 10 distinct resamples,
# and its percentile interval never leaves [min, max]); seed means get a t-interval, and a paired difference holds the
# seeds fixed and resamples questions only. From this many on, a paired difference resamples seeds too.
MIN_SEEDS_TO_RESAMPLE = 5


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


def _headline(jobs: List[dict]) -> str:
    return next((j["metrics"]["headline_metric"] for j in jobs if j["metrics"].get("headline_metric")), "contains")


def _thresholds(metrics: Dict) -> Tuple[float, float]:
    """eval.min_gain and eval.min_logprob_gain of a job (the defaults for jobs from before they existed)."""
    return (float(metrics.get("eval.min_gain", EvalConfig.min_gain)),
            float(metrics.get("eval.min_logprob_gain", EvalConfig.min_logprob_gain)))


# ---------------------------------------------------------------------------------------------------------- table

def _model_metrics(m: Dict, model: str) -> Dict:
    out = {name: m.get(f"{model}/{name}") for name in MODEL_COLUMNS}
    out.update({k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(f"{model}/") and "@" in k})
    return out


def _gain_columns(m: Dict, names: Sequence[str], kind: str) -> Dict:
    return {f"{kind}/{n}": m.get(f"{kind}/{n}") for n in names}


def results_table(jobs: List[dict]):
    """One row per job's SFT model, after reference rows for the base model and each distinct CPT model."""
    import pandas as pd

    keys = swept_keys(jobs)
    headline = _headline(jobs)
    gains = [*QA_METRICS, "judge", *GENERAL_METRICS]
    ok = [j for j in jobs if j["status"] == "ok"]
    rows = []
    if ok and "base/contains" in ok[0]["metrics"]:
        rows.append({"row": "base", "job": "", "status": "reference", **{k: None for k in keys},
                     **_model_metrics(ok[0]["metrics"], "base")})
    seen = set()
    for j in ok:
        m = j["metrics"]
        key = m.get("key/merge") or m.get("cpt_model")
        if key and key not in seen and "cpt/contains" in m:
            seen.add(key)
            rows.append({"row": "cpt", "job": j["job"], "status": "reference",
                         **{k: (j["overrides"].get(k) if not k.startswith(("sft.", "eval.")) else None)
                            for k in keys},
                         **_model_metrics(m, "cpt"), **_gain_columns(m, gains, "cpt_gain")})
    for j in jobs:
        m = j["metrics"]
        min_gain, min_logprob_gain = _thresholds(m) if m else (None, None)
        rows.append({"row": "sft", "job": j["job"], "status": j["status"],
                     **{k: j["overrides"].get(k) for k in keys}, **_model_metrics(m, "sft"),
                     **_gain_columns(m, gains, "cpt_gain"), **_gain_columns(m, gains, "gain_kept"),
                     **_gain_columns(m, gains, "gain_kept_reason"),
                     "eval.min_gain": min_gain, "eval.min_logprob_gain": min_logprob_gain,
                     **{k: v for k, v in m.items() if k.startswith("transitions/")},
                     # what a lever changed, beside its result (docs/levers.md): alpha alone is not comparable
                     # across ranks, the scale is
                     **{k: m.get(k) for k in LEVER_COLUMNS if k in m},
                     "stage/cpt": m.get("stage/cpt"), "error": j["error"]})
    df = pd.DataFrame(rows)
    present = set().union(*(j["metrics"] for j in jobs))

    def computed(c):  # a metric no job computed (no judge, no general QA set) gets no column; an empty value does
        if c.startswith(("cpt_gain/", "gain_kept", "transitions/")):
            return c in present
        return c not in MODEL_COLUMNS and "@" not in c or any(f"{m}/{c}" in present for m in MODEL_NAMES)

    df = df[[c for c in df.columns if computed(c)]]
    for k in keys:  # keep swept values as typed (32, not 32.0, beside the reference rows' blanks)
        df[k] = pd.Series([r.get(k) for r in rows], dtype=object)
    order = {"base": 0, "cpt": 1, "sft": 2}
    df["_kind"] = df["row"].map(order)
    df["_failed"] = df["status"].isin(["failed", "incomplete"])
    score = df[headline] if headline in df else pd.Series(0.0, index=df.index)
    df["_score"] = pd.to_numeric(score, errors="coerce").fillna(-math.inf)
    df = df.sort_values(["_kind", "_failed", "_score"], ascending=[True, True, False], kind="stable")
    df = df.drop(columns=["_kind", "_failed", "_score"])
    return df.reset_index(drop=True), keys


LEVER_COLUMNS = ("cpt/lora_scale", "sft/lora_scale", "sft/replay_share")


def _md_columns(df, keys: List[str]) -> List[str]:
    """results.md shows the main columns; reasons, thresholds, groups and transitions are in results.csv (and the
    reasons and thresholds in the text under the table)."""
    hidden = ("gain_kept_reason/", "transitions/", "eval.min_")
    rare = {"general_exact_match", "general_char_f1", "general_logprob", "cpt_gain/general_exact_match",
            "cpt_gain/general_char_f1", "cpt_gain/general_logprob", "gain_kept/general_exact_match",
            "gain_kept/general_char_f1"}
    return [c for c in df.columns if c in keys or (not c.startswith(hidden) and "@" not in c and c not in rare)]


_METRIC_WORDS = {
    "exact_match": "share of QA questions whose normalised answer equals the gold answer or an alias",
    "contains": "share of QA questions whose normalised answer contains the gold answer or an alias",
    "char_f1": "mean character-level F1 of the answer against the gold answer (best over aliases)",
    "logprob": "mean over QA questions of the gold answer's mean per-token log-probability after "
               "eval.completion_prompt (nats; the same prompt for all three models)",
    "judge": "share of answers the judge model finds equal to the gold answer (はい vs いいえ, summed log-probability)",
    "heldout_ppl": "perplexity of the held-out domain text (data.heldout.path)",
}


def _describe_metric(name: str) -> str:
    base, _, group = name.partition("@")
    general = base.startswith("general_")
    words = _METRIC_WORDS.get(base[len("general_"):] if general else base, base)
    if general:
        words = words.replace("QA questions", "general-knowledge questions") + " (data.general_qa.path)"
    return f"{words}, over the questions of group '{group}'" if group else words


def legend(columns: Sequence[str], keys: Sequence[str], thresholds: str) -> List[str]:
    """One line per column: what it is and its formula ('base', 'CPT', 'SFT': that model's value of the metric)."""
    fixed = {
        "row": "base: the base model; cpt: a CPT model (one row per distinct CPT model); sft: a job's SFT model "
               "(the CPT model + that job's SFT adapter)",
        "job": "the job's directory in the sweep (for a cpt row: the first job that used that CPT model)",
        "status": "ok, failed (see error), incomplete, or reference (base and cpt rows)",
        "stage/cpt": "whether the job built its CPT stage or reused a cached one",
        "error": "the first line of the failed job's error",
        "eval.min_gain": "the threshold in force for gain_kept of share metrics",
        "eval.min_logprob_gain": "the threshold in force for gain_kept of logprob metrics (nats)",
        "eos_rate": "the SFT model: share of answers that ended with EOS within eval.max_new_tokens",
        "cpt/lora_scale": "the CPT adapter's effective scale: lora_alpha / r, or lora_alpha / √r with use_rslora",
        "sft/lora_scale": "the SFT adapter's effective scale: lora_alpha / r, or lora_alpha / √r with use_rslora",
        "sft/replay_share": "replayed CPT-text tokens / all trained SFT tokens (sft.replay_ratio, as achieved)",
    }
    lines = []
    for c in columns:
        if c in fixed:
            text = fixed[c]
        elif c in keys:
            text = "the job's value of this swept config key"
        elif c.startswith("cpt_gain/"):
            text = f"CPT − base of {c.split('/', 1)[1]}"
        elif c.startswith("gain_kept/"):
            m = c.split("/", 1)[1]
            text = (f"(SFT − base) ÷ (CPT − base) of {m}: the share of what CPT changed in {m} that survives SFT "
                    f"(1: all of it, 0: back at the base model); empty when |CPT − base| is below the threshold "
                    f"({thresholds})")
        elif c.startswith("gain_kept_reason/"):
            text = f"why gain_kept/{c.split('/', 1)[1]} is empty"
        elif c.startswith("transitions/"):
            text = {"known_before": "questions the base model already answered (contains)",
                    "learned_kept": "questions CPT taught (contains 0 → 1) that the SFT model still answers",
                    "learned_lost": "questions CPT taught that the SFT model no longer answers",
                    "not_learned": "questions none of base and CPT answered, nor SFT",
                    "sft_only": "questions only the SFT model answered"}.get(c.split("/", 1)[1], "count")
        else:
            text = f"the row's model: {_describe_metric(c)}"
        lines.append(f"- `{c}`: {text}")
    return lines


# ---------------------------------------------------------------------------------------------------------- intervals

def _answers(job: dict) -> Optional[List[dict]]:
    path = job["dir"] / "answers.jsonl"
    if not path.is_file():
        return None
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


# Keys that only reseed a run: jobs differing in these alone are repetitions of one grid cell. sft.seed varies SFT
# on one cached CPT model; cpt.seed and seed retrain CPT too.
SEED_KEYS = ("seed", "cpt.seed", "sft.seed")


def _seed(job: dict):
    """The job's seeds (seed, cpt.seed, sft.seed) as one hashable value; the stage seeds fall back to `seed`."""
    values = [job["overrides"].get(k, job["metrics"].get(k)) for k in SEED_KEYS]
    values = [values[0]] + [values[0] if v is None else v for v in values[1:]]
    return values[0] if values[1:] == [values[0]] * 2 else "/".join(map(str, values))


def _parse_statistic(name: str) -> Tuple[str, str]:
    kind, _, metric = name.partition("/")
    if kind not in (*MODEL_NAMES, "cpt_gain", "gain_kept") or not metric:
        raise PipelineError(f"statistic {name!r}: use <base|cpt|sft|cpt_gain|gain_kept>/<metric>, e.g. sft/contains")
    return kind, metric


def _per_seed(arrays: Dict[str, Dict[str, "object"]], name: str, thresholds: Tuple[float, float], q):
    """A statistic per seed over the questions `q` (indices, shape (..., n_questions)), as eval defines it.

    `arrays[model][metric]` holds per-question scores, shape (n_seeds, n_questions). Returns shape (n_seeds, ...);
    NaN where gain_kept's denominator is below its threshold (eval.gain_kept)."""
    import numpy as np

    kind, metric = _parse_statistic(name)

    def mean(model):
        return arrays[model][metric][:, q].mean(-1)

    if kind in MODEL_NAMES:
        return mean(kind)
    base, cpt = mean("base"), mean("cpt")
    if kind == "cpt_gain":
        return cpt - base
    threshold, _ = gain_threshold(metric, *thresholds)
    gain = cpt - base
    bad = (gain == 0) | (np.abs(gain) < threshold - GAIN_TOLERANCE)
    return np.where(bad, np.nan, (mean("sft") - base) / np.where(bad, 1.0, gain))


def _score_arrays(answer_sets: List[List[dict]], qids: List[str], names: Sequence[str]):
    """{model: {metric: array (n_seeds, n_questions)}} for the models and metrics that `names` need."""
    import numpy as np

    need = {_parse_statistic(n)[1] for n in names}
    by_id = [{a["id"]: a for a in answers} for answers in answer_sets]
    out: Dict[str, Dict[str, object]] = {}
    for model in MODEL_NAMES:
        out[model] = {}
        for metric in need:
            try:
                out[model][metric] = np.array([[rows[q][model][metric] for q in qids] for rows in by_id], dtype=float)
            except KeyError:
                pass  # a model or metric not evaluated: statistics that need it raise below
    return out


def _check_available(arrays, name: str) -> None:
    kind, metric = _parse_statistic(name)
    models = [kind] if kind in MODEL_NAMES else ["base", "cpt"] + (["sft"] if kind == "gain_kept" else [])
    missing = [m for m in models if metric not in arrays[m]]
    if missing:
        raise PipelineError(f"statistic {name}: answers.jsonl has no {metric!r} for {', '.join(missing)}")


def bootstrap_interval(samples: Sequence, statistic, n_resamples: int = N_RESAMPLES, seed: int = 0) -> Dict:
    """scipy.stats.bootstrap (percentile, 95%) of `statistic(*resampled_samples, axis=-1)`, each sample resampled
    with replacement on its own; statistic returns NaN where undefined. Returns value, ci_low, ci_high, undefined
    (number of undefined draws) and note (why the interval is missing)."""
    import numpy as np
    from scipy import stats

    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(statistic(*samples, axis=-1))
    if math.isnan(value):
        return {"value": None, "ci_low": None, "ci_high": None, "undefined": None,
                "note": "undefined on the full data"}
    if min(np.shape(x)[-1] for x in samples) < 2:  # one question: nothing to resample
        return {"value": value, "ci_low": None, "ci_high": None, "undefined": None,
                "note": "no interval from a single question"}
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # scipy warns about NaN draws (as if the data were degenerate); they are counted and reported here instead
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(tuple(samples), statistic, n_resamples=n_resamples, vectorized=True, paired=False,
                              batch=1000,  # draws per call: bounds the (models × draws × questions) arrays
                              method="percentile", confidence_level=0.95, rng=np.random.default_rng(seed))
    dist = np.asarray(res.bootstrap_distribution)
    undefined = int(np.isnan(dist).sum())
    out = {"value": value, "ci_low": None, "ci_high": None, "undefined": undefined, "note": ""}
    if undefined > MAX_UNDEFINED * n_resamples:
        out["note"] = (f"interval undefined: {undefined} of {n_resamples} draws undefined (denominator below its "
                       f"threshold), more than {MAX_UNDEFINED:.1%}")
    elif undefined:
        out["ci_low"], out["ci_high"] = (float(x) for x in np.nanpercentile(dist, [2.5, 97.5]))
        out["note"] = f"{undefined} of {n_resamples} draws undefined, left out"
    else:
        out["ci_low"], out["ci_high"] = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return out


def t_interval(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """95% t-interval of the mean of `values` (per-seed results): mean ± t(0.975, n−1) · sd / √n."""
    import numpy as np
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return None, None
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def cell_statistics(headline: str) -> List[str]:
    """The statistics of cells.csv: the SFT and CPT models' headline score and gain_kept of every QA metric."""
    return [f"sft/{headline}", *[f"gain_kept/{m}" for m in QA_METRICS], f"cpt/{headline}"]


def _group_cells(jobs: List[dict], keys: List[str]) -> Tuple[Dict[tuple, List[dict]], List[str]]:
    """Evaluated jobs by grid cell (the swept keys except seed), cells in the order of their first job."""
    cell_keys = [k for k in keys if k not in SEED_KEYS]
    cells: Dict[tuple, List[dict]] = {}
    for j in jobs:
        if j["status"] == "ok" and any(k.startswith("sft/") for k in j["metrics"]):
            cells.setdefault(tuple(j["overrides"].get(k) for k in cell_keys), []).append(j)
    return cells, cell_keys


def _fmt(v, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def cells_table(jobs: List[dict], keys: List[str]):
    """Per grid cell: each statistic of cell_statistics with its 95% interval.

    One seed: the paired bootstrap over questions (bootstrap_interval). Several seeds: the mean of the per-seed values
    (metrics.json) with a t-interval, for any number of seeds: a percentile bootstrap of n seed values is narrower than
    the t-interval by about z/t(n−1)·√((n−1)/n), 0.63 at 5 seeds and 0.87 at 20, so it would understate the spread
    at the seed counts sweeps use. A seed whose value is undefined makes the cell's value undefined (averaging the
    others would keep only the seeds where CPT happened to gain enough)."""
    import numpy as np
    import pandas as pd

    headline = _headline(jobs)
    names = cell_statistics(headline)
    cells, cell_keys = _group_cells(jobs, keys)
    rows = []
    for cell, members in cells.items():
        seeds = [_seed(m) for m in members]
        row = {**dict(zip(cell_keys, cell)), "n_seeds": len(members), "seeds": ",".join(map(str, seeds)),
               "jobs": ",".join(m["job"] for m in members)}
        if len(members) > 1:
            row["interval"] = f"t over {len(members)} seeds"
            for name in names:
                vals = [m["metrics"].get(name) for m in members]
                row[f"{name} per_seed"] = ", ".join(_fmt(v) for v in vals)
                undefined = sum(v is None for v in vals)
                row[f"{name} undefined"] = undefined
                if undefined:
                    row[name], row[f"{name} ci_low"], row[f"{name} ci_high"] = None, None, None
                    row[f"{name} note"] = f"undefined for {undefined} of {len(vals)} seeds"
                    continue
                row[name] = float(np.mean(vals))
                row[f"{name} ci_low"], row[f"{name} ci_high"] = t_interval(vals)
                row[f"{name} note"] = ""
        else:
            answers = _answers(members[0])
            if not answers or not all(set(MODEL_NAMES) <= set(a) for a in answers):
                row["interval"] = "none (answers.jsonl lacks a model)"
                for name in names:
                    row[name] = members[0]["metrics"].get(name)
                rows.append(row)
                continue
            arrays = _score_arrays([answers], [a["id"] for a in answers], names)
            thresholds = _thresholds(members[0]["metrics"])
            row["interval"] = f"paired bootstrap over {len(answers)} questions, {N_RESAMPLES} draws"
            for name in names:
                try:
                    _check_available(arrays, name)
                except PipelineError:
                    continue
                res = bootstrap_interval(
                    [np.arange(len(answers))],
                    lambda q, axis=-1, name=name: _per_seed(arrays, name, thresholds, q)[0])
                row[name], row[f"{name} ci_low"], row[f"{name} ci_high"] = res["value"], res["ci_low"], res["ci_high"]
                row[f"{name} undefined"], row[f"{name} note"] = res["undefined"], res["note"]
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty and f"sft/{headline}" in df:
        df = df.sort_values(f"sft/{headline}", ascending=False, kind="stable", na_position="last")
    return df.reset_index(drop=True), cell_keys


def _format_cells(df, cell_keys, headline: str) -> str:
    """The markdown of cells.csv: `value [low, high]` per statistic, each seed's value where there are few."""
    shown = [f"sft/{headline}", f"gain_kept/{headline}", "gain_kept/logprob", f"cpt/{headline}"]
    shown = [s for s in dict.fromkeys(shown) if s in df]
    out = df[cell_keys + ["n_seeds", "interval"]].copy()
    for name in shown:
        cells = []
        for r in df.to_dict("records"):
            text = _fmt(r.get(name))
            if r.get(f"{name} ci_low") is not None and not _isnan(r.get(f"{name} ci_low")):
                text += f" [{_fmt(r[f'{name} ci_low'])}, {_fmt(r[f'{name} ci_high'])}]"
            if r["n_seeds"] > 1 and r["n_seeds"] < MIN_SEEDS_TO_RESAMPLE and r.get(f"{name} per_seed"):
                text += f" (seeds: {r[f'{name} per_seed']})"
            if isinstance(r.get(f"{name} note"), str) and r[f"{name} note"]:  # NaN where another row had one
                text += f" ({r[f'{name} note']})"
            cells.append(text)
        out[name] = cells
    return out.to_markdown(index=False)


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


# ---------------------------------------------------------------------------------------------------------- A vs B

def paired_difference(jobs_a: List[dict], jobs_b: List[dict], metric: str, n_resamples: int = N_RESAMPLES,
                      seed: int = 0) -> Dict:
    """Cell A minus cell B in `metric` (e.g. "sft/contains", "gain_kept/contains"), with a 95% bootstrap interval.

    `jobs_a`, `jobs_b`: the jobs of each cell (read_jobs entries, one per seed). Pairs are the same question (by id)
    under the same seed: each cell's statistic is computed per seed as eval computes it, the difference is the mean
    over seeds of A − B. Each bootstrap draw resamples the questions (the same ones for both cells and all seeds) and,
    with MIN_SEEDS_TO_RESAMPLE or more seeds in common, the seeds as well; with fewer, the seeds stay fixed, so the
    interval then covers the choice of questions, not the training noise between seeds (cells.csv shows that).
    Returns a, b, difference, ci_low, ci_high, undefined (draws), n_questions, seeds, resampled and note."""
    import numpy as np

    _parse_statistic(metric)
    by_seed_a = {_seed(j): j for j in jobs_a if j["status"] == "ok"}
    by_seed_b = {_seed(j): j for j in jobs_b if j["status"] == "ok"}
    seeds = [s for s in by_seed_a if s in by_seed_b]
    if not seeds:
        raise PipelineError(f"paired difference of {metric}: the two cells have no evaluated seed in common")
    answers_a = [_answers(by_seed_a[s]) for s in seeds]
    answers_b = [_answers(by_seed_b[s]) for s in seeds]
    if any(a is None for a in answers_a + answers_b):
        raise PipelineError(f"paired difference of {metric}: a job has no answers.jsonl")
    common = set.intersection(*({a["id"] for a in answers} for answers in answers_a + answers_b))
    qids = [a["id"] for a in answers_a[0] if a["id"] in common]
    if not qids:
        raise PipelineError(f"paired difference of {metric}: no question id in common")
    arr_a, arr_b = _score_arrays(answers_a, qids, [metric]), _score_arrays(answers_b, qids, [metric])
    _check_available(arr_a, metric)
    _check_available(arr_b, metric)
    thr_a, thr_b = _thresholds(by_seed_a[seeds[0]]["metrics"]), _thresholds(by_seed_b[seeds[0]]["metrics"])
    resample_seeds = len(seeds) >= MIN_SEEDS_TO_RESAMPLE

    def per_seed_diff(q):  # shape (n_seeds, ...)
        return _per_seed(arr_a, metric, thr_a, q) - _per_seed(arr_b, metric, thr_b, q)

    if resample_seeds:
        def statistic(s, q, axis=-1):
            d = per_seed_diff(q)  # (n_seeds,) or (n_seeds, batch); s: (n_seeds,) or (batch, n_seeds)
            return d[s].mean() if d.ndim == 1 else np.take_along_axis(d.T, s, axis=1).mean(1)
        samples = [np.arange(len(seeds)), np.arange(len(qids))]
    else:
        def statistic(q, axis=-1):
            return per_seed_diff(q).mean(0)
        samples = [np.arange(len(qids))]
    res = bootstrap_interval(samples, statistic, n_resamples, seed)
    all_q = np.arange(len(qids))
    with np.errstate(divide="ignore", invalid="ignore"):
        a, b = (float(np.mean(_per_seed(arr, metric, thr, all_q))) for arr, thr in ((arr_a, thr_a), (arr_b, thr_b)))
    return {"metric": metric, "a": None if math.isnan(a) else a, "b": None if math.isnan(b) else b,
            "difference": res["value"], "ci_low": res["ci_low"], "ci_high": res["ci_high"],
            "undefined": res["undefined"], "n_resamples": n_resamples, "n_questions": len(qids),
            "seeds": ",".join(map(str, seeds)),
            "resampled": "seeds and questions" if resample_seeds else "questions (seeds fixed)", "note": res["note"]}


def parse_cell_spec(spec: str) -> Dict[str, object]:
    """'sft.lora_alpha=8,sft.target_modules=attn' → {key: value}; a comma splits only before the next `key=`, so a
    list value such as [q_proj,v_proj] stays whole."""
    out = {}
    for part in re.split(r",(?=\s*[A-Za-z_+~][\w.]*=)", spec):
        key, eq, val = part.strip().partition("=")
        if not eq or not key:
            raise PipelineError(f"--baseline {spec!r}: expected key=value pairs separated by commas")
        out[key.lstrip("+~")] = _value(val)
    return out


def _cell_label(cell_keys: List[str], cell: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(cell_keys, cell)) or "the only cell"


def find_cell(cells: Dict[tuple, List[dict]], cell_keys: List[str], spec: str) -> tuple:
    """The one cell whose jobs have every key=value of `spec` among their overrides."""
    want = parse_cell_spec(spec)
    match = [c for c, members in cells.items()
             if all(str(members[0]["overrides"].get(k)) == str(v) for k, v in want.items())]
    if len(match) != 1:
        listed = "; ".join(_cell_label(cell_keys, c) for c in cells)
        raise PipelineError(f"--baseline {spec!r} matches {len(match)} evaluated cells, not one; cells: {listed}")
    return match[0]


def differences_table(jobs: List[dict], keys: List[str], baseline: Optional[str] = None):
    """Every cell vs the baseline cell (the sweep's first evaluated cell unless `baseline` names one):
    paired_difference of sft/<headline> and gain_kept/<headline>. Returns (table, summary for results.md)."""
    import pandas as pd

    headline = _headline(jobs)
    cells, cell_keys = _group_cells(jobs, keys)
    if len(cells) < 2:
        return pd.DataFrame(), None
    base_cell = find_cell(cells, cell_keys, baseline) if baseline else next(iter(cells))
    rows = []
    for cell, members in cells.items():
        if cell == base_cell:
            continue
        for metric in dict.fromkeys([f"sft/{headline}", f"gain_kept/{headline}"]):
            try:
                d = paired_difference(members, cells[base_cell], metric)
            except PipelineError as e:
                d = {"metric": metric, "note": str(e)}
            rows.append({**dict(zip(cell_keys, cell)), **d})
    df = pd.DataFrame(rows)

    def mean_score(members):
        vals = [m["metrics"].get(f"sft/{headline}") for m in members]
        return sum(vals) / len(vals) if None not in vals else -math.inf

    best = max(cells, key=lambda c: mean_score(cells[c]))
    summary = {"headline": headline, "baseline": _cell_label(cell_keys, base_cell),
               "best": _cell_label(cell_keys, best),
               "baseline_how": f"--baseline {baseline}" if baseline else
               f"the sweep's first cell, job {cells[base_cell][0]['job']}; choose another with --baseline",
               "rows": [r for r in rows if tuple(r.get(k) for k in cell_keys) == best] if best != base_cell else []}
    return df, summary


def differences_plot(diffs, cell_keys: List[str], summary: Dict, path: Path) -> Optional[Path]:
    """differences.png: every cell minus the baseline with its 95% interval, one panel per metric (a forest plot:
    an interval that does not cross 0 is a difference the questions and seeds support)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if diffs.empty or "difference" not in diffs:
        return None
    metrics = list(dict.fromkeys(diffs["metric"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics) + 1.5, 0.45 * len(diffs) / len(metrics)
                                                        + 1.4), squeeze=False, sharey=True)
    for ax, metric in zip(axes[0], metrics):
        sel = diffs[diffs["metric"] == metric].reset_index(drop=True)
        labels = [", ".join(f"{k}={r[k]}" for k in cell_keys) for _, r in sel.iterrows()]
        for i, r in sel.iterrows():
            if r["difference"] is None or r["difference"] != r["difference"]:
                continue
            lo, hi = r.get("ci_low"), r.get("ci_high")
            if lo is not None and lo == lo:
                ax.plot([lo, hi], [i, i], color="tab:blue", lw=2)
            ax.plot(r["difference"], i, "o", color="tab:blue")
        ax.axvline(0, color="grey", lw=1, ls="--")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"{metric}: cell - baseline")
    fig.suptitle(f"vs baseline {summary['baseline']} (95% intervals)", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _format_best_vs_baseline(summary: Dict) -> List[str]:
    h = summary["headline"]
    lines = ["## Best vs baseline", "",
             f"Baseline: {summary['baseline']} ({summary['baseline_how']}). Best: the cell with the highest "
             f"sft/{h} (mean over seeds): {summary['best']}.", ""]
    if not summary["rows"]:
        return lines + ["The baseline is the best cell. differences.csv lists every cell against it.", ""]
    table = ["| statistic | best | baseline | best − baseline | 95% interval | undefined draws | paired over |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        ci = (f"[{_fmt(r.get('ci_low'), True)}, {_fmt(r.get('ci_high'), True)}]" if r.get("ci_low") is not None
              else r.get("note") or "-")
        over = (f"{r['n_questions']} questions × seeds {r['seeds']}, resampled: {r['resampled']}"
                if r.get("n_questions") else r.get("note", ""))
        table.append(f"| {r['metric']} | {_fmt(r.get('a'))} | {_fmt(r.get('b'))} | {_fmt(r.get('difference'), True)} "
                     f"| {ci} | {r.get('undefined', '-')} | {over} |")
    return lines + table + ["", "The difference is the mean over seeds of (best − baseline), question by question "
                            "for the same questions and seeds; an interval that excludes 0 says the difference is "
                            "larger than the choice of questions explains. differences.csv lists every cell.", ""]


# ---------------------------------------------------------------------------------------------------------- plots etc.

def _order(v):
    """Numbers in numeric order, then strings."""
    return (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v))


def heatmaps(df, keys: List[str], out_dir: Path, headline: str = "contains") -> List[Path]:
    """One PNG per statistic (sft/<headline>, gain_kept/<headline>, gain_kept/logprob): x = first swept sft.* key,
    y = second (if any), one panel per CPT setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sft_keys = [k for k in keys if k.startswith("sft.") and k not in SEED_KEYS]
    cpt_keys = [k for k in keys if not k.startswith(("sft.", "eval.")) and k not in SEED_KEYS]
    jobs = df[(df["row"] == "sft") & (df["status"] == "ok")]
    if not sft_keys or jobs.empty:
        log.info("no heatmap: the sweep varies no sft.* key")
        return []
    x_key = "sft.lora_alpha" if "sft.lora_alpha" in sft_keys else sft_keys[0]
    y_key = next((k for k in sft_keys if k != x_key), None)
    panels = [tuple(r) for r in jobs[cpt_keys].drop_duplicates().itertuples(index=False)] if cpt_keys else [()]
    written = []
    for metric in dict.fromkeys([f"sft/{headline}", f"gain_kept/{headline}", "gain_kept/logprob"]):
        col = metric.split("/", 1)[1] if metric.startswith("sft/") else metric
        if col not in jobs:
            continue
        xs = sorted(jobs[x_key].dropna().unique(), key=_order)
        ys = sorted(jobs[y_key].dropna().unique(), key=_order) if y_key else [None]
        fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 1.6 * len(xs) * len(panels), 1.6 + 0.7 * len(ys)),
                                 squeeze=False)
        vals = pd_numeric(jobs[col])
        vmin, vmax = (np.nanmin(vals), np.nanmax(vals)) if vals.notna().any() else (0, 1)
        for ax, panel in zip(axes[0], panels):
            sel = jobs
            for k, v in zip(cpt_keys, panel):
                sel = sel[sel[k] == v]
            grid = np.full((len(ys), len(xs)), np.nan)
            counts = np.zeros_like(grid)
            for _, r in sel.iterrows():
                if r[x_key] not in xs or (y_key and r[y_key] not in ys) or _missing(r[col]):
                    continue  # a job without this override (e.g. added to the sweep dir by hand), or no value
                yi, xi = ys.index(r[y_key]) if y_key else 0, xs.index(r[x_key])
                grid[yi, xi] = (0 if np.isnan(grid[yi, xi]) else grid[yi, xi]) + float(r[col])
                counts[yi, xi] += 1
            grid = np.where(counts > 0, grid / np.maximum(counts, 1), np.nan)  # the mean over seeds
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


def pd_numeric(series):
    import pandas as pd

    return pd.to_numeric(series, errors="coerce").astype(float)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def answer_sheet(jobs: List[dict], keys: List[str], path: Path) -> None:
    """Per question: gold, base, each distinct CPT model's and each cell's SFT answer, side by side."""
    ok = [j for j in jobs if j["status"] == "ok" and (j["dir"] / "answers.jsonl").is_file()]
    if not ok:
        path.write_text("# Answers\n\nNo job finished its evaluation.\n", encoding="utf-8")
        return
    per_job = {j["job"]: {a["id"]: a for a in _answers(j)} for j in ok}

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


# ---------------------------------------------------------------------------------------------------------- files

def _threshold_text(jobs: List[dict]) -> str:
    pairs = sorted({_thresholds(j["metrics"]) for j in jobs if j["metrics"]})
    if not pairs:
        pairs = [(EvalConfig.min_gain, EvalConfig.min_logprob_gain)]
    return "; ".join(f"eval.min_gain {g:g}, eval.min_logprob_gain {lg:g} nats for logprob" for g, lg in pairs)


def results_markdown(sweep_dir: Path, jobs: List[dict], df, keys: List[str], cells, cell_keys,
                     summary: Optional[Dict]) -> str:
    n_ok = sum(j["status"] == "ok" for j in jobs)
    headline = _headline(jobs)
    thresholds = _threshold_text(jobs)
    shown = _md_columns(df, keys)
    md = [f"# Sweep {sweep_dir.name}", "",
          f"{len(jobs)} jobs: {n_ok} ok, {len(jobs) - n_ok} failed or incomplete. Swept: {', '.join(keys) or '-'}. "
          f"SFT rows sorted by the SFT model's {headline} (eval.headline_metric), best first. gain_kept thresholds: "
          f"{thresholds}.", "",
          df[shown].astype(object).where(df[shown].notna(), "").to_markdown(index=False, floatfmt=".3f")]
    reasons: Dict[Tuple[str, str], List[str]] = {}  # (column, reason) → jobs: jobs on one CPT model share reasons
    for r in df[df["row"] == "sft"].to_dict("records"):
        for c in [c for c in df.columns if c.startswith("gain_kept_reason/")]:
            if isinstance(r.get(c), str) and r[c]:
                reasons.setdefault((c.replace("_reason", ""), r[c]), []).append(str(r["job"]))
    if reasons:
        md += ["", "Empty gain_kept cells:", "",
               *[f"- {c}: {why} (job{'s' if len(js) > 1 else ''} {', '.join(js)})" for (c, why), js in reasons.items()]]
    if not cells.empty:
        md += ["", "## Per grid cell: value and 95% interval", "",
               "One seed: paired bootstrap over questions (each draw resamples the questions once for all three "
               f"models; {N_RESAMPLES} draws, percentile). Several seeds: mean of the seeds' values with a t-interval; "
               f"each seed's value is shown when there are fewer than {MIN_SEEDS_TO_RESAMPLE}. A gain_kept interval "
               f"is undefined when more than {MAX_UNDEFINED:.1%} of the draws fall below the threshold. All "
               "statistics in cells.csv.", "", _format_cells(cells, cell_keys, headline)]
    if summary:
        md += ["", *_format_best_vs_baseline(summary)]
    md += ["", "## Columns", "", *legend(shown + [c for c in df.columns if c not in shown], keys, thresholds)]
    return "\n".join(md) + "\n"


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
    (sweep_dir / "results.md").write_text(results_markdown(sweep_dir, jobs, df, keys, cells, cell_keys, summary),
                                          encoding="utf-8")
    heatmaps(df, keys, sweep_dir, _headline(jobs))
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
