"""A sweep's statistics: each grid cell's value with its 95% interval, and every cell against a baseline.

    from pipeline.sweep.stats import paired_difference
    paired_difference(jobs_a, jobs_b, "sft/contains")      # jobs: pipeline.sweep.tables.read_jobs entries

A statistic is computed from per-question scores in answers.jsonl exactly as eval computes it (gain_kept is a ratio
of means over the same questions, undefined below the same threshold), and every bootstrap draw resamples question
indices once and computes it for all models on that draw (paired). A draw whose gain_kept denominator is below the
threshold is undefined: such draws are counted (`undefined`), and when more than MAX_UNDEFINED of them are, the
interval is reported as undefined rather than computed from the rest.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

from pipeline.core.config import EvalConfig
from pipeline.core.outputs import PipelineError
from pipeline.stages.eval import GAIN_TOLERANCE, MODEL_NAMES, gain_threshold

QA_METRICS = ["exact_match", "contains", "char_f1", "logprob"]
N_RESAMPLES = 9999
# A 95% interval leaves 2.5% of the draws in each tail: more undefined draws than one tail holds could decide a bound.
MAX_UNDEFINED = 0.025
# Seeds: below this many, a bootstrap over seeds cannot represent their spread (3 values have 10 distinct resamples,
# and its percentile interval never leaves [min, max]); seed means get a t-interval, and a paired difference holds the
# seeds fixed and resamples questions only. From this many on, a paired difference resamples seeds too.
MIN_SEEDS_TO_RESAMPLE = 5


def parse_value(text: str):
    """'32' → 32, '0.5' → 0.5, anything else stays a string (as typed in the override)."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def headline_metric(jobs: List[dict]) -> str:
    return next((j["metrics"]["headline_metric"] for j in jobs if j["metrics"].get("headline_metric")), "contains")


def gain_thresholds(metrics: Dict) -> Tuple[float, float]:
    """eval.min_gain and eval.min_logprob_gain of a job (the defaults for jobs from before they existed)."""
    return (float(metrics.get("eval.min_gain", EvalConfig.min_gain)),
            float(metrics.get("eval.min_logprob_gain", EvalConfig.min_logprob_gain)))


def read_answers(job: dict) -> Optional[List[dict]]:
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




def fmt(v, signed: bool = False) -> str:
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

    headline = headline_metric(jobs)
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
                row[f"{name} per_seed"] = ", ".join(fmt(v) for v in vals)
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
            answers = read_answers(members[0])
            if not answers or not all(set(MODEL_NAMES) <= set(a) for a in answers):
                row["interval"] = "none (answers.jsonl lacks a model)"
                for name in names:
                    row[name] = members[0]["metrics"].get(name)
                rows.append(row)
                continue
            arrays = _score_arrays([answers], [a["id"] for a in answers], names)
            thresholds = gain_thresholds(members[0]["metrics"])
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
    answers_a = [read_answers(by_seed_a[s]) for s in seeds]
    answers_b = [read_answers(by_seed_b[s]) for s in seeds]
    if any(a is None for a in answers_a + answers_b):
        raise PipelineError(f"paired difference of {metric}: a job has no answers.jsonl")
    common = set.intersection(*({a["id"] for a in answers} for answers in answers_a + answers_b))
    qids = [a["id"] for a in answers_a[0] if a["id"] in common]
    if not qids:
        raise PipelineError(f"paired difference of {metric}: no question id in common")
    arr_a, arr_b = _score_arrays(answers_a, qids, [metric]), _score_arrays(answers_b, qids, [metric])
    _check_available(arr_a, metric)
    _check_available(arr_b, metric)
    thr_a, thr_b = gain_thresholds(by_seed_a[seeds[0]]["metrics"]), gain_thresholds(by_seed_b[seeds[0]]["metrics"])
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
        out[key.lstrip("+~")] = parse_value(val)
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

    headline = headline_metric(jobs)
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

