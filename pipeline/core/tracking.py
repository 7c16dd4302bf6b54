"""Experiment tracking: `tracking=mlflow` files every run in a local MLflow store (conf/tracking/mlflow.yaml).

    python -m pipeline.run tracking=mlflow
    python -m pipeline.run -m tracking=mlflow cpt.lora_alpha=32,128     # one parent run, one child per job
    mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db

Why MLflow (README, "Tracking"): a sweep maps onto its parent/child runs, one run holds parameters, step-wise and final
metrics and files together, and the store is one local SQLite file that needs no server.

A run gets the flat config (pipeline.core.config.flat_config) as parameters, the CPT and SFT training losses per logged
step (`loss_history` in cpt_stats.json / sft_stats.json) as `train/cpt_loss` / `train/sft_loss`, every number of
metrics.json as a metric (`@` of per-group metrics becomes `/`: `sft/contains/faq`), the stage keys and paths as
tags, and metrics.json, config.yaml, answers.jsonl and run.log as artifacts. The jobs of a Hydra multirun share a
parent run keyed by the sweep directory: the first job to finish creates it, under the same file lock that
serialises every write to the store (jobs of the parallel launcher are separate processes, and SQLite takes one
writer at a time). When the sweep ends, TrackingCallback attaches the sweep's files (results, heatmaps, report.html)
to the parent and closes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from hydra.experimental.callback import Callback

from pipeline.core.outputs import PipelineError
from pipeline.core.progress import CONSOLE

log = logging.getLogger(__name__)

# Read by MLflow when it is imported, so set with this module (before any mlflow import). Without the first, MLflow 3
# asks config.mlflow-telemetry.io whether to send usage data (it reads DO_NOT_TRACK only as "true", the pipeline sets
# "1"; it is silent by itself only under pytest or a CI service). Without the second, its own stderr handlers would
# put its INFO lines ("Creating initial MLflow database tables...") on the console instead of into run.log.
_MLFLOW_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_CONFIGURE_LOGGING": "false"}
os.environ.update(_MLFLOW_ENV)
ARTIFACTS = ("metrics.json", "config.yaml", "answers.jsonl", "lost_questions.jsonl", "run.log")
SWEEP_ARTIFACTS = ("report.html", "results.csv", "results.md", "cells.csv", "answers.md",
                   # a search's (pipeline/sweep/pareto.py)
                   "pareto_front.md", "pareto_front.csv", "trials.csv", "confirmation.csv", "pareto.png")
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database file
_BAD_NAME = re.compile(r"[^\w\-. /:]")  # MLflow's allowed characters in parameter and metric names


def _settings(cfg) -> Tuple[str, str, str]:
    """(backend, uri, experiment) of cfg.tracking, range-checked; `none` for a config without the section."""
    from omegaconf import OmegaConf

    from pipeline.core.config import check_ranges, typed

    if OmegaConf.select(cfg, "tracking") is None:
        return "none", "", ""
    t = typed(cfg, "tracking")
    check_ranges(t, "tracking")
    return t.backend, t.uri, t.experiment


def check(cfg) -> None:
    """Before any training: tracking=mlflow needs MLflow installed and a local store (the pipeline never goes
    online)."""
    backend, uri, _ = _settings(cfg)
    if backend != "mlflow":
        return
    if re.match(r"^(https?|databricks|uc)(:|$)", uri):
        raise PipelineError(f"tracking.uri={uri}: the pipeline logs only to a local store, no server (use "
                            f"sqlite:///path.db or a directory)")
    missing = [m for m in ("mlflow", "sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
    if missing and (uri.startswith("sqlite:") or "mlflow" in missing):
        raise PipelineError(f"tracking=mlflow needs {', '.join(missing)}: pip install -e \".[tracking]\"")
    check_store(uri)


def check_store(uri: str) -> None:
    """The local store can be written: a `sqlite:///` file that is an SQLite database (or empty) in a directory this
    process may write (its lock file goes next to it), or a directory that exists or can be created. Checked before
    any training, so an unwritable store is not found out as a warning after hours of it."""
    import tempfile

    db = _store_path(uri)
    where = db.parent if db else Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    if db and db.exists():
        if not db.is_file():
            raise PipelineError(f"tracking.uri={uri}: {db} is not a file; point tracking.uri at an SQLite file")
        with open(db, "rb") as f:  # the header only: no connection, so a sweep's other jobs writing it never block
            header = f.read(len(SQLITE_HEADER))
        if header and header != SQLITE_HEADER:
            raise PipelineError(f"tracking.uri={uri}: {db} is not an SQLite database (file is not a database); point "
                                f"tracking.uri at a new file or an MLflow store")
        if not os.access(db, os.W_OK):
            raise PipelineError(f"tracking.uri={uri}: {db} is read-only; set tracking.uri to a writable file or "
                                f"tracking=none")
    probe = where
    while not probe.exists():  # the nearest existing ancestor decides whether the directory can be created
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is a file")
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise PipelineError(f"tracking.uri={uri}: cannot write the store there ({e.strerror or e}); set tracking.uri "
                            f"to a writable location or tracking=none") from None


def local_uri(uri: str) -> str:
    """A relative `sqlite:///path.db` made absolute (joblib workers and a later `mlflow ui` may run elsewhere), its
    directory created; other URIs unchanged."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return uri


