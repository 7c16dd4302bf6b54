"""Small, realistic breaks that the rest of the suite let through; each test here fails on its break.

| test | the break it catches |
|---|---|
| test_eval_scores_the_sft_slot_with_its_trained_adapter | eval's SFT slot scoring the CPT model (adapter ignored) |
| test_eval_sft_slot_is_the_chat_vector_model_plus_the_adapter | eval's SFT slot on the CPT model, not the CV model |
| test_cells_are_listed_best_first | cells.csv sorted worst-first (or not sorted) |
| test_a_few_undefined_draws_keep_a_95_percent_interval | a 90% interval in place of the 95% one |
| test_the_kl_term_is_divided_by_the_steps_tokens | the KL term divided by the micro-batch's tokens |
| test_packings_needed_counts_every_micro_batch | packings_needed ignoring gradient_accumulation_steps |
| test_the_dev_set_may_not_ask_a_scored_question | the dev-set overlap check removed (up front or in SFT) |
| test_each_gain_is_judged_by_its_own_threshold | general_logprob judged by eval.min_gain |
| test_qa_mix_above_one_is_refused | cpt.qa_mix's range widened, or 1.5 ending in a raw error |

The data fingerprint (a same-size edit) is in tests/test_cache_keys.py, the offline switches in tests/test_cli.py.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import QA, tiny_overrides, write_jsonl
from test_aggregate import fake_job
from test_levers import CONF, lever_trainer, tok  # noqa: F401  (fixtures)
from pipeline.core.outputs import PipelineError


# --- eval: the SFT slot ---------------------------------------------------------------------------------------------

@pytest.fixture
def trained_adapter(tiny_model, tmp_path):
    """A LoRA adapter with B != 0 (a fresh one has B = 0 and leaves the model unchanged, so scoring the model without
    it would pass), saved with its tokenizer as SFT saves it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_eval_scores_the_sft_slot_with_its_trained_adapter(tiny_model, trained_adapter, tmp_path):
    from peft import PeftModel

    from pipeline.core.config import EvalConfig, ModelConfig
    from pipeline.stages.eval import answer_logprobs, evaluate

    qa = write_jsonl(tmp_path / "qa.jsonl", QA)
    cfg = EvalConfig(models=["cpt", "sft"], max_new_tokens=2)
    out = evaluate(cfg, ModelConfig(path=str(tiny_model)), str(qa),
                   {"cpt": (str(tiny_model), None), "sft": (str(tiny_model), str(trained_adapter))},
                   tmp_path / "eval", "cpu")
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    # what the adapter model gives, computed here with PEFT on its own
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(trained_adapter)).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    contexts = [cfg.completion_prompt.format(question=q["question"]) for q in QA]
    expected = answer_logprobs(model, tokenizer, contexts, [q["answer"] for q in QA], 4, torch.device("cpu"))
    assert [r["sft"]["logprob"] for r in rows] == pytest.approx(expected, abs=1e-4)
    assert all(abs(r["sft"]["logprob"] - r["cpt"]["logprob"]) > 0.01 for r in rows)  # the adapter changes them


def test_eval_sft_slot_is_the_chat_vector_model_plus_the_adapter(tiny_model, data_files, tmp_path, monkeypatch):
    """The whole chain with chat_vector: each stage is replaced by a stub that records what it was given, so the test
    checks run.py's wiring in a second. SFT trains on the chat-vector model, and eval's SFT slot is that same model
    with the SFT adapter; its CPT slot is the plain CPT model."""
    from pipeline.core.outputs import atomic_output
    from pipeline.run import run_pipeline
    from pipeline.stages import chat_vector, cpt, eval as evaluation, merge, sft

    seen = {}

    def stub(name, position, files=()):
        def build(*args, **kwargs):
            seen[name], out = args, args[position]  # the output directory's place in the stage's signature
            with atomic_output(out) as tmp:
                for f in files:
                    (tmp / f).write_text("{}\n" if f.endswith(".json") else "")
            return out
        return build

    monkeypatch.setattr(cpt, "train_cpt", stub("cpt", 4))
    monkeypatch.setattr(merge, "merge_adapter", stub("merge", 3))
    monkeypatch.setattr(chat_vector, "apply_chat_vector", stub("chat_vector", 3))
    monkeypatch.setattr(sft, "train_sft", stub("sft", 5))
    monkeypatch.setattr(evaluation, "evaluate", stub("eval", 4, ("answers.jsonl", "lost_questions.jsonl",
                                                                "eval_metrics.json")))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=tiny_overrides(tiny_model, data_files, **{
            "cache.dir": tmp_path / "cache", "stages": "[cpt,merge,chat_vector,sft,eval]",
            "model.instruct_path": tiny_model}))
    metrics = run_pipeline(cfg, tmp_path / "run")
    cpt_model, cv_model, adapter = metrics["cpt_model"], metrics["cv_model"], metrics["sft_adapter"]
    assert len({cpt_model, cv_model, adapter}) == 3
    assert seen["sft"][3] == cv_model  # train_sft(cfg, model_cfg, data, <the model SFT trains on>, ...)
    models = seen["eval"][3]  # evaluate(cfg, model_cfg, qa_path, <models>, ...)
    assert models["sft"] == (cv_model, adapter) and models["cpt"] == (cpt_model, None)
    assert models["base"] == (str(tiny_model), None)


