"""The console a person reads: a progress bar per training stage, a line per finished stage, the table; the trainer's
per-step dicts and library messages in run.log only."""

import logging

import pytest

from conftest import tiny_overrides
from pipeline.core.progress import ConsoleFilter, ConsoleFormatter, attach_progress, loss_history
from test_cli import run_cli


def record(name, level, console=False):
    r = logging.LogRecord(name, level, __file__, 1, "message", None, None)
    if console:
        r.console = True
    return r


@pytest.mark.parametrize("name, level, console, shown", [
    ("pipeline.run", logging.INFO, True, True),          # log.info(..., extra=CONSOLE): a stage finished
    ("pipeline.stages.cpt", logging.INFO, False, False),        # details: run.log only
    ("pipeline.steps", logging.INFO, False, False),      # the trainer's per-step dicts
    ("pipeline.stages.sft", logging.WARNING, False, True),      # the pipeline's warnings change what a result means
    ("transformers.modeling_utils", logging.WARNING, False, False),  # library warnings: run.log only
    ("py.warnings", logging.WARNING, False, False),      # warnings.warn (deprecations) captured by logging
    ("peft.tuners", logging.ERROR, False, True),         # errors from anywhere
])
def test_console_filter(name, level, console, shown):
    assert ConsoleFilter().filter(record(name, level, console)) is shown


def test_console_format():
    fmt = ConsoleFormatter("%(message)s")
    assert fmt.format(record("pipeline.run", logging.INFO, True)) == "message"
    assert fmt.format(record("pipeline.stages.sft", logging.WARNING)) == "warning: message"
    assert fmt.format(record("peft.tuners", logging.ERROR)) == "error [peft.tuners]: message"


def test_trainer_prints_a_bar_and_logs_the_dicts(tiny_model, tmp_path, capsys, caplog):
    """attach_progress replaces the Trainer's printer: stderr gets one bar, the dicts go to the pipeline.steps
    logger."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from pipeline.stages.cpt import collate_blocks

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    blocks = [[5 + i % 7 for i in range(16)]] * 8
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=4, per_device_train_batch_size=2,
                             logging_steps=1, save_strategy="no", report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": blocks}),
                      data_collator=collate_blocks(0))
    attach_progress(trainer, "cpt")
    assert not any(isinstance(cb, (ProgressCallback, PrinterCallback)) for cb in trainer.callback_handler.callbacks)
    with caplog.at_level(logging.INFO, logger="pipeline.steps"):
        trainer.train()
    out = capsys.readouterr()
    assert "{'loss'" not in out.out + out.err
    bar = out.err.replace("\r", "\n").strip().splitlines()[-1]
    assert bar.startswith("cpt: 100%") and "4/4 steps" in bar and "loss " in bar and "tokens/s" in bar
    steps = [r.getMessage() for r in caplog.records if r.name == "pipeline.steps"]
    assert sum("'loss'" in s for s in steps) == 4 and steps[0].startswith("cpt step 1/4: {")
    assert [s for s, _ in loss_history(trainer)] == [1, 2, 3, 4]


def test_a_run_prints_bars_stage_lines_and_the_table(tiny_model, data_files, tmp_path):
    """The whole chain on the command line: a few lines on the console, the details in run.log."""
    run = tmp_path / "run"
    r = run_cli(tiny_overrides(tiny_model, data_files, **{"hydra.run.dir": run, "cpt.logging_steps": 1,
                                                          "sft.logging_steps": 1, "cache.enabled": "false"}))
    assert r.returncode == 0, r.stderr[-3000:]
    console = (r.stdout + r.stderr).replace("\r", "\n")
    assert "{'loss'" not in console and "[INFO]" not in console
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    stage_lines = [line for line in lines if line.startswith("== stage ")]
    assert [line.split()[2:4] for line in stage_lines] == [["cpt", "built"], ["merge", "built"], ["sft", "built"],
                                                           ["eval", "built"]]
    assert lines[-1] == f"run directory: {run}" and any(line.startswith("headline") for line in lines)
    assert any(line.startswith("cpt: 100%") for line in r.stderr.replace("\r", "\n").splitlines())
    assert len(lines) < 30, r.stdout
    log = (run / "run.log").read_text(encoding="utf-8")
    assert "cpt step 1/3: {'loss'" in log and "sft step 3/3: {'loss'" in log and "CPT data:" in log
