"""A sweep's tables: the jobs read from their directories, results.csv (one row per job), answers.md and the text
of results.md (the tables, the intervals of pipeline/sweep/stats.py, a legend of every column)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from pipeline.core.config import EvalConfig
from pipeline.stages.eval import MODEL_NAMES
from pipeline.sweep.stats import (ALPHA, MAX_UNDEFINED, MIN_SEEDS_TO_RESAMPLE, N_RESAMPLES, POWER, QA_METRICS,
                                  clopper_pearson, fmt, gain_thresholds, headline_metric, parse_value, read_answers,
                                  retention_counts)

GENERAL_METRICS = [f"general_{m}" for m in QA_METRICS]
# Per-model columns of results.csv (the row's model), when present; results.md leaves out the rarer ones.
MODEL_COLUMNS = [*QA_METRICS, "judge", "eos_rate", "format_rate", "answer_chars", *GENERAL_METRICS, "heldout_ppl"]


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
                overrides[key] = parse_value(val)
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
    out = {name: m.get(f"{model}/{name}") for name in MODEL_COLUMNS}
    out.update({k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(f"{model}/") and "@" in k})
    return out


def _gain_columns(m: Dict, names: Sequence[str], kind: str) -> Dict:
    return {f"{kind}/{n}": m.get(f"{kind}/{n}") for n in names}


def results_table(jobs: List[dict]):
    """One row per job's SFT model, after reference rows for the base model and each distinct CPT model."""
    import pandas as pd

    keys = swept_keys(jobs)
    headline = headline_metric(jobs)
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
        min_gain, min_logprob_gain = gain_thresholds(m) if m else (None, None)
        rows.append({"row": "sft", "job": j["job"], "status": j["status"],
                     **{k: j["overrides"].get(k) for k in keys}, **_model_metrics(m, "sft"),
                     **_gain_columns(m, gains, "cpt_gain"), **_gain_columns(m, gains, "gain_kept"),
                     **_gain_columns(m, gains, "gain_kept_reason"),
                     "eval.min_gain": min_gain, "eval.min_logprob_gain": min_logprob_gain,
                     **{k: v for k, v in m.items() if k.startswith("transitions/")},
                     **_retention(m),
                     # what a lever changed, beside its result (docs/levers.md): alpha alone is not comparable
                     # across ranks, the scale is
                     **{k: m.get(k) for k in LEVER_COLUMNS if k in m},
                     "stage/cpt": m.get("stage/cpt"), "error": j["error"]})
    df = pd.DataFrame(rows)
    present = set().union(*(j["metrics"] for j in jobs))

    def computed(c):  # a metric no job computed (no judge, no general QA set) gets no column; an empty value does
        if c.startswith(("cpt_gain/", "gain_kept", "transitions/")):
            return c in present
        if c.startswith("retention"):
            return "transitions/learned_kept" in present
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


# What a lever did, beside its result: the adapters' scales, the replayed share, how long SFT trained and which
# checkpoint early stopping kept, and how many records of a lever's QA file ask about scored facts.
LEVER_COLUMNS = ("cpt/lora_scale", "sft/lora_scale", "sft/replay_share", "sft/steps", "sft/best_checkpoint_step",
                 "leak/cpt_qa_shared_facts", "leak/dev_qa_shared_facts")


def _retention(m: Dict) -> Dict:
    """retention = learned_kept / learned (by contains) with its Clopper–Pearson interval; nothing without
    transitions."""
    kept, learned, _ = retention_counts(m)
    if learned is None:
        return {}
    low, high = clopper_pearson(kept, learned)
    return {"retention": kept / learned if learned else None, "retention ci_low": low, "retention ci_high": high}


def _md_columns(df, keys: List[str]) -> List[str]:
    """results.md shows the main columns; reasons, thresholds, groups and transitions are in results.csv (and the
    reasons and thresholds in the text under the table)."""
    hidden = ("gain_kept_reason/", "transitions/", "eval.min_", "retention ci_")
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
        "format_rate": "the SFT model: share of answers in the expected format (eval.expected_format; unset: "
                       "non-empty, ended with EOS, not repetitive)",
        "answer_chars": "the row's model: mean length of its answers in characters (after the cut to the first line)",
        "retention": "learned_kept ÷ (learned_kept + learned_lost): the share of the questions CPT taught "
                     "(contains 0 → 1) that the SFT model still answers",
        "retention ci_low": "lower end of retention's exact (Clopper–Pearson) 95% interval over the questions CPT "
                            "taught (one CPT run, one SFT run)",
        "retention ci_high": "upper end of the same interval",
        "sft/steps": "optimizer steps SFT ran (fewer than planned when early stopping ended it)",
        "sft/best_checkpoint_step": "the step of the checkpoint early stopping kept (lowest dev loss)",
        "leak/cpt_qa_shared_facts": "records of data.cpt_qa.path that ask about a scored fact (same normalised answer, "
                                    "similar question): the lever's result is partly practice on the scored facts",
        "leak/dev_qa_shared_facts": "records of data.dev_qa.path that ask about a scored fact: early stopping then "
                                    "chooses its checkpoint partly on the scored answers",
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