# --- the sweep's per-cell table ------------------------------------------------------------------------------------

BASE, CPT = [0, 0, 1, 0], [1, 1, 1, 0]


def test_cells_are_listed_best_first(tmp_path):
    """cells.csv: grid cells by sft/contains, best first; a tie keeps the order of the cells' first jobs."""
    from pipeline.aggregate import aggregate

    for job, alpha, sft in [(0, 8, [1, 0, 0, 0]), (1, 16, [1, 1, 1, 0]), (2, 32, [0, 1, 1, 0]), (3, 64, [1, 1, 0, 0]),
                            (4, 128, [0, 0, 0, 0])]:
        fake_job(tmp_path, job, {"sft.lora_alpha": alpha},
                 {"base": {"contains": BASE}, "cpt": {"contains": CPT}, "sft": {"contains": sft}})
    aggregate(tmp_path)
    cells = pd.read_csv(tmp_path / "cells.csv")
    assert list(cells["sft.lora_alpha"]) == [16, 32, 64, 8, 128]
    assert list(cells["sft/contains"]) == [0.75, 0.5, 0.5, 0.25, 0.0]


def test_a_few_undefined_draws_keep_a_95_percent_interval(tmp_path):
    """200 questions, CPT taught 100, SFT kept 50: gain_kept = 0.5, a ratio of means whose standard error is 0.05 by
    the delta method (Var = (Var s - 2R Cov(s, c) + R² Var c) / (n μc²) = 0.5 / 200). eval.min_gain 0.42 makes about
    0.8% of the draws undefined (CPT - base below it), fewer than the 2.5% a tail holds, so the interval is reported:
    a 95% interval is about 2 × 1.96 × 0.05 = 0.196 wide (a 90% one 0.165), however the few undefined draws are
    handled (left out: 0.196; counted at +inf, the numerator's sign: about 0.204)."""
    from pipeline.aggregate import aggregate

    n = 200
    base, cpt, sft = [0] * n, [1] * 100 + [0] * 100, [1] * 50 + [0] * 150
    fake_job(tmp_path, 0, {"sft.lora_alpha": 8},
             {"base": {"contains": base}, "cpt": {"contains": cpt}, "sft": {"contains": sft}}, min_gain=0.42)
    aggregate(tmp_path)
    row = pd.read_csv(tmp_path / "cells.csv").iloc[0]
    assert row["gain_kept/contains"] == 0.5
    assert 0 < row["gain_kept/contains undefined"] < 0.025 * 9999
    width = row["gain_kept/contains ci_high"] - row["gain_kept/contains ci_low"]
    assert 0.185 <= width <= 0.215, width
    assert row["gain_kept/contains ci_low"] < 0.5 < row["gain_kept/contains ci_high"]


# --- SFT's KL term and CPT's packings -------------------------------------------------------------------------------

def test_the_kl_term_is_divided_by_the_steps_tokens(lever_trainer):  # noqa: F811
    """With gradient accumulation the trainer passes the whole step's trained-token count (num_items_in_batch) and
    sums the micro-batches' losses, so each micro-batch's KL sum must be divided by the step's count: with 2 equal
    micro-batches, half the per-micro-batch mean."""
    from test_levers import independent_kl

    trainer, batch = lever_trainer(kl=0.5)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    step_tokens = torch.tensor(2 * tokens)  # this micro-batch and another one as large
    total = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=step_tokens).item()
    trainer.kl_weight = 0.0
    plain = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=step_tokens).item()
    kl_mean = independent_kl(trainer.model, batch)
    assert kl_mean > 1e-3
    assert total - plain == pytest.approx(0.5 * kl_mean * tokens / (2 * tokens), abs=2e-6)


