"""A sweep's figures: heatmaps of a statistic over the swept SFT keys, and differences.png (every cell minus the
baseline with its interval, a forest plot)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, List, Optional

from pipeline.sweep.stats import SEED_KEYS

log = logging.getLogger(__name__)

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
        finite = [float(v) for c in ("difference", "ci_low", "ci_high") if c in sel
                  for v in sel[c] if v is not None and math.isfinite(float(v))]
        # an unbounded side (more than 2.5% of the draws at ±inf) runs to the panel's edge, marked with an arrow
        edge = (min(finite + [0.0]), max(finite + [0.0]))
        pad = 0.15 * (edge[1] - edge[0] or 1.0)
        edge = (edge[0] - pad, edge[1] + pad)
        for i, r in sel.iterrows():
            if r["difference"] is None or r["difference"] != r["difference"]:
                continue
            lo, hi = r.get("ci_low"), r.get("ci_high")
            if lo is not None and lo == lo:
                ax.plot([max(lo, edge[0]), min(hi, edge[1])], [i, i], color="tab:blue", lw=2)
                for bound, end, marker in ((lo, edge[0], "<"), (hi, edge[1], ">")):
                    if math.isinf(bound):
                        ax.plot(end, i, marker, color="tab:blue")
            ax.plot(r["difference"], i, "o", color="tab:blue")
        ax.set_xlim(*edge)
        ax.axvline(0, color="grey", lw=1, ls="--")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"{metric}: cell - baseline")
    fig.suptitle(f"vs baseline {summary['baseline']} (95% intervals)", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path




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

