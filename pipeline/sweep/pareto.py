"""A search's results: the Pareto front of its trials, tables, the plot, the confirmation reruns and their intervals.

    python -m pipeline.sweep.pareto outputs/searches/lever_search          # rewrite the files from the study
    python -m pipeline.sweep.pareto SEARCH_DIR --reference docs/levers/results.csv --out docs/search/front.png

The search (pipeline/sweep/search.py) calls write_outputs when it ends; everything here works on plain trial records
(dicts), so the front can be checked on hand-built points. A trial record:

    {"trial": 3, "job": "3", "state": "COMPLETE" | "FAIL" | ..., "params": {"sft.kl_weight": 0.3, ...},
     "values": {"sft/contains": 0.12, ...}, "constraints": {"sft/format_rate": 0.98}, "feasible": True,
     "error": None, "stage/cpt": "built", "stage/sft": "built"}

Written into the search directory: trials.csv (every trial), pareto_front.csv / pareto_front.md (the feasible,
non-dominated trials with their settings; the .md also counts the compute and holds the confirmation), pareto.png
(all trials, the front highlighted) and confirmation.csv (each front point rerun over sft.seed values, t-intervals).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

Objective = Tuple[str, str]             # (metric, "maximize" | "minimize")
Constraint = Tuple[str, str, float]     # (metric, ">=" | "<=", threshold)


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """a is at least as good as b in every objective and better in one."""
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    better_or_equal = all(s * x >= s * y for s, x, y in zip(signs, a, b))
    return better_or_equal and any(s * x > s * y for s, x, y in zip(signs, a, b))


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> List[int]:
    """Indices of the points no other point dominates (duplicates of a front point are all on it)."""
    return [i for i, p in enumerate(points)
            if not any(dominates(q, p, directions) for j, q in enumerate(points) if j != i)]


def violation(value: float, op: str, threshold: float) -> float:
    """Optuna's convention: <= 0 is feasible, and the size says by how much a constraint is missed."""
    return threshold - value if op == ">=" else value - threshold


def mark_front(trials: List[dict], objectives: Sequence[Objective]) -> List[dict]:
    """Set trial["on_front"]: complete, feasible and not dominated by another complete, feasible trial."""
    names, directions = [m for m, _ in objectives], [d for _, d in objectives]
    eligible = [t for t in trials if t["state"] == "COMPLETE" and t.get("feasible", True)]
    front = set(pareto_front([[t["values"][m] for m in names] for t in eligible], directions))
    on = {id(t) for i, t in enumerate(eligible) if i in front}
    for t in trials:
        t["on_front"] = id(t) in on
    return trials


# ---------------------------------------------------------------------------------------------------------- tables

def trials_table(trials: List[dict], objectives: Sequence[Objective], constraints: Sequence[Constraint]):
    """One row per trial: its settings, objectives, constraint metrics, feasibility, front membership, what it
    built, and its error. Front rows first (by the first objective, best first), then the rest by trial number."""
    import pandas as pd

    params = list(dict.fromkeys(k for t in trials for k in t.get("params", {})))
    rows = []
    for t in trials:
        rows.append({"trial": t["trial"], "job": t.get("job"), "state": t["state"],
                     **{k: t.get("params", {}).get(k) for k in params},
                     **{m: t.get("values", {}).get(m) for m, _ in objectives},
                     **{m: t.get("constraints", {}).get(m) for m, _, _ in constraints},
                     "feasible": t.get("feasible") if t["state"] == "COMPLETE" else None,
                     "on_front": bool(t.get("on_front")), "stage/cpt": t.get("stage/cpt"),
                     "stage/sft": t.get("stage/sft"), "error": t.get("error")})
    df = pd.DataFrame(rows, columns=["trial", "job", "state", *params, *[m for m, _ in objectives],
                                     *[m for m, _, _ in constraints if m not in dict(objectives)], "feasible",
                                     "on_front", "stage/cpt", "stage/sft", "error"])
    if df.empty:
        return df
    first, direction = objectives[0]
    score = pd.to_numeric(df[first], errors="coerce") * (1 if direction == "maximize" else -1)
    df["_front"], df["_score"] = ~df["on_front"], score.fillna(-math.inf)
    df = df.sort_values(["_front", "_score", "trial"], ascending=[True, False, True], kind="stable")
    return df.drop(columns=["_front", "_score"]).reset_index(drop=True)