def _format_cells(df, cell_keys, headline: str) -> str:
    """The markdown of cells.csv: `value [low, high]` per statistic, each model's value where there are few, and
    what the interval covers."""
    shown = [f"sft/{headline}", f"gain_kept/{headline}", "gain_kept/logprob", f"cpt/{headline}", "retention",
             "sft_only"]
    shown = [s for s in dict.fromkeys(shown) if s in df]
    out = df[cell_keys + ["n_models", "covers"]].copy()
    for name in shown:
        cells = []
        for r in df.to_dict("records"):
            text = fmt(r.get(name))
            if r.get(f"{name} ci_low") is not None and not _isnan(r.get(f"{name} ci_low")):
                text += f" [{fmt(r[f'{name} ci_low'])}, {fmt(r[f'{name} ci_high'])}]"
            if 1 < r["n_models"] < MIN_SEEDS_TO_RESAMPLE and isinstance(r.get(f"{name} per_model"), str):
                text += f" ({r[f'{name} per_model']})"
            if isinstance(r.get(f"{name} note"), str) and r[f"{name} note"] and name != "retention":
                text += f" ({r[f'{name} note']})"
            cells.append(text)
        out[name] = cells
    return out.to_markdown(index=False)


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)




def _interval(r: Dict) -> str:
    if r.get("ci_low") is None or _isnan(r.get("ci_low")):
        return r.get("note") or "-"
    return f"[{fmt(r['ci_low'], True)}, {fmt(r['ci_high'], True)}]"


def _format_best_vs_baseline(summary: Dict) -> List[str]:
    h = summary["headline"]
    lines = ["## Best vs baseline", "",
             f"Baseline: {summary['baseline']} ({summary['baseline_how']}). Best: the cell with the highest "
             f"sft/{h} (mean over seeds): {summary['best']}.", ""]
    if not summary["rows"]:
        return lines + ["The baseline is the best cell. differences.csv lists every cell against it.", ""]
    table = ["| statistic | best | baseline | best − baseline | 95% interval | Holm p | undefined draws | covers |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        table.append(f"| {r['metric']} | {fmt(r.get('a'))} | {fmt(r.get('b'))} | {fmt(r.get('difference'), True)} "
                     f"| {_interval(r)} | {fmt(r.get('p_holm'))} | {r.get('undefined', '-')} | "
                     f"{r.get('covers') or r.get('note', '')} |")
    return lines + table + ["", "The difference is the mean over seeds of (best − baseline), question by question "
                            "for the same questions and seeds; an interval that excludes 0 says the difference is "
                            "larger than the choice of questions explains. differences.csv lists every cell.", ""]


def _format_differences(diffs, cell_keys: List[str]) -> List[str]:
    """Every cell minus the baseline, both metrics, with the 95% interval, the Holm-adjusted p-value over the family
    and the verdict."""
    if diffs is None or diffs.empty or "difference" not in diffs:
        return []
    lines = ["## Every cell vs the baseline", "",
             "Paired over the same questions and seeds (differences.csv). Each metric's comparisons are one family: "
             "`Holm p` is the bootstrap p-value for 0, Holm-adjusted over the family; a cell \"differs\" when it "
             f"is below {ALPHA:g}, and otherwise shows no measurable difference.", "",
             "| " + " | ".join(cell_keys) + " | metric | difference | 95% interval | Holm p | verdict | family |",
             "|" + "---|" * (len(cell_keys) + 6)]
    for r in diffs.to_dict("records"):
        lines.append("| " + " | ".join(str(r.get(k)) for k in cell_keys) + f" | {r['metric']} | "
                     f"{fmt(r.get('difference'), True)} | {_interval(r)} | {fmt(r.get('p_holm'))} | "
                     f"{r.get('verdict') or '-'} | {r.get('family') or '-'} |")
    return lines + [""]