def _store_path(uri: str) -> Optional[Path]:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _store(uri: str, experiment: str) -> Iterator[tuple]:
    """(client, experiment id) with the store locked against the other jobs of a sweep."""
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    db = _store_path(uri)
    lock = FileLock(str(db) + ".lock") if db else contextlib.nullcontext()
    with lock:
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            # Artifacts next to the database, not in ./mlruns of whatever directory the command ran in.
            where = (db.parent / "mlflow-artifacts").as_uri() if db else None
            exp_id = client.create_experiment(experiment, artifact_location=where)
        else:
            exp_id = exp.experiment_id
        yield client, exp_id


def _sweep() -> Tuple[Optional[Path], Optional[str], List[str]]:
    """(sweep directory, job number, the job's overrides) inside a Hydra multirun job; (None, None, []) otherwise."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None, []
    hc = HydraConfig.get()
    overrides = [str(o) for o in hc.overrides.task]
    if hc.mode != RunMode.MULTIRUN:
        return None, None, overrides
    return Path(hc.sweep.dir).resolve(), str(hc.job.num), overrides


def _sweep_id(sweep_dir: Path) -> str:
    return hashlib.sha1(str(sweep_dir).encode()).hexdigest()[:16]


def _find_parent(client, exp_id: str, sweep_dir: Path):
    runs = client.search_runs([exp_id], filter_string=f"tags.sweep_id = '{_sweep_id(sweep_dir)}'", max_results=1)
    return runs[0] if runs else None


def _name(key: str) -> str:
    return _BAD_NAME.sub("_", key.replace("@", "/"))


def _loss_history(run_dir: Path, metrics: Dict, stage: str) -> List[list]:
    link = {"cpt": "cpt_adapter", "sft": "sft_adapter"}[stage]
    for d in (run_dir / link, Path(str(metrics.get(link) or "/nonexistent"))):
        stats = d / f"{stage}_stats.json"
        if stats.is_file():
            return json.loads(stats.read_text(encoding="utf-8")).get("loss_history") or []
    return []


def log_run(cfg, run_dir: str | Path, metrics: Dict) -> Optional[str]:
    """File this finished run in the configured tracker; returns the MLflow run id (None with tracking=none, or when
    the store could not be written: the run's results are in metrics.json either way, so that is a warning)."""
    backend, uri, experiment = _settings(cfg)
    if backend != "mlflow":
        return None
    try:
        return _log_mlflow(cfg, Path(run_dir), metrics, uri, experiment)
    except Exception as e:  # noqa: BLE001  (a tracker failure must not turn finished training into a failed run)
        log.warning("tracking: could not log this run to %s (%s: %s); its results are in metrics.json", uri,
                    type(e).__name__, e)
        return None


def _log_mlflow(cfg, run_dir: Path, metrics: Dict, uri: str, experiment: str) -> str:
    from mlflow.entities import Metric, Param

    from pipeline.core.config import flat_config

    run_dir, uri = Path(run_dir).resolve(), local_uri(uri)
    sweep_dir, job, overrides = _sweep()
    params = {_name(k): str(v)[:6000] for k, v in flat_config(cfg).items()}
    numbers = {_name(k): float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and _name(k) not in params}
    tags = {k: v[:5000] for k, v in metrics.items() if isinstance(v, str) and _name(k) not in params}
    tags.update({"run_dir": str(run_dir), "overrides": " ".join(overrides)[:5000]})
    with _store(uri, experiment) as (client, exp_id):
        if sweep_dir is not None:
            parent = _find_parent(client, exp_id, sweep_dir)
            if parent is None:
                parent = client.create_run(exp_id, run_name=f"sweep {sweep_dir.name}", tags={
                    "sweep_id": _sweep_id(sweep_dir), "sweep_dir": str(sweep_dir), "kind": "sweep"})
            tags.update({"mlflow.parentRunId": parent.info.run_id, "sweep_dir": str(sweep_dir), "job": job,
                         "kind": "job"})
        name = f"{sweep_dir.name}/{job}" if sweep_dir is not None else run_dir.name
        run_id = client.create_run(exp_id, run_name=name, tags={**tags, "kind": tags.get("kind", "run")}).info.run_id
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
        now = int(time.time() * 1000)
        points = [Metric(k, v, now, 0) for k, v in numbers.items()]
        for stage in ("cpt", "sft"):
            points += [Metric(f"train/{stage}_loss", float(loss), now, int(step))
                       for step, loss in _loss_history(run_dir, metrics, stage)]
        for i in range(0, len(points), 1000):  # and at most 1000 metric values
            client.log_batch(run_id, metrics=points[i:i + 1000])
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                client.log_artifact(run_id, str(run_dir / name))
        client.set_terminated(run_id, "FINISHED")
    log.info("tracking: MLflow run %s (%s); browse with: mlflow ui --backend-store-uri %s", run_id, experiment, uri,
             extra=CONSOLE)
    return run_id


class TrackingCallback(Callback):
    """Hydra callback: when a multirun ends, attach the sweep's files to its parent run and close it."""

    def on_multirun_end(self, config, **kwargs) -> None:
        backend, uri, experiment = _settings(config)
        if backend != "mlflow":
            return
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        with _store(local_uri(uri), experiment) as (client, exp_id):
            parent = _find_parent(client, exp_id, sweep_dir)
            if parent is None:  # no job got as far as logging
                return
            run_id = parent.info.run_id
            for path in [sweep_dir / n for n in SWEEP_ARTIFACTS] + sorted(sweep_dir.glob("heatmap_*.png")):
                if path.is_file():
                    client.log_artifact(run_id, str(path))
            client.set_terminated(run_id, "FINISHED")