def compute_counts(jobs: List[dict]) -> Dict[str, int]:
    """What the jobs trained, from their metrics.json: CPT and SFT stages built (trained here) or reused (from the
    stage cache), and their seconds. jobs: [{"metrics": {...}}] as pipeline.aggregate.read_jobs gives them."""
    out = {"cpt_built": 0, "cpt_reused": 0, "sft_built": 0, "sft_reused": 0, "cpt_seconds": 0.0,
           "sft_seconds": 0.0, "jobs": len(jobs)}
    for j in jobs:
        m = j.get("metrics") or {}
        for stage in ("cpt", "sft"):
            status = m.get(f"stage/{stage}")
            if status in ("built", "reused"):
                out[f"{stage}_{status}"] += 1
            if status == "built":
                out[f"{stage}_seconds"] += float(m.get(f"time/{stage}") or 0.0)
    return out


def confirmation_table(front: List[dict], runs: Dict[Tuple[int, int], Optional[dict]],
                       objectives: Sequence[Objective], seeds: Sequence[int]):
    """Per front trial and objective: the search's own value, then the mean over the confirmation seeds with a 95%
    t-interval (each seed's value listed). runs[(trial, seed)] is that rerun's metrics.json (None: it failed).

    The search picked its front on these very questions, so the search's own values are biased upwards by the
    choice; the reruns with fresh SFT seeds are the numbers to quote."""
    import numpy as np
    import pandas as pd
    from scipy import stats

    rows = []
    for t in front:
        for metric, _ in objectives:
            vals = [runs[(t["trial"], s)].get(metric) for s in seeds if runs.get((t["trial"], s))]
            vals = [float(v) for v in vals if isinstance(v, (int, float))]
            row = {"trial": t["trial"], **t.get("params", {}), "metric": metric, "search": t["values"].get(metric),
                   "n_seeds": len(vals), "mean": None, "ci_low": None, "ci_high": None,
                   "seeds": ", ".join(f"{v:.3f}" for v in vals)}
            if vals:
                row["mean"] = float(np.mean(vals))
            if len(vals) >= 2:
                sem = stats.sem(vals)
                if sem > 0:
                    lo, hi = stats.t.interval(0.95, len(vals) - 1, loc=np.mean(vals), scale=sem)
                else:  # every seed gave the same value
                    lo = hi = float(np.mean(vals))
                row["ci_low"], row["ci_high"] = float(lo), float(hi)
            rows.append(row)
    return pd.DataFrame(rows)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def front_markdown(name: str, df, objectives: Sequence[Objective], constraints: Sequence[Constraint],
                   counts: Dict[str, float], confirmation=None, summary: str = "") -> str:
    """pareto_front.md: what was optimised, the compute spent, the front with each point's settings, and the
    confirmation reruns."""
    n = len(df)
    states = df["state"].value_counts().to_dict() if n else {}
    infeasible = int((df["feasible"] == False).sum()) if n else 0  # noqa: E712  (None = not complete)
    goal = ", ".join(f"{d} {m}" for m, d in objectives)
    cons = ", ".join(f"{m} {op} {t:g}" for m, op, t in constraints) or "none"
    md = [f"# Search {name}", "",
          f"Objectives: {goal}. Constraints: {cons}. {n} trials: {states.get('COMPLETE', 0)} complete "
          f"({infeasible} of them infeasible), {states.get('FAIL', 0)} failed.{(' ' + summary) if summary else ''}",
          "",
          f"Compute (every job of this search directory, confirmation reruns included): CPT trained "
          f"{counts['cpt_built']} times ({counts['cpt_seconds']:.0f} s), reused {counts['cpt_reused']} times; SFT "
          f"trained {counts['sft_built']} times ({counts['sft_seconds']:.0f} s), reused {counts['sft_reused']} times.",
          "", "## Pareto front", ""]
    front = df[df["on_front"]] if n else df
    hidden = ("on_front", "error", "feasible", "state")
    cols = [c for c in df.columns if c not in hidden]
    if front.empty:
        md.append("No complete, feasible trial yet.")
    else:
        md.append(front[cols].astype(object).where(front[cols].notna(), "").to_markdown(index=False,
                                                                                         floatfmt=".4g"))
    md += ["", "A point is on the front when no other complete trial that meets every constraint is at least as "
           "good in every objective and better in one. All trials: trials.csv; the plot: pareto.png.", ""]
    if confirmation is not None and not confirmation.empty:
        md += ["## Confirmation: the front rerun over SFT seeds", "",
               "Each front point rerun with `sft.seed` = each confirmation seed (the CPT model is reused). `search` "
               "is the value the search saw, on the questions it selected the front by, so it is biased upwards; "
               "`mean [95% t-interval]` over the reruns is the number to quote.", "",
               "| trial | metric | search | mean [95% interval] | seeds |", "|---|---|---|---|---|"]
        for r in confirmation.to_dict("records"):
            ci = f" [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]" if r.get("ci_low") is not None else ""
            md.append(f"| {r['trial']} | {r['metric']} | {_fmt(r['search'])} | {_fmt(r['mean'])}{ci} | "
                      f"{r['seeds']} |")
        md.append("")
    failed = df[df["state"] == "FAIL"] if n else df
    if not failed.empty:
        md += ["## Failed trials", "", *[f"- trial {r['trial']} (job {r['job']}): {r['error']}"
                                         for r in failed.to_dict("records")], ""]
    return "\n".join(md) + "\n"