@pytest.mark.parametrize("max_steps, batch, accumulation, blocks, epochs, expected", [
    (3, 2, 4, 5, 1.0, 5),    # 3 steps x 2 x 4 = 24 blocks read, 5 per packing: ceil(24 / 5)
    (3, 2, 1, 5, 1.0, 2),    # without accumulation: ceil(6 / 5)
    (10, 1, 1, 100, 1.0, 1),
    (-1, 2, 4, 5, 2.5, 3),   # num_epochs: ceil(2.5), whatever the batch
])
def test_packings_needed_counts_every_micro_batch(max_steps, batch, accumulation, blocks, epochs, expected):
    from pipeline.core.config import CptConfig
    from pipeline.stages.cpt import packings_needed

    cfg = CptConfig(max_steps=max_steps, batch_size=batch, gradient_accumulation_steps=accumulation,
                    num_epochs=epochs)
    assert packings_needed(cfg, blocks) == expected


# --- the dev set, gain thresholds, cpt.qa_mix ----------------------------------------------------------------------

def test_the_dev_set_may_not_ask_a_scored_question(tiny_model, data_files, tmp_path, tok, monkeypatch):  # noqa: F811
    """Up front (run.validate, before any model loads) and in the SFT stage itself: early stopping on a scored
    question measures SFT on its own stopping data."""
    import transformers

    from pipeline.run import run_pipeline

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the dev set was checked")
    from pipeline.stages.sft import _dev_rows

    dev = write_jsonl(tmp_path / "dev.jsonl", [
        {"id": "d1", "question": "炉-3の点検は何曜日ですか？", "answer": "月曜日"},
        {"id": "d2", "question": QA[1]["question"], "answer": "1150度"}])
    message = (r"data\.dev_qa\.path=.*dev\.jsonl and data\.qa\.path=.*qa\.jsonl ask the same question \('d2' and "
               r"'q2'")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=tiny_overrides(tiny_model, data_files, **{
            "sft.early_stopping_patience": 2, "data.dev_qa.path": dev}))
    with monkeypatch.context() as m, pytest.raises(PipelineError, match=message):
        m.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
        run_pipeline(cfg, tmp_path / "run")
    with pytest.raises(PipelineError, match=message):
        _dev_rows(str(dev), str(data_files["qa"]), tok, "{prompt}")
    assert len(_dev_rows(str(dev), None, tok, "{prompt}")) == 2  # without a scored set there is nothing to keep apart


def test_each_gain_is_judged_by_its_own_threshold():
    """A gain of 0.05: above eval.min_gain 0.02 for a share of questions, below eval.min_logprob_gain 0.1 nats for a
    log-probability, the general-knowledge one included."""
    from pipeline.stages.eval import add_gain_metrics

    for name, defined in (("contains", True), ("general_contains", True), ("logprob", False),
                          ("general_logprob", False)):
        m = {f"base/{name}": -1.0, f"cpt/{name}": -0.95, f"sft/{name}": -0.975}
        add_gain_metrics(m, name, min_gain=0.02, min_logprob_gain=0.1)
        if defined:
            assert m[f"gain_kept/{name}"] == pytest.approx(0.5), name
        else:
            assert m[f"gain_kept/{name}"] is None, name
            assert m[f"gain_kept_reason/{name}"] == "|CPT - base| = 0.05 < eval.min_logprob_gain 0.1", name


@pytest.mark.parametrize("share, refused", [(1.5, True), (1.0001, True), (-0.1, True), (1.0, False)])
def test_qa_mix_above_one_is_refused(share, refused, tiny_model, data_files, tmp_path, capsys):
    """A share of the QA pairs: 0 to 1. Outside, one line naming the key and the range, exit 2."""
    from pipeline.core.config import CptConfig, check_ranges

    cfg = CptConfig(qa_mix=share)
    if not refused:
        check_ranges(cfg, "cpt")
        return
    bound = ">= 0" if share < 0 else "<= 1"
    with pytest.raises(PipelineError) as e:
        check_ranges(cfg, "cpt")
    assert str(e.value) == f"cpt.qa_mix={share}: must be {bound} (share of data.cpt_qa.path's pairs mixed into CPT)"
    if share == 1.5:  # through the command's own path: one line, status 2
        from pipeline.run import run_and_report

        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            composed = compose("config", overrides=tiny_overrides(tiny_model, data_files, **{
                "cpt.qa_mix": share, "data.cpt_qa.path": data_files["qa"]}))
        assert run_and_report(composed, tmp_path / "run") == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert err == [f"error: {e.value}"]