def _format_power(power: Optional[Dict]) -> List[str]:
    if not power:
        return []
    (n05, n05h), (n10, n10h) = power["needed"][0.05], power["needed"][0.10]
    return ["## What this QA set can detect", "",
            f"The per-question standard deviation of a paired difference in {power['metric']} (each question's "
            f"difference averaged over the paired seeds; the median over the {power['n_sd']} "
            f"comparisons with the baseline that differ from it at all) is {power['sd_per_question']:.3f}. With these {power['n_questions']} questions the smallest "
            f"difference detectable with {POWER:.0%} power is {power['mdd']:.3f} (two-sided {ALPHA:g}), and "
            f"{power['mdd_holm']:.3f} at Holm's first step over {power['k']} comparisons ({ALPHA:g}/{power['k']}). "
            f"A difference of 0.05 needs {n05} questions ({n05h} with Holm over {power['k']}), 0.10 needs {n10} "
            f"({n10h}). Formula: (z(1 − α/2) + z(power)) · sd / √n.", ""]


def _format_leaks(df) -> List[str]:
    cols = [c for c in ("leak/cpt_qa_shared_facts", "leak/dev_qa_shared_facts") if c in df]
    lines = []
    for c in cols:
        hit = df[(df["row"] == "sft") & (df[c].fillna(0) > 0)]
        if not hit.empty:
            counts = sorted({int(x) for x in hit[c]})
            lines.append(f"- {c.split('/')[1].replace('_shared_facts', '')}: jobs {', '.join(map(str, hit['job']))} "
                         f"use a file asking about {', '.join(map(str, counts))} scored facts")
    if not lines:
        return []
    return ["## Leak check", "",
            "QA files these jobs trained or stopped on ask about facts of the scored QA set (same answer after the "
            "scorer's normalisation, similar question; the check can over-report, see pipeline/core/mixing.py). "
            "Their results are partly practice on the scored facts:", "", *lines, ""]


def answer_sheet(jobs: List[dict], keys: List[str], path: Path) -> None:
    """Per question: gold, base, each distinct CPT model's and each cell's SFT answer, side by side."""
    ok = [j for j in jobs if j["status"] == "ok" and (j["dir"] / "answers.jsonl").is_file()]
    if not ok:
        path.write_text("# Answers\n\nNo job finished its evaluation.\n", encoding="utf-8")
        return
    per_job = {j["job"]: {a["id"]: a for a in read_answers(j)} for j in ok}

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




def _threshold_text(jobs: List[dict]) -> str:
    pairs = sorted({gain_thresholds(j["metrics"]) for j in jobs if j["metrics"]})
    if not pairs:
        pairs = [(EvalConfig.min_gain, EvalConfig.min_logprob_gain)]
    return "; ".join(f"eval.min_gain {g:g}, eval.min_logprob_gain {lg:g} nats for logprob" for g, lg in pairs)


def results_markdown(sweep_dir: Path, jobs: List[dict], df, keys: List[str], cells, cell_keys,
                     summary: Optional[Dict], diffs=None) -> str:
    n_ok = sum(j["status"] == "ok" for j in jobs)
    headline = headline_metric(jobs)
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
    md += ["", *_format_leaks(df)]
    if not cells.empty:
        md += ["", "## Per grid cell: value and 95% interval", "",
               "`n_models` counts distinct models (jobs whose seeds do not reach their model are one), and `covers` "
               "says what each interval covers. One model: paired bootstrap over questions (each draw resamples the "
               f"questions once for all three models; {N_RESAMPLES} draws, percentile); retention with its exact "
               "(Clopper–Pearson) interval over the questions CPT taught. Several models: the mean of their values "
               f"with a t-interval; each model's value in parentheses when there are fewer than "
               f"{MIN_SEEDS_TO_RESAMPLE}; `cpt/` statistics of a cell on one CPT run stay over the questions. A gain_kept draw whose |CPT − base| is below the threshold is kept at ±inf "
               f"by the ratio's sign, and a side of its interval is unbounded (inf) when more than {MAX_UNDEFINED:.1%} "
               "of the draws lie there. `sft_only`: questions only the SFT model answers. All statistics in "
               "cells.csv.", "", _format_cells(cells, cell_keys, headline)]
    if summary:
        md += ["", *_format_best_vs_baseline(summary), *_format_differences(diffs, cell_keys),
               *_format_power(summary.get("power"))]
    md += ["", "## Columns", "", *legend(shown + [c for c in df.columns if c not in shown], keys, thresholds)]
    return "\n".join(md) + "\n"