# ---------------------------------------------------------------------------------------------------------- plot

def plot(df, objectives: Sequence[Objective], path: Path, references=None, title: str = "") -> Optional[Path]:
    """pareto.png: every complete trial (infeasible ones hollow), the front joined by a line, and optional
    reference points (another sweep's jobs: a DataFrame with `label` and the objective columns). Two objectives:
    one against the other; one objective: its value per trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    done = df[df["state"] == "COMPLETE"] if not df.empty else df
    if done.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    names = [m for m, _ in objectives]
    if len(names) >= 2:
        x, y = names[0], names[1]
    else:
        x, y = "trial", names[0]
    num = lambda s: pd.to_numeric(s, errors="coerce")  # noqa: E731
    feasible = done[done["feasible"] != False]  # noqa: E712
    infeasible = done[done["feasible"] == False]  # noqa: E712
    ax.scatter(num(feasible[x]), num(feasible[y]), color="tab:blue", alpha=0.6, label="trial")
    if not infeasible.empty:
        ax.scatter(num(infeasible[x]), num(infeasible[y]), facecolors="none", edgecolors="tab:gray",
                   label="trial, constraint not met")
    front = done[done["on_front"]].copy()
    if not front.empty:
        front = front.assign(_x=num(front[x]), _y=num(front[y])).sort_values(["_x", "_y"])
        ax.plot(front["_x"], front["_y"], "-o", color="tab:red", label="Pareto front", zorder=3)
        for _, r in front.iterrows():
            ax.annotate(f"#{r['trial']}", (r["_x"], r["_y"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if references is not None and not references.empty and x in references and y in references:
        ax.scatter(num(references[x]), num(references[y]), marker="s", color="tab:green", alpha=0.7,
                   label="reference")
        # points at the same place (a lever identical to the baseline) get one label naming them all
        # and a label next to an earlier one goes above its point instead of below
        labels = references.assign(_x=num(references[x]), _y=num(references[y])).groupby(["_x", "_y"], sort=False)
        span_x = float(num(references[x]).max() - num(references[x]).min()) or 1.0
        span_y = float(num(references[y]).max() - num(references[y]).min()) or 1.0
        placed = []
        for (px, py), same in labels:
            near = any(abs(px - qx) < 0.15 * span_x and abs(py - qy) < 0.05 * span_y for qx, qy in placed)
            ax.annotate(", ".join(str(v) for v in same.get("label", [])), (px, py), textcoords="offset points",
                        xytext=(4, 5 if near else -9), fontsize=7, color="tab:green")
            placed.append((px, py))
    arrows = {m: ("↑" if d == "maximize" else "↓") for m, d in objectives}
    ax.set_xlabel(f"{x} {arrows.get(x, '')}".strip())
    ax.set_ylabel(f"{y} {arrows.get(y, '')}".strip())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------- files

def write_outputs(sweep_dir: Path, trials: List[dict], objectives: Sequence[Objective],
                  constraints: Sequence[Constraint], jobs: List[dict], confirmation=None) -> Path:
    """trials.csv, pareto_front.csv/.md, pareto.png (and confirmation.csv) in `sweep_dir`; returns the .md path."""
    sweep_dir = Path(sweep_dir)
    mark_front(trials, objectives)
    df = trials_table(trials, objectives, constraints)
    df.to_csv(sweep_dir / "trials.csv", index=False)
    df[df["on_front"]].to_csv(sweep_dir / "pareto_front.csv", index=False) if not df.empty else \
        df.to_csv(sweep_dir / "pareto_front.csv", index=False)
    if confirmation is not None and not confirmation.empty:
        confirmation.to_csv(sweep_dir / "confirmation.csv", index=False)
    plot(df, objectives, sweep_dir / "pareto.png", title=f"search {sweep_dir.name}")
    md = front_markdown(sweep_dir.name, df, objectives, constraints, compute_counts(jobs), confirmation)
    (sweep_dir / "pareto_front.md").write_text(md, encoding="utf-8")
    (sweep_dir / "search.json").write_text(json.dumps({"objectives": objectives, "constraints": constraints},
                                                      indent=1), encoding="utf-8")
    return sweep_dir / "pareto_front.md"


def report_section(sweep_dir: Path) -> Optional[dict]:
    """What report.html shows of a search (None for a plain sweep): the front table, the plot, the confirmation,
    and pareto_front.md's summary lines."""
    import pandas as pd

    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "trials.csv").is_file():
        return None
    trials = pd.read_csv(sweep_dir / "trials.csv")
    front = trials[trials["on_front"] == True].drop(columns=["on_front", "feasible", "state", "error"])  # noqa: E712
    md = (sweep_dir / "pareto_front.md").read_text(encoding="utf-8").splitlines() \
        if (sweep_dir / "pareto_front.md").is_file() else []
    confirmation = pd.read_csv(sweep_dir / "confirmation.csv") if (sweep_dir / "confirmation.csv").is_file() else None
    failed = trials[trials["state"] == "FAIL"]
    return {"summary": [line for line in md[1:5] if line.strip()], "front": front, "trials": trials,
            "failed": [f"trial {r['trial']} (job {r['job']}): {r['error']}" for r in failed.to_dict("records")],
            "plot": sweep_dir / "pareto.png" if (sweep_dir / "pareto.png").is_file() else None,
            "confirmation": confirmation}


