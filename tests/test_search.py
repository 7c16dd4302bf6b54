"""The Pareto search (hydra/sweeper=pareto): its search-space syntax, the front, and the study's life — failed trials,
CPT grouping, and a search killed mid-trial that continues when run again.

Most tests drive the sweeper in-process with a stand-in launcher that writes each job's metrics.json from its
overrides (no model): the search logic is what they check. The last two run the real command on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from conftest import tiny_overrides
from pipeline.core.outputs import PipelineError
from pipeline.sweep import pareto
from pipeline.sweep.search import ParetoSearch, parse_constraints, parse_objectives, parse_space
from test_cli import run_cli


# --- the search space -----------------------------------------------------------------------------------------------

def test_search_space_syntax_of_the_optuna_sweeper():
    space = parse_space({
        "sft.learning_rate": "interval(1e-5, 1e-3)",
        "sft.kl_weight": "tag(log, interval(0.01, 10))",
        "sft.lora_alpha": "choice(8, 32, 128)",
        "sft.target_modules": "attn_mlp,attn",
        "sft.r": "tag(log, int(interval(4, 64)))",
        "sft.early_stopping_patience": "range(1, 7, 2)",   # 1, 3, 5: range() excludes its stop, as in Python
        "sft.layers": "choice(upper_1, [2,3])",
        "sft.max_steps": 10,                               # not a sweep: every trial gets it
    }, ["sft.lora_alpha=choice(4, 16)", "cpt.max_steps=3"])  # the command line wins over params
    assert space.dims == {
        "sft.learning_rate": FloatDistribution(1e-5, 1e-3),
        "sft.kl_weight": FloatDistribution(0.01, 10.0, log=True),
        "sft.lora_alpha": CategoricalDistribution([4, 16]),
        "sft.target_modules": CategoricalDistribution(["attn_mlp", "attn"]),
        "sft.r": IntDistribution(4, 64, log=True),
        "sft.early_stopping_patience": IntDistribution(1, 5, step=2),
        "sft.layers": CategoricalDistribution(["upper_1", "[2,3]"]),  # kept as override text
    }
    assert space.fixed == {"sft.max_steps": "10", "cpt.max_steps": "3"}


@pytest.mark.parametrize("expr, message", [
    ("interval(1e-3, 1e-5)", r"hydra.sweeper.params.sft.x: interval\(0.001, 1e-05\) needs start < end"),
    ("tag(log, interval(0, 1))", r"a log interval needs a positive start"),
    ("tag(cube, interval(0, 1))", r"unknown tag\(s\) \['cube'\]"),
    ("choice(1, 1)", r"a choice lists the same value twice"),
    ("range(5, 1)", r"range\(5, 1, 1\) is empty"),
    ("interval(1,", r"hydra.sweeper.params.sft.x: "),
])
def test_bad_search_space_names_the_key(expr, message):
    with pytest.raises(PipelineError, match=message):
        parse_space({"sft.x": expr})


def test_objectives_and_constraints():
    assert parse_objectives(["sft/contains maximize", "sft/heldout_ppl minimize"]) == [
        ("sft/contains", "maximize"), ("sft/heldout_ppl", "minimize")]
    assert parse_constraints(["sft/format_rate >= 0.9", "sft/answer_chars <= 40"]) == [
        ("sft/format_rate", ">=", 0.9), ("sft/answer_chars", "<=", 40.0)]
    with pytest.raises(PipelineError, match=r"'sft/contains up': write 'METRIC maximize'"):
        parse_objectives(["sft/contains up"])
    with pytest.raises(PipelineError, match=r"'sft/format_rate>=0.9': write 'METRIC >= NUMBER'"):
        parse_constraints(["sft/format_rate>=0.9"])
    # Optuna's convention: <= 0 is feasible
    assert pareto.violation(0.95, ">=", 0.9) == pytest.approx(-0.05)
    assert pareto.violation(45, "<=", 40) == 5


# --- the front ------------------------------------------------------------------------------------------------------

def test_front_of_hand_built_points():
    # (injected facts kept, general facts kept), both maximised:
    #   a (0.10, 0.50)  b (0.20, 0.30)  c (0.15, 0.30): dominated by b  d (0.05, 0.60)  e (0.20, 0.30): equals b
    #   f (0.04, 0.40): dominated by a and d
    points = [(0.10, 0.50), (0.20, 0.30), (0.15, 0.30), (0.05, 0.60), (0.20, 0.30), (0.04, 0.40)]
    assert pareto.pareto_front(points, ["maximize", "maximize"]) == [0, 1, 3, 4]
    # minimising the second objective turns the order around: b and e (0.30 at the highest first) and f
    assert pareto.pareto_front(points, ["maximize", "minimize"]) == [1, 4]
    assert pareto.pareto_front([(1.0, 1.0)], ["maximize", "maximize"]) == [0]


def test_infeasible_and_failed_trials_are_never_on_the_front():
    objectives = [("sft/contains", "maximize"), ("sft/general_contains", "maximize")]
    trials = [
        {"trial": 0, "state": "COMPLETE", "values": {"sft/contains": 0.1, "sft/general_contains": 0.5},
         "feasible": True},
        # dominates trial 0 but misses a constraint (no SFT at all "keeps everything"): it does not count
        {"trial": 1, "state": "COMPLETE", "values": {"sft/contains": 0.3, "sft/general_contains": 0.6},
         "feasible": False},
        {"trial": 2, "state": "FAIL", "values": {}, "error": "stage sft: out of memory"},
        {"trial": 3, "state": "COMPLETE", "values": {"sft/contains": 0.2, "sft/general_contains": 0.4},
         "feasible": True},
    ]
    pareto.mark_front(trials, objectives)
    assert [t["trial"] for t in trials if t["on_front"]] == [0, 3]
    df = pareto.trials_table(trials, objectives, [("sft/format_rate", ">=", 0.9)])
    assert list(df["trial"]) == [3, 0, 1, 2]  # the front first, best sft/contains first; then by trial number


def test_confirmation_intervals():
    front = [{"trial": 4, "params": {"sft.kl_weight": 0.3}, "values": {"sft/contains": 0.15}}]
    runs = {(4, 1): {"sft/contains": 0.10}, (4, 2): {"sft/contains": 0.12}, (4, 3): {"sft/contains": 0.14}}
    row = pareto.confirmation_table(front, runs, [("sft/contains", "maximize")], [1, 2, 3]).iloc[0]
    # mean 0.12, sd 0.02, t(0.975, 2) = 4.303: 0.12 ± 4.303 × 0.02/√3 = 0.12 ± 0.0497
    assert row["mean"] == pytest.approx(0.12)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.0703, 0.1697), abs=1e-4)
    assert row["search"] == 0.15 and row["n_seeds"] == 3


# --- the study, with a stand-in launcher ----------------------------------------------------------------------------

class StandInLauncher:
    """Writes each job's overrides.yaml and a metrics.json computed from its overrides, like a finished pipeline run;
    error.txt instead when sft.lora_alpha is 64 (a job that failed); raises KeyboardInterrupt (a kill) at the
    `kill_at`-th job it starts."""

    def __init__(self, sweep_dir: Path, kill_at: int | None = None):
        self.sweep_dir, self.kill_at, self.started, self.cpt_built = sweep_dir, kill_at, 0, set()

    def launch(self, job_overrides, initial_job_idx):
        returns = []
        for i, overrides in enumerate(job_overrides):
            self.started += 1
            job = self.sweep_dir / str(initial_job_idx + i)
            (job / ".hydra").mkdir(parents=True, exist_ok=True)
            (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(list(overrides)))
            if self.started == self.kill_at:
                raise KeyboardInterrupt
            values = dict(o.split("=", 1) for o in overrides)
            if values.get("sft.lora_alpha") == "64":
                (job / "error.txt").write_text("PipelineError: sft.lora_alpha=64: (a stand-in failure)\n")
            else:
                cpt = values.get("cpt.lora_alpha")
                lr = float(values["sft.learning_rate"])
                (job / "metrics.json").write_text(json.dumps({
                    "sft/contains": lr * 100, "sft/general_contains": 1 - lr * 100, "sft/format_rate": 1.0,
                    "stage/cpt": "reused" if cpt in self.cpt_built else "built", "stage/sft": "built"}))
                self.cpt_built.add(cpt)
            returns.append(None)
        return returns


def _search(sweep_dir: Path, launcher, **settings) -> ParetoSearch:
    s = ParetoSearch(**{"params": {"cpt.lora_alpha": "choice(16, 32)", "sft.lora_alpha": "choice(8, 64)",
                                   "sft.learning_rate": "interval(0.001, 0.009)"},
                        "objectives": ["sft/contains maximize", "sft/general_contains maximize"],
                        "constraints": ["sft/format_rate >= 0.9"], "sampler": "random", **settings})
    s.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})
    s.launcher = launcher
    return s


def _trials(sweep_dir: Path) -> list:
    import optuna

    return optuna.load_study(study_name="search", storage=f"sqlite:///{sweep_dir / 'study.db'}").get_trials()


def test_rounds_share_a_cpt_model_and_a_failed_trial_does_not_stop_the_search(tmp_path):
    launcher = StandInLauncher(tmp_path)
    records = _search(tmp_path, launcher, trials=6, trials_per_round=3).search([])
    trials = _trials(tmp_path)
    assert len(trials) == 6 and [t.number for t in trials] == list(range(6))
    for round_ in (trials[:3], trials[3:]):  # each round's trials share the first one's CPT setting
        assert len({t.params["cpt.lora_alpha"] for t in round_}) == 1
    # a round trains at most one CPT model: here at most 2 built, the other jobs reused it
    built = [json.loads((tmp_path / t.user_attrs["job"] / "metrics.json").read_text())["stage/cpt"]
             for t in trials if t.state.name == "COMPLETE"]
    assert built.count("built") <= 2
    failed = [t for t in trials if t.params["sft.lora_alpha"] == 64]
    assert failed and all(t.state.name == "FAIL" and "stand-in failure" in t.user_attrs["error"] for t in failed)
    assert all(t.state.name == "COMPLETE" for t in trials if t.params["sft.lora_alpha"] == 8)
    # the outputs: every trial in trials.csv, the front's settings in pareto_front.csv/.md, the plot
    for name in ("trials.csv", "pareto_front.csv", "pareto_front.md", "pareto.png", "study.db"):
        assert (tmp_path / name).is_file(), name
    md = (tmp_path / "pareto_front.md").read_text()
    assert f"{len(failed)} failed" in md and "stand-in failure" in md
    # contains + general_contains = 1 for every stand-in job: every complete trial is on the front
    assert sum(r["on_front"] for r in records) == 6 - len(failed)
    # report.html gets the front and the plot (the sweep's own tables are empty here: no real job ran)
    import pandas as pd

    from pipeline.sweep.report import write_report

    html = write_report(tmp_path, [], pd.DataFrame(), [], []).read_text()
    assert "Search: Pareto front" in html and html.count("data:image/png;base64") == 1
    assert html.count("stand-in failure") == len(failed)  # each failed trial listed with its error


def test_a_search_killed_mid_trial_continues_when_run_again(tmp_path):
    with pytest.raises(KeyboardInterrupt):  # killed while its third job runs
        _search(tmp_path, StandInLauncher(tmp_path, kill_at=3), trials=4, seed=1).search([])
    first = _trials(tmp_path)
    assert [t.state.name for t in first] == ["COMPLETE" if t.params["sft.lora_alpha"] == 8 else "FAIL"
                                             for t in first[:2]] + ["RUNNING"]
    killed_job, killed_params = first[2].user_attrs["job"], first[2].params

    again = StandInLauncher(tmp_path)
    _search(tmp_path, again, trials=4, seed=1).search([])
    trials = _trials(tmp_path)
    assert trials[2].state.name == "FAIL" and trials[2].user_attrs["interrupted"]
    rerun = trials[3]  # the killed trial, asked again with its settings, into its own job directory
    assert rerun.params == killed_params and rerun.user_attrs["rerun_of"] == 2
    assert rerun.user_attrs["job"] == killed_job
    done = [t for t in trials if not t.user_attrs.get("interrupted")]
    assert len(done) == 4 and again.started == 2  # the rerun and one new trial: the first two were not run again
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["0", "1", "2", "3"]


def test_a_changed_search_space_does_not_continue_the_study(tmp_path):
    _search(tmp_path, StandInLauncher(tmp_path), trials=1).search([])
    other = _search(tmp_path, StandInLauncher(tmp_path), trials=2, params={"sft.learning_rate": "interval(0.001, 0.002)"})
    with pytest.raises(PipelineError, match=r"was started with another space; continue it with the same settings"):
        other.search([])


# --- the real command on the tiny model -----------------------------------------------------------------------------

KILL_ON_NTH_WRITE = """
import os, re, signal, sys
_pattern, _n = re.compile(os.environ["KILL_ON_WRITE"]), [0]
def _kill(event, args):
    if event == "open" and _pattern.search(str(args[0])) and isinstance(args[1], str) and "w" in args[1]:
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(_kill)
"""


def _cli_search(model, data, sweep: Path, cache: Path, kill: str | None = None):
    args = ["-m", "hydra/sweeper=pareto", *tiny_overrides(model, data, **{
        "hydra.sweep.dir": sweep, "cache.dir": cache, "cpt.max_steps": 2, "sft.max_steps": 2,
        "eval.max_questions": 2, "hydra.sweeper.trials": 3, "hydra.sweeper.trials_per_round": 3,
        "hydra.sweeper.sampler": "random"}),
        "cpt.lora_alpha=choice(8,16)", "sft.learning_rate=tag(log, interval(1e-4, 1e-2))",
        'hydra.sweeper.constraints=["sft/eos_rate >= 0.0"]']
    args += ["data.general_qa.path=null", "data.heldout.path=null",  # the tiny model's eval: the QA set only
             'hydra.sweeper.objectives=["sft/contains maximize","sft/logprob maximize"]',
             "tracking=mlflow", f"tracking.uri=sqlite:///{sweep.parent / 'mlflow.db'}"]
    return run_cli(args, prelude=KILL_ON_NTH_WRITE if kill else None, env={"KILL_ON_WRITE": kill} if kill else None)


@pytest.mark.slow  # two runs of the command with three trials each: about 2 minutes on 2 idle cores
def test_search_command_reuses_cpt_and_continues_after_a_kill(tiny_model, data_files, tmp_path):
    """The real command: killed (SIGKILL) while its second trial writes its answers, then run again. The round's
    three trials share one CPT model (built once, reused twice, per the stage cache's records in metrics.json), the
    killed trial is rerun into its directory from the cache, and report.html and the MLflow parent run hold the
    front."""
    sweep, cache = tmp_path / "search", tmp_path / "cache"
    killed = _cli_search(tiny_model, data_files, sweep, cache, kill=rf"{sweep}/1/answers\.jsonl$")
    assert killed.returncode == -9, f"the kill point was never reached: {killed.stderr[-2000:]}"
    assert not (sweep / "1" / "metrics.json").exists() and not (sweep / "trials.csv").exists()

    again = _cli_search(tiny_model, data_files, sweep, cache)
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(3)]
    assert len({m["key/cpt"] for m in metrics}) == 1
    assert [m["stage/cpt"] for m in metrics] == ["built", "reused", "reused"]
    assert metrics[1]["stage/sft"] == "reused"  # the killed trial's SFT had finished: the rerun took it from the cache
    # the round's three trials were running when the kill came: trial 0 had finished (told from its metrics.json),
    # 1 and 2 are asked again (trials 3 and 4) into their own job directories
    trials = _trials(sweep)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].user_attrs["interrupted"] and trials[2].user_attrs["interrupted"]
    assert [(t.user_attrs["rerun_of"], t.user_attrs["job"]) for t in trials[3:]] == [(1, "1"), (2, "2")]
    report = (sweep / "report.html").read_text()
    assert "Search: Pareto front" in report and "data:image/png;base64" in report
    assert (sweep / "pareto_front.md").read_text().count("CPT trained 1 times")
    # MLflow (tracking=mlflow): the search's files on the sweep's parent run, one child run per job
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{sweep.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name("keep-knowledge")
    parent = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'sweep'")[0]
    assert {"pareto_front.md", "pareto_front.csv", "trials.csv", "pareto.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.parametrize("experiment, dims", [
    ("lever_search", {"sft.kl_weight", "sft.learning_rate", "sft.replay_ratio", "sft.early_stopping_patience",
                      "sft.layers"}),
    ("seed_grid_search", {"cpt.lora_alpha", "sft.lora_alpha", "sft.target_modules"})])
def test_search_presets_select_the_pareto_sweeper(experiment, dims):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.keep_knowledge_sweeper.pareto_sweeper.ParetoSweeper"
    assert set(parse_space(sweeper.params).dims) == dims
    assert parse_constraints(sweeper.constraints) == [("sft/format_rate", ">=", 0.9)]
    assert cfg.hydra.sweep.dir == f"outputs/searches/{experiment}"  # fixed: running it again continues the study


@pytest.mark.parametrize("setting, message", [
    ("sft.lora_alpha=tag(log, interval(0, 8))", r"error: command-line override .*: a log interval needs a positive "
                                                 r"start \(got 0\.0\)"),
    ("hydra.sweeper.objectives=[sft/contains]", r"error: hydra.sweeper.objectives: 'sft/contains': write 'METRIC "
                                                r"maximize' or 'METRIC minimize'"),
    ("sft.lora_alpah=choice(8,32)", r"error: hydra.sweeper.params: .*sft.lora_alpah"),
])
def test_bad_search_settings_stop_before_any_trial(setting, message, tiny_model, data_files, tmp_path):
    import re

    sweep = tmp_path / "search"
    r = run_cli(["-m", "hydra/sweeper=pareto", *tiny_overrides(tiny_model, data_files, **{"hydra.sweep.dir": sweep}),
                 "sft.r=choice(4,8)", setting])
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(message, lines[0]), r.stderr[-2000:]
    assert not [p for p in sweep.glob("*") if p.name.isdigit()]  # no trial started
