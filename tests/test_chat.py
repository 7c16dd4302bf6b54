"""python -m pipeline.chat: the run's models answer side by side, through stdin, as eval answered."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import tiny_overrides
from pipeline import chat
from pipeline.run import run_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tiny_model, data_files, tmp_path_factory):
    run = tmp_path_factory.mktemp("chat_run")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=tiny_overrides(tiny_model, data_files))
    run_pipeline(cfg, run)
    answers = [json.loads(x) for x in (run / "answers.jsonl").read_text().splitlines()]
    return run, answers


def test_stdin_answers_are_evals(run, monkeypatch, capsys):
    run_dir, answers = run
    loads = []
    import pipeline.core.checkpoints as checkpoints

    original = checkpoints.load_model
    monkeypatch.setattr(checkpoints, "load_model", lambda path, *a, **k: loads.append(str(path)) or original(
        path, *a, **k))
    monkeypatch.setattr(sys, "stdin", io.StringIO(answers[0]["question"] + "\n\n" + answers[1]["question"] + "\n"))
    assert chat.main([str(run_dir)]) == 0  # end of input ends the session
    out = capsys.readouterr().out.splitlines()
    for i, row in enumerate(answers[:2]):
        block = out[4 * i: 4 * i + 4]
        assert block[0] == f"question> {row['question']}"
        assert block[1:] == [f"base: {row['base']['answer']}", f" cpt: {row['cpt']['answer']}",
                             f" sft: {row['sft']['answer']}"]
    # the base model and the CPT model once each: the CPT answers are the SFT model's with its adapter switched off
    assert len(loads) == len(set(loads)) == 2


def test_question_file_table(run, tmp_path, capsys, data_files):
    run_dir, answers = run
    assert chat.main([str(run_dir), "--question-file", str(data_files["qa"]), "--models", "cpt,sft"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["question", "cpt", "sft"]
    assert len(lines) == 2 + len(answers)
    for line, row in zip(lines[2:], answers):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells == [row["question"], row["cpt"]["answer"], row["sft"]["answer"]]


def test_bad_run_dir_is_one_line(tmp_path, capsys):
    assert chat.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {tmp_path}: no config.yaml; give a run directory "
                                                            f"(outputs/runs/<time>) or a sweep's job directory "
                                                            f"(outputs/sweeps/<time>/<n>)"]


def test_ctrl_c_exits_cleanly(run):
    """A real process waiting for a question: Ctrl-C (SIGINT) ends it with status 0 and no traceback."""
    run_dir, _ = run
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.chat", str(run_dir), "--models", "base"], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    banner = ""
    while "answer each question" not in banner and time.time() < deadline:  # loaded, reading stdin
        banner += proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err