def main(argv: List[str]) -> int:
    """Redraw a search's plot (optionally with another sweep's jobs as reference points) from its trials.csv."""
    import pandas as pd

    parser = argparse.ArgumentParser(prog="python -m pipeline.sweep.pareto", description=main.__doc__)
    parser.add_argument("search_dir", metavar="SEARCH_DIR")
    parser.add_argument("--reference", metavar="RESULTS_CSV",
                        help="a sweep's results.csv: its SFT rows as points, one per label (the mean over its rows)")
    parser.add_argument("--label", default="lever", help="the reference rows' column to label and group points by")
    parser.add_argument("--out", metavar="PNG", help="where to write the plot (default SEARCH_DIR/pareto.png)")
    args = parser.parse_args(argv)
    d = Path(args.search_dir)
    if not (d / "trials.csv").is_file() or not (d / "search.json").is_file():
        print(f"error: {d}: no trials.csv / search.json (not a search directory)", file=sys.stderr)
        return 2
    spec = json.loads((d / "search.json").read_text(encoding="utf-8"))
    objectives = [tuple(o) for o in spec["objectives"]]
    df = pd.read_csv(d / "trials.csv")
    refs = None
    if args.reference:
        r = pd.read_csv(args.reference)
        r = r[(r["row"] == "sft") & (r["status"] == "ok")].copy()
        # results.csv names the SFT model's metrics without the sft/ prefix
        for m, _ in objectives:
            short = m.split("/", 1)[1] if m.startswith("sft/") else m
            if short in r:
                r[m] = r[short]
        r["label"] = r[args.label] if args.label in r else r["job"]
        cols = [m for m, _ in objectives if m in r]
        refs = r.groupby("label", sort=False)[cols].mean().reset_index()  # one point per label: the mean over seeds
    out = Path(args.out) if args.out else d / "pareto.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(df, objectives, out, references=refs, title=f"search {d.name}")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
