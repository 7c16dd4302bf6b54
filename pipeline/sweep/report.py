"""report.html: a sweep's results in one self-contained page (written by pipeline.aggregate with the other files).

    python -m pipeline.aggregate outputs/sweeps/<time>     # writes it (a multirun does so when it ends)
    open outputs/sweeps/<time>/report.html                  # any browser, from file://, offline

It holds the results table, the heatmaps (embedded as data: URIs) and a per-question view: the gold answer next to
the base model's, every distinct CPT model's and every job's SFT answer, an answer that contains the gold answer in
green, and a checkbox that keeps only the questions CPT taught and SFT lost (`transition` = learned_lost in a job's
answers.jsonl). No script and no external file: the filter is CSS, so the page works with scripts off, from a mail
attachment or a shared drive. The layout is the Jinja template pipeline/sweep/templates/report.html.j2.
"""

from __future__ import annotations

import base64
import json
import math
import numbers
from pathlib import Path
from typing import Dict, List, Optional, Sequence

TEMPLATE = "report.html.j2"


def _text(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _results(df) -> Dict:
    """The results table as header + rows of (text, css class); per-group and reason columns stay in results.csv."""
    cols = [c for c in df.columns if "@" not in c and not c.startswith("gain_kept_reason/")]
    rows = []
    for r in df[cols].to_dict("records"):
        kind = r.get("status") if r.get("status") in ("failed", "incomplete") else (
            "reference" if r.get("status") == "reference" else "ok")
        rows.append({"kind": kind, "cells": [
            {"text": _text(r[c]), "cls": "num" if isinstance(r[c], numbers.Real) and not isinstance(r[c], bool)
             else ""} for c in cols]})
    return {"header": cols, "rows": rows}


def _read_answers(job: dict) -> Optional[Dict[str, dict]]:
    path = Path(job["dir"]) / "answers.jsonl"
    if job.get("status") != "ok" or not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    return {a["id"]: a for a in map(json.loads, filter(None, lines))}


def _answers(jobs: List[dict], keys: Sequence[str]) -> Dict:
    """Columns (base, each distinct CPT model, each job's SFT model) and one row per question."""
    per_job = {j["job"]: a for j in jobs if (a := _read_answers(j)) is not None}
    ok = [j for j in jobs if j["job"] in per_job]
    if not ok:
        return {"columns": [], "questions": [], "n_lost": 0}
    cpt_keys = [k for k in keys if not k.startswith(("sft.", "eval."))]

    def label(j, ks):
        return [f"{k}={j['overrides'].get(k)}" for k in ks] or [f"job {j['job']}"]

    columns = [{"model": "base", "label": [], "job": ok[0]["job"], "kind": "base", "n_lost": None}]
    seen = set()
    for j in ok:  # one CPT model per distinct merge key, however many jobs share it
        key = j["metrics"].get("key/merge") or tuple(label(j, cpt_keys))
        if key not in seen:
            seen.add(key)
            columns.append({"model": "cpt", "label": label(j, cpt_keys), "job": j["job"], "kind": "cpt",
                            "n_lost": None})
    for j in ok:
        n_lost = sum(a.get("transition") == "learned_lost" for a in per_job[j["job"]].values())
        columns.append({"model": f"sft (job {j['job']})", "label": label(j, keys), "job": j["job"], "kind": "sft",
                        "n_lost": n_lost})

    questions = []
    for qid in dict.fromkeys(q for j in ok for q in per_job[j["job"]]):
        first = next(per_job[j["job"]][qid] for j in ok if qid in per_job[j["job"]])
        cells = []
        for col in columns:
            a = per_job[col["job"]].get(qid) or {}
            scored = a.get(col["kind"])
            if not scored:
                cells.append({"text": "", "cls": ""})
                continue
            cls = ["hit"] if scored.get("contains") == 1 else []
            if col["kind"] == "sft" and a.get("transition") == "learned_lost":
                cls.append("lost")
            cells.append({"text": scored.get("answer", "") or "(empty)", "cls": " ".join(cls)})
        lost = any(per_job[j["job"]].get(qid, {}).get("transition") == "learned_lost" for j in ok)
        questions.append({"id": qid, "question": first.get("question", ""), "gold": first.get("gold", ""),
                          "aliases": first.get("aliases") or [], "answers": cells, "lost": lost})
    return {"columns": [{k: c[k] for k in ("model", "label", "n_lost")} for c in columns], "questions": questions,
            "n_lost": sum(q["lost"] for q in questions)}


def _search(sweep_dir: Path) -> Optional[Dict]:
    """A search's front, plot and confirmation (pipeline/sweep/pareto.py wrote them); None for a plain sweep."""
    from pipeline.sweep.pareto import report_section

    section = report_section(sweep_dir)
    if section is None:
        return None
    conf = section["confirmation"]
    return {"summary": section["summary"], "front": _results(section["front"]), "failed": section["failed"],
            "plot": _data_uri(section["plot"]) if section["plot"] else None,
            "confirmation": _results(conf) if conf is not None else None}


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_report(sweep_dir: str | Path, jobs: List[dict], table_df, keys: Sequence[str],
                 heatmap_paths: Sequence[str | Path]) -> Path:
    """Write `sweep_dir`/report.html from the sweep's jobs (pipeline.sweep.tables.read_jobs), its results table and
    swept keys (results_table) and its heatmap PNGs; returns the file's path."""
    import jinja2

    sweep_dir = Path(sweep_dir)
    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline.sweep", "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)  # answers may hold < and &
    n_ok = sum(j.get("status") == "ok" for j in jobs)
    headline = next((j["metrics"].get("headline_metric") for j in jobs if j.get("metrics", {}).get("headline_metric")),
                    "contains")
    summary = (f"{len(jobs)} jobs: {n_ok} ok, {len(jobs) - n_ok} failed or incomplete. Swept: "
               f"{', '.join(keys) or '-'}. Headline metric: {headline}.")
    html = env.get_template(TEMPLATE).render(
        name=sweep_dir.name, summary=summary, table=_results(table_df), search=_search(sweep_dir),
        results_md=(sweep_dir / "results.md").is_file(),
        heatmaps=[{"name": Path(p).stem, "uri": _data_uri(Path(p))} for p in heatmap_paths if Path(p).is_file()],
        answers=_answers(jobs, keys))
    path = sweep_dir / "report.html"
    path.write_text(html, encoding="utf-8")
    return path
