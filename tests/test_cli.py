"""The command line as a user runs it: one-line errors, a multirun, and no network access."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def user_env(**extra) -> dict:
    """A user's shell: without the offline variables that importing `pipeline` put into this test process (the
    pipeline must set them itself), with extra variables on top."""
    from pipeline import _OFFLINE

    return {**{k: v for k, v in os.environ.items() if k not in _OFFLINE}, **extra}


def run_cli(args, cwd=ROOT, prelude=None, timeout=300, env=None):
    cmd = [sys.executable, "-m", "pipeline.run", *map(str, args)]
    if prelude:  # run code (e.g. an audit hook) in the same interpreter before the pipeline starts
        cmd = [sys.executable, "-c", f"{prelude}\nimport runpy, sys\nsys.argv = {cmd[2:]!r}\n"
                                     "runpy.run_module('pipeline.run', run_name='__main__')"]
    env = user_env(HYDRA_FULL_ERROR="0", **(env or {}))
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def bad_input_cases(tmp_path, data):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.md").write_text("\n", encoding="utf-8")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a" "completion": "b"}\n', encoding="utf-8")
    noanswer = write_jsonl(tmp_path / "noanswer.jsonl", [{"id": "x", "question": "q?"}])
    return {
        "missing model": ({"model.path": tmp_path / "no_model"}, r"model.path=.*no_model: no such directory"),
        "empty corpus": ({"data.cpt.path": empty}, r"data.cpt.path=.*empty: the corpus is empty"),
        "malformed jsonl": ({"data.sft.path": broken}, r"broken.jsonl:2: malformed JSON"),
        "qa without answer": ({"data.qa.path": noanswer},
                              r"noanswer.jsonl:1: QA record without a non-empty string 'answer'"),
        "unknown module": ({"sft.target_modules": "[c_attn]"},
                           r"sft.target_modules: module 'c_attn' does not exist in this llama model; available: "),
        "unsloth without cuda": ({"backend": "unsloth"},
                                 r"backend=unsloth needs a CUDA GPU, but this run's device is cpu "),
    }


@pytest.mark.parametrize("case", ["missing model", "empty corpus", "malformed jsonl", "qa without answer",
                                  "unknown module", "unsloth without cuda"])
def test_bad_input_gets_one_line_and_nothing_is_trained(case, tiny_model, data_files, tmp_path):
    overrides, pattern = bad_input_cases(tmp_path, data_files)[case]
    run_dir = tmp_path / "run"
    r = run_cli(tiny_overrides(tiny_model, data_files, **overrides, **{"hydra.run.dir": run_dir}))
    assert r.returncode == 2, r.stderr
    err_lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err_lines) == 1 and err_lines[0].startswith("error: "), r.stderr
    import re

    assert re.search(pattern, err_lines[0]), err_lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    assert not any((run_dir / d).exists() for d in ("cpt_adapter", "cpt_model", "sft_adapter", "metrics.json"))


AUDIT = """
import os, sys
def _no_network(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname"):
        # recorded as well as raised: a library that swallows the exception must not hide the attempt
        with open(os.environ["NETWORK_AUDIT_LOG"], "a") as f:
            f.write(f"{event} {args!r}\\n")
        raise RuntimeError(f"network access attempted: {event} {args!r}")
sys.addaudithook(_no_network)
"""


# Written out, not read from pipeline._OFFLINE: dropping a switch from the package's own table must fail here.
OFFLINE_SWITCHES = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                    "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1", "UNSLOTH_DISABLE_STATISTICS": "1",
                    "WANDB_DISABLED": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}


def test_importing_pipeline_makes_the_process_offline():
    """Every entry point imports `pipeline` first; that alone must switch the Hugging Face libraries (hub,
    transformers, datasets) offline and the trackers' telemetry off, even from a shell that says otherwise."""
    code = ("import json, os, sys\nimport pipeline\nimport huggingface_hub.constants as hub\n"
            "print(json.dumps({'env': {k: os.environ.get(k) for k in json.loads(sys.argv[1])}, "
            "'hub': hub.HF_HUB_OFFLINE}))")
    shell = {k: "0" if v == "1" else "false" for k, v in OFFLINE_SWITCHES.items()}  # a shell that says otherwise
    r = subprocess.run([sys.executable, "-c", code, json.dumps(list(OFFLINE_SWITCHES))], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=user_env(**shell))
    assert r.returncode == 0, r.stderr[-2000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen == {"env": OFFLINE_SWITCHES, "hub": True}


def test_every_stage_opens_no_network_connection(tiny_model, data_files, tmp_path):
    """An audit hook makes any connect/DNS lookup fail loudly; every stage (chat vector, judge, general QA and
    held-out text included) must still succeed. Its own empty cache: every stage runs here, none is a cache hit of
    an earlier test, and the process gets a user's environment, not this test process's offline variables."""
    audit_log = tmp_path / "network.log"
    r = run_cli(tiny_overrides(tiny_model, data_files, **{
        "hydra.run.dir": tmp_path / "run", "cache.dir": tmp_path / "cache", "debug": "true",
        "stages": "[cpt,merge,chat_vector,sft,eval]", "model.instruct_path": tiny_model,
        "eval.judge_path": tiny_model, "data.general_qa.path": data_files["qa"],
        "data.heldout.path": data_files["cpt"], "eval.max_questions": 2}),
        prelude=AUDIT, env={"NETWORK_AUDIT_LOG": str(audit_log)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert not audit_log.exists(), audit_log.read_text()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [metrics[f"stage/{s}"] for s in ("cpt", "merge", "chat_vector", "sft", "eval")] == ["built"] * 5
    assert metrics["sft/judge"] is not None and metrics["sft/heldout_ppl"] > 1
    # confidentiality: neither the console nor run.log quotes the corpus, the SFT data or the QA answers
    logs = r.stdout + r.stderr + (tmp_path / "run" / "run.log").read_text(encoding="utf-8")
    for secret in ("佐藤健一", "プレス機P-101", "1150度", "東京です", "これはペンです", "始業点検は何分"):
        assert secret not in logs, secret
    assert "(hidden: log_examples=true shows examples)" in logs


def test_sweep_report_tracking_and_cache_commands_open_no_network(tiny_model, data_files, tmp_path):
    """The rest of what a user runs: a sweep with its aggregation, report and MLflow tracking, then the cache
    commands, all under the same audit hook, each in a user's environment."""
    audit_log, sweep, cache = tmp_path / "network.log", tmp_path / "sweep", tmp_path / "cache"
    env = {"NETWORK_AUDIT_LOG": str(audit_log)}
    r = run_cli(["-m", *tiny_overrides(tiny_model, data_files, **{
        "hydra.sweep.dir": sweep, "cache.dir": cache, "tracking": "mlflow",
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "cpt.max_steps": 1, "sft.max_steps": 1,
        "eval.max_questions": 1}), "sft.lora_alpha=8,32"], prelude=AUDIT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (sweep / "results.csv").is_file() and (sweep / "report.html").is_file()
    for module, args in (("pipeline.cache", ["--root", str(cache), "list"]),
                         ("pipeline.aggregate", [str(sweep)]),  # the aggregation run again by hand
                         ("pipeline.cache", ["--root", str(cache), "prune", "--all"])):
        c = subprocess.run([sys.executable, "-c", f"{AUDIT}\nimport runpy, sys\nsys.argv = {[module, *args]!r}\n"
                            f"runpy.run_module({module!r}, run_name='__main__')"], cwd=ROOT, capture_output=True,
                           text=True, env=user_env(**env), timeout=120)
        assert c.returncode == 0, c.stderr[-2000:]
    assert not list(cache.glob("*/*/.complete"))  # the prune ran
    assert not audit_log.exists(), audit_log.read_text()


def test_seed_grid_experiment_runs_eight_cells(tiny_model, data_files, tmp_path):
    """The shipped grid (+experiment=seed_grid) as a multirun: 8 jobs, each with its cell's values recorded."""
    sweep = tmp_path / "grid"
    r = run_cli(["-m", "+experiment=seed_grid",
                 *tiny_overrides(tiny_model, data_files, **{"hydra.sweep.dir": sweep, "cpt.max_steps": 1,
                                                            "sft.max_steps": 1, "eval.max_questions": 1})])
    assert r.returncode == 0, r.stderr[-3000:]
    cells = set()
    for i in range(8):
        m = json.loads((sweep / str(i) / "metrics.json").read_text())
        cells.add((m["cpt.lora_alpha"], m["sft.lora_alpha"], m["sft.target_modules"]))
        assert m["cpt.target_modules"] == "attn_mlp_embed"
    assert cells == {(c, s, t) for c in (32, 128) for s in (8, 32) for t in ("attn_mlp", "attn")}


def test_parallel_launcher_builds_each_cpt_key_once(tiny_model, data_files, tmp_path):
    """Two joblib workers, two cells sharing one CPT setting: one worker trains CPT, the other waits and reuses it."""
    sweep = tmp_path / "sweep"
    r = run_cli(["-m", "hydra/launcher=parallel", *tiny_overrides(tiny_model, data_files, **{
        "hydra.sweep.dir": sweep, "cache.dir": tmp_path / "cache", "cpt.max_steps": 30}), "sft.lora_alpha=8,32"])
    assert r.returncode == 0, r.stderr[-3000:]
    status = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    assert sorted(m["stage/cpt"] for m in status) == ["built", "reused"]
    assert status[0]["key/cpt"] == status[1]["key/cpt"]
    assert len(list((tmp_path / "cache" / "cpt").glob("*/.complete"))) == 1
    assert (sweep / "results.csv").is_file()


@pytest.mark.parametrize("launcher", ["parallel", "slurm"])
def test_launcher_configs_compose(launcher):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")
