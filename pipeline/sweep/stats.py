"""A sweep's statistics: each grid cell's value with its 95% interval, and every cell against a baseline.

    from pipeline.sweep.stats import paired_difference
    paired_difference(jobs_a, jobs_b, "sft/contains")      # jobs: pipeline.sweep.tables.read_jobs entries

A statistic is computed from per-question scores in answers.jsonl exactly as eval computes it (gain_kept is a ratio
of means over the same questions), and every bootstrap draw resamples question indices once and computes it for all
models on that draw (paired). Every interval says what it covers (`covers`): which runs vary (SFT seeds, CPT runs),
which are held fixed, and whether the questions are resampled. n counts distinct models, not jobs: jobs whose seeds
do not reach their model (the chat_vector cells' sft.seed) are one model.

Ratios keep every draw. A draw whose gain_kept denominator |CPT − base| is below the threshold (eval.min_gain,
eval.min_logprob_gain) is placed at ±∞ by the sign the ratio has there (the numerator's, SFT − base, when CPT − base is
exactly 0); a draw with a zero numerator as well has no sign and counts at both ends. The percentile bounds are then
read off all draws, so a side is unbounded (±∞) exactly when more than 2.5% of the draws lie at its infinity. (Not a
Fieller interval: the percentile bootstrap keeps the pairing of questions across the three models and the seeds,
which Fieller's normal model of numerator and denominator would have to estimate separately.)
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
# A 95% interval leaves 2.5% of the draws in each tail: a side is unbounded when more draws than that lie at its ±∞.
MAX_UNDEFINED = 0.025
# Power statements (results.md, docs/levers.md): two-sided 5%, 80% power.
ALPHA, POWER = 0.05, 0.80
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


def ratio(num, den, threshold: float):
    """num ÷ den where |den| reaches `threshold`; elsewhere ±∞ by the sign the ratio has (num's where den is 0), and
    NaN where num is 0 as well (no sign: such a draw counts at both ends of an interval)."""
    import numpy as np

    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    bad = (den == 0) | (np.abs(den) < threshold - GAIN_TOLERANCE)
    sign = np.sign(num) * np.where(den < 0, -1.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(bad, np.where(num == 0, np.nan, sign * np.inf), num / np.where(bad, 1.0, den))


def _per_seed(arrays: Dict[str, Dict[str, "object"]], name: str, thresholds: Tuple[float, float], q):
    """A statistic per seed over the questions `q` (indices, shape (..., n_questions)), as eval defines it.

    `arrays[model][metric]` holds per-question scores, shape (n_seeds, n_questions). Returns shape (n_seeds, ...);
    gain_kept below its threshold at ±∞ or NaN (ratio)."""
    kind, metric = _parse_statistic(name)

    def mean(model):
        return arrays[model][metric][:, q].mean(-1)

    if kind in MODEL_NAMES:
        return mean(kind)
    base, cpt = mean("base"), mean("cpt")
    if kind == "cpt_gain":
        return cpt - base
    return ratio(mean("sft") - base, cpt - base, gain_threshold(metric, *thresholds)[0])


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


def percentile_bounds(draws) -> Dict:
    """The 95% percentile interval of bootstrap draws that may hold ±∞ and NaN (ratio): NaN draws count at −∞ for
    the lower bound and at +∞ for the upper. Bounds are draws themselves (inverted CDF), so a bound is ±∞ exactly when
    more than 2.5% of the draws lie at that infinity. Also the draws' counts and a bootstrap p-value for 0."""
    import numpy as np

    d = np.asarray(draws, dtype=float)
    n, both = len(d), np.isnan(d)
    low = float(np.quantile(np.where(both, -np.inf, d), 0.025, method="inverted_cdf"))
    high = float(np.quantile(np.where(both, np.inf, d), 0.975, method="inverted_cdf"))
    # two-sided, from the share of draws on each side of 0 (both-sided draws on both); +1: never 0 from finite draws
    at_most, at_least = int((d <= 0).sum() + both.sum()), int((d >= 0).sum() + both.sum())
    p = min(1.0, 2 * min(at_most + 1, at_least + 1) / (n + 1))
    return {"ci_low": low, "ci_high": high, "p": p, "plus_inf": int(np.isposinf(d).sum()),
            "minus_inf": int(np.isneginf(d).sum()), "no_sign": int(both.sum())}


def bootstrap_interval(samples: Sequence, statistic, n_resamples: int = N_RESAMPLES, seed: int = 0) -> Dict:
    """scipy.stats.bootstrap (percentile, 95%) of `statistic(*resampled_samples, axis=-1)`, each sample resampled
    with replacement on its own; a ratio statistic returns ±∞ or NaN where its denominator is below the threshold
    (ratio). Returns value, ci_low, ci_high, p (bootstrap p-value for 0), undefined (draws at ±∞ or without a sign)
    and note (what those draws did to the interval)."""
    import numpy as np
    from scipy import stats

    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(statistic(*samples, axis=-1))
    if not math.isfinite(value):
        return {"value": None, "ci_low": None, "ci_high": None, "p": None, "undefined": None,
                "note": "undefined on the full data"}
    if min(np.shape(x)[-1] for x in samples) < 2:  # one question: nothing to resample
        return {"value": value, "ci_low": None, "ci_high": None, "p": None, "undefined": None,
                "note": "no interval from a single question"}
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # scipy warns about infinite and NaN draws (as if the data were degenerate); they are counted here instead
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.bootstrap(tuple(samples), statistic, n_resamples=n_resamples, vectorized=True, paired=False,
                              batch=1000,  # draws per call: bounds the (models × draws × questions) arrays
                              method="percentile", confidence_level=0.95, rng=np.random.default_rng(seed))
    bounds = percentile_bounds(res.bootstrap_distribution)
    undefined = bounds["plus_inf"] + bounds["minus_inf"] + bounds["no_sign"]
    out = {"value": value, "ci_low": bounds["ci_low"], "ci_high": bounds["ci_high"], "p": bounds["p"],
           "undefined": undefined, "note": ""}
    if not undefined:  # scipy's own percentile bounds (interpolated between draws)
        out["ci_low"], out["ci_high"] = float(res.confidence_interval.low), float(res.confidence_interval.high)
        return out
    sides = [side for side, bound in (("lower", out["ci_low"]), ("upper", out["ci_high"])) if math.isinf(bound)]
    out["note"] = (f"{undefined} of {n_resamples} draws with |CPT - base| below the threshold, kept: "
                   f"{bounds['plus_inf']} at +inf, {bounds['minus_inf']} at -inf, {bounds['no_sign']} 0/0 at both ends"
                   + (f"; {' and '.join(sides)} side unbounded (more than {MAX_UNDEFINED:.1%} of draws there)"
                      if sides else ""))
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


def clopper_pearson(k: int, n: int) -> Tuple[Optional[float], Optional[float]]:
    """Exact (Clopper–Pearson) 95% interval of a proportion k/n (scipy.stats.binomtest)."""
    from scipy import stats

    if not n:
        return None, None
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return float(ci.low), float(ci.high)


def retention_counts(metrics: Dict) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    """(learned_kept, learned = learned_kept + learned_lost, sft_only) from a job's transitions (by contains)."""
    kept, lost = metrics.get("transitions/learned_kept"), metrics.get("transitions/learned_lost")
    if kept is None or lost is None:
        return None, None, metrics.get("transitions/sft_only")
    return int(kept), int(kept) + int(lost), metrics.get("transitions/sft_only")


def model_id(job: dict) -> str:
    """What identifies the job's evaluated SFT-side model: its SFT stage key, else its chat-vector key (no SFT), else
    the job. Jobs with one id are one model, however their seeds differ."""
    m = job["metrics"]
    return m.get("key/sft") or m.get("key/chat_vector") or f"job {job['job']}"


def _model_kind(job: dict) -> str:
    return "chat-vector model" if "key/chat_vector" in job["metrics"] and "key/sft" not in job["metrics"] \
        else "SFT run"


def _runs(n: int, what: str) -> str:
    return f"one {what}" if n == 1 else f"{n} {what}s"


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
    if isinstance(v, float) and math.isinf(v):
        return ("+" if signed else "") + "inf" if v > 0 else "-inf"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _question_interval(job: dict, name: str) -> Optional[Dict]:
    """bootstrap_interval of statistic `name` over the questions of one job's answers.jsonl (None without them)."""
    import numpy as np

    answers = read_answers(job)
    if not answers or not all(set(MODEL_NAMES) <= set(a) for a in answers):
        return None
    arrays = _score_arrays([answers], [a["id"] for a in answers], [name])
    try:
        _check_available(arrays, name)
    except PipelineError:
        return None
    thresholds = gain_thresholds(job["metrics"])
    return bootstrap_interval([np.arange(len(answers))],
                              lambda q, axis=-1: _per_seed(arrays, name, thresholds, q)[0])


def cells_table(jobs: List[dict], keys: List[str]):
    """Per grid cell: each statistic of cell_statistics with its 95% interval, retention and sft_only.

    One model in the cell (one seed, or seeds that do not reach the model): the paired bootstrap over questions
    (bootstrap_interval), retention = learned_kept / learned with its Clopper–Pearson interval. Several distinct
    models: the mean of their values (metrics.json) with a t-interval, for any number of them: a percentile bootstrap
    of n values is narrower than the t-interval by about z/t(n−1)·√((n−1)/n), 0.63 at 5 and 0.87 at 20, so it would
    understate the spread at the seed counts sweeps use. A model whose value is undefined makes the cell's value
    undefined (averaging the others would keep only the seeds where CPT happened to gain enough). `covers` says what
    the interval covers."""
    import numpy as np
    import pandas as pd

    headline = headline_metric(jobs)
    names = cell_statistics(headline)
    cells, cell_keys = _group_cells(jobs, keys)
    rows = []
    for cell, members in cells.items():
        models: Dict[str, dict] = {}
        for m in members:
            models.setdefault(model_id(m), m)
        first = members[0]
        n_cpt = len({m["metrics"].get("key/merge") or m["job"] for m in models.values()})
        n_q = first["metrics"].get("n_questions")
        questions = f"these {n_q} questions" if n_q else "these questions"
        seeds = [_seed(m) for m in members]
        row = {**dict(zip(cell_keys, cell)), "n_models": len(models), "n_jobs": len(members),
               "seeds": ",".join(map(str, seeds)), "jobs": ",".join(m["job"] for m in members)}
        counts = [retention_counts(m["metrics"]) for m in models.values()]
        if len(models) > 1:
            row["interval"] = f"t over {len(models)} models"
            row["covers"] = (f"{'CPT and SFT seeds' if n_cpt > 1 else 'SFT seeds'} ({len(models)} "
                             f"{_model_kind(first)}s), {_runs(n_cpt, 'CPT run')}, {questions} fixed")
            per_model = {name: [m["metrics"].get(name) for m in models.values()] for name in names}
            per_model["retention"] = [None if n in (None, 0) else k / n for k, n, _ in counts]
            per_model["sft_only"] = [o for _, _, o in counts]
            for name, vals in per_model.items():
                if n_cpt == 1 and name.startswith("cpt/"):  # one CPT model: its seeds' spread is 0 by construction
                    res = _question_interval(first, name)
                    if res:
                        row[name], row[f"{name} ci_low"], row[f"{name} ci_high"] = (res["value"], res["ci_low"],
                                                                                   res["ci_high"])
                        row[f"{name} undefined"] = res["undefined"]
                        row[f"{name} note"] = f"one CPT run: over {questions} (resampled)"
                        continue
                row[f"{name} per_model"] = ", ".join(fmt(v) for v in vals)
                undefined = sum(v is None for v in vals)
                row[f"{name} undefined"] = undefined
                if undefined:
                    row[name], row[f"{name} ci_low"], row[f"{name} ci_high"] = None, None, None
                    row[f"{name} note"] = f"undefined for {undefined} of {len(vals)} models"
                    continue
                row[name] = float(np.mean(vals))
                row[f"{name} ci_low"], row[f"{name} ci_high"] = t_interval(vals)
                row[f"{name} note"] = ""
        else:
            kept, learned, sft_only = counts[0]
            row["retention"], row["sft_only"] = (kept / learned if learned else None), sft_only
            row["retention ci_low"], row["retention ci_high"] = clopper_pearson(kept or 0, learned or 0)
            row["retention note"] = (f"Clopper-Pearson over the {learned} questions CPT taught" if learned
                                     else "CPT taught no question")
            answers = read_answers(first)
            if not answers or not all(set(MODEL_NAMES) <= set(a) for a in answers):
                row["interval"], row["covers"] = "none (answers.jsonl lacks a model)", "-"
                for name in names:
                    row[name] = first["metrics"].get(name)
                rows.append(row)
                continue
            arrays = _score_arrays([answers], [a["id"] for a in answers], names)
            thresholds = gain_thresholds(first["metrics"])
            row["interval"] = f"paired bootstrap over {len(answers)} questions, {N_RESAMPLES} draws"
            row["covers"] = (f"{questions} (resampled), one CPT run, one {_model_kind(first)}"
                             + (f" ({len(members)} jobs whose seeds do not reach it)" if len(members) > 1 else ""))
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
    interval then covers the choice of questions, not the training noise between seeds (`covers` says so; cells.csv
    has the seeds' spread). Seeds only one cell ran are left out and named (`unpaired`). Where both cells' SFT models
    sit on the same CPT model (equal base and CPT scores per seed), gain_kept's difference is one ratio,
    (SFT_A − SFT_B) ÷ (CPT − base), whose draws below the threshold go to ±∞ by its sign (ratio).
    Returns a, b, difference, ci_low, ci_high, p (bootstrap p-value for 0), undefined (draws), sd_per_question (of
    the seed-averaged per-question difference; share metrics only), n_questions, seeds, unpaired, resampled, covers
    and note."""
    import numpy as np

    kind, name = _parse_statistic(metric)
    by_seed_a = {_seed(j): j for j in jobs_a if j["status"] == "ok"}
    by_seed_b = {_seed(j): j for j in jobs_b if j["status"] == "ok"}
    seeds = [s for s in by_seed_a if s in by_seed_b]
    unpaired = "; ".join(f"only {side}: {', '.join(map(str, only))}" for side, only in (
        ("A", [s for s in by_seed_a if s not in by_seed_b]), ("B", [s for s in by_seed_b if s not in by_seed_a]))
        if only)
    if not seeds:
        raise PipelineError(f"paired difference of {metric}: the two cells have no evaluated seed in common "
                            f"({unpaired})")
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
    shared_cpt = kind == "gain_kept" and thr_a == thr_b and all(
        np.array_equal(arr_a[m][name], arr_b[m][name]) for m in ("base", "cpt"))

    def per_seed_diff(q):  # shape (n_seeds, ...)
        if shared_cpt:
            def mean(arr, model):
                return arr[model][name][:, q].mean(-1)
            base = mean(arr_a, "base")
            return ratio(mean(arr_a, "sft") - mean(arr_b, "sft"), mean(arr_a, "cpt") - base,
                         gain_threshold(name, *thr_a)[0])
        with np.errstate(invalid="ignore"):
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
    sd = None
    if kind in MODEL_NAMES and len(qids) > 1:  # the per-question paired difference, averaged over the seeds
        sd = float((arr_a[kind][name] - arr_b[kind][name]).mean(0).std(ddof=1))
    n_models = len({model_id(j) for j in by_seed_a.values()}), len({model_id(j) for j in by_seed_b.values()})
    fixed = "" if resample_seeds else f", seeds {', '.join(map(str, seeds))} held fixed"
    covers = (f"these {len(qids)} questions (resampled){' and the seeds (resampled)' if resample_seeds else ''}"
              f"{fixed}; {n_models[0]} vs {n_models[1]} distinct models")
    note = "; ".join(x for x in (res["note"], f"unpaired seeds left out ({unpaired})" if unpaired else "") if x)
    return {"metric": metric, "a": a if math.isfinite(a) else None, "b": b if math.isfinite(b) else None,
            "difference": res["value"], "ci_low": res["ci_low"], "ci_high": res["ci_high"], "p": res["p"],
            "undefined": res["undefined"], "n_resamples": n_resamples, "sd_per_question": sd,
            "n_questions": len(qids), "seeds": ",".join(map(str, seeds)), "unpaired": unpaired,
            "resampled": "seeds and questions" if resample_seeds else "questions (seeds fixed)", "covers": covers,
            "note": note}


def holm(pvalues: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjustment of a family of p-values (None: not part of the family). The i-th smallest of k is
    multiplied by k − i + 1, then made non-decreasing. Written out: scipy has only Benjamini–Hochberg
    (false_discovery_control), and statsmodels' multipletests would add a large dependency for these lines."""
    family = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    out: List[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(family):
        running = max(running, min(1.0, (len(family) - rank) * p))
        out[i] = running
    return out


def minimum_detectable_difference(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true difference a two-sided test at `alpha` detects with probability `power`, for a mean of n
    paired per-question differences with standard deviation `sd`: (z(1 − α/2) + z(power)) · sd / √n."""
    from scipy import stats

    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * sd / math.sqrt(n))


def questions_needed(sd: float, difference: float, alpha: float = ALPHA, power: float = POWER) -> int:
    """How many questions make `difference` detectable (minimum_detectable_difference solved for n)."""
    from scipy import stats

    return math.ceil(((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * sd / difference) ** 2)


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
    paired_difference of sft/<headline> and gain_kept/<headline>, each metric's k comparisons one Holm family
    (`p_holm`, `family`, `verdict`). Returns (table, summary for results.md: best vs baseline, and the power of this
    QA set from the per-question spread of the sft/<headline> differences)."""
    import numpy as np
    import pandas as pd

    headline = headline_metric(jobs)
    cells, cell_keys = _group_cells(jobs, keys)
    if len(cells) < 2:
        return pd.DataFrame(), None
    base_cell = find_cell(cells, cell_keys, baseline) if baseline else next(iter(cells))
    metrics = list(dict.fromkeys([f"sft/{headline}", f"gain_kept/{headline}"]))
    rows = []
    for cell, members in cells.items():
        if cell == base_cell:
            continue
        for metric in metrics:
            try:
                d = paired_difference(members, cells[base_cell], metric)
            except PipelineError as e:
                d = {"metric": metric, "note": str(e)}
            rows.append({**dict(zip(cell_keys, cell)), **d})
    for metric in metrics:
        family = [r for r in rows if r["metric"] == metric]
        for r, p in zip(family, holm([r.get("p") for r in family])):
            r["p_holm"] = p
            r["family"] = (f"{len(family)} cells vs {_cell_label(cell_keys, base_cell)} in {metric}"
                           if p is not None else "")
            r["verdict"] = ("-" if p is None else "differs (Holm, 5%)" if p < ALPHA
                            else "no measurable difference")
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
    family = [r for r in rows if r["metric"] == f"sft/{headline}"]
    # the spread of the comparisons that differ at all (a cell identical to the baseline has none); Holm's first
    # step divides by the whole family, as the verdicts do
    sds = [r["sd_per_question"] for r in family if r.get("sd_per_question")]
    if sds:
        sd, n, k = float(np.median(sds)), int(rows[0]["n_questions"]), len(family)
        summary["power"] = {
            "metric": f"sft/{headline}", "sd_per_question": sd, "n_questions": n, "k": k, "n_sd": len(sds),
            "mdd": minimum_detectable_difference(sd, n), "mdd_holm": minimum_detectable_difference(sd, n, ALPHA / k),
            "needed": {delta: (questions_needed(sd, delta), questions_needed(sd, delta, ALPHA / k))
                       for delta in (0.05, 0.10)}}
    return df, summary

