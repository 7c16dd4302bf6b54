"""tracking=mlflow: a sweep becomes a parent run with one child run per job in a local SQLite store, offline."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import tiny_overrides
from pipeline.core.outputs import PipelineError
from pipeline.core.config import TrackingConfig
from pipeline.core.tracking import check, local_uri
from test_cli import AUDIT, run_cli

CONF = Path(__file__).resolve().parents[1] / "conf" / "tracking"


def test_tracking_configs_restate_the_dataclass_defaults():
    """none.yaml (the default) is the dataclass; mlflow.yaml differs only in the backend."""
    none, mlflow = (OmegaConf.to_container(OmegaConf.load(CONF / f"{n}.yaml")) for n in ("none", "mlflow"))
    assert none == asdict(TrackingConfig())
    assert {k: v for k, v in mlflow.items() if none[k] != v} == {"backend": "mlflow"}


def test_tracking_never_goes_to_a_server():
    cfg = OmegaConf.create({"tracking": {"backend": "mlflow", "uri": "http://mlflow.example:5000",
                                         "experiment": "x"}})
    with pytest.raises(PipelineError, match=r"^tracking.uri=http://mlflow.example:5000: the pipeline logs only to a "
                                            r"local store"):
        check(cfg)
    cfg.tracking.backend = "none"
    check(cfg)  # no tracker: nothing to check


def test_missing_mlflow_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "alembic" else real(name, *a))
    cfg = OmegaConf.create({"tracking": asdict(TrackingConfig(backend="mlflow"))})
    with pytest.raises(PipelineError, match=r'^tracking=mlflow needs alembic: pip install -e "\.\[tracking\]"$'):
        check(cfg)


def test_a_relative_store_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert local_uri("sqlite:///outputs/mlflow.db") == f"sqlite:///{tmp_path}/outputs/mlflow.db"
    assert (tmp_path / "outputs").is_dir()  # SQLite creates the file, not its directory
    assert local_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"


def test_a_sweep_is_a_parent_run_with_one_child_per_job(tiny_model, data_files, tmp_path, monkeypatch):
    """A 2-job multirun with tracking=mlflow, under the audit hook that fails on any connection or DNS lookup; then
    the store is read back as a user would (mlflow.search_runs)."""
    sweep, db, audit_log = tmp_path / "sweep", tmp_path / "store" / "mlflow.db", tmp_path / "network.log"
    # MLflow keeps quiet by itself under pytest or a CI service (it looks for these variables); a user's shell has
    # none of them, and the run must still open no connection.
    for var in ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "BUILDKITE", "TF_BUILD"):
        monkeypatch.delenv(var, raising=False)
    r = run_cli(["-m", "tracking=mlflow", f"tracking.uri=sqlite:///{db}",
                 # its own cache: logging_steps is not part of a stage's key, so a CPT built by another test
                 # (logging every 10 steps) would be reused with no per-step losses to log
                 *tiny_overrides(tiny_model, data_files, **{"hydra.sweep.dir": sweep, "cache.dir": tmp_path / "cache",
                                                            "cpt.logging_steps": 1, "sft.logging_steps": 1}),
                 "sft.lora_alpha=8,32"],
                prelude=AUDIT, env={"NETWORK_AUDIT_LOG": str(audit_log)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert not audit_log.exists(), audit_log.read_text()

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # reading the store must not phone home either
    import mlflow
    from mlflow.tracking import MlflowClient

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    try:
        runs = mlflow.search_runs(experiment_names=["keep-knowledge"])
    finally:
        mlflow.set_tracking_uri(previous)
    parents = runs[runs["tags.kind"] == "sweep"]
    children = runs[runs["tags.kind"] == "job"]
    assert len(runs) == 3 and len(parents) == 1 and len(children) == 2
    parent_id = parents["run_id"].iloc[0]
    assert set(children["tags.mlflow.parentRunId"]) == {parent_id}
    assert parents["tags.sweep_dir"].iloc[0] == str(sweep.resolve())
    assert set(runs["status"]) == {"FINISHED"}  # the children when logged, the parent when the sweep ended
    assert sorted(children["params.sft.lora_alpha"].astype(float)) == [8.0, 32.0]
    assert children["params.cpt.r"].tolist() == ["4", "4"]
    for _, child in children.iterrows():  # final metrics: metrics.json as the job wrote it
        job = json.loads((sweep / child["tags.job"] / "metrics.json").read_text())
        assert child["metrics.sft/contains"] == job["sft/contains"]
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    child_id = children["run_id"].iloc[0]
    assert [m.step for m in client.get_metric_history(child_id, "train/cpt_loss")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(child_id, "train/sft_loss")] == [1, 2, 3]
    assert {"metrics.json", "config.yaml", "answers.jsonl"} <= {a.path for a in client.list_artifacts(child_id)}
    assert "report.html" in {a.path for a in client.list_artifacts(parent_id)}
    assert (db.parent / "mlflow-artifacts").is_dir()  # files next to the store, not in ./mlruns
