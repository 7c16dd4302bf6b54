"""All four stages end to end on a tiny model, through the same composed config a user gets."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_tiny_model, tiny_overrides
from pipeline.core.checkpoints import model_identity
from pipeline.core.outputs import PipelineError, is_complete
from pipeline.run import run_pipeline

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=overrides)


def test_all_stages(tiny_model, data_files, tmp_path):
    cfg = compose_cfg(tiny_overrides(tiny_model, data_files, **{"cpt.lora_alpha": 64, "sft.target_modules": "attn"}))
    metrics = run_pipeline(cfg, tmp_path)

    for d in ("cpt_adapter", "cpt_model", "sft_adapter", "eval"):
        assert is_complete(tmp_path / d), d
    assert (tmp_path / "config.yaml").is_file()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for kind in ("base", "cpt", "sft"):
        for m in ("exact_match", "contains", "char_f1", "logprob"):
            assert f"{kind}/{m}" in saved
    assert 0.0 <= saved["sft/eos_rate"] <= 1.0
    assert saved["knowledge_gain"] == pytest.approx(saved["cpt/contains"] - saved["base/contains"])
    assert saved["cpt_gain/logprob"] == pytest.approx(saved["cpt/logprob"] - saved["base/logprob"])
    # the swept values are recorded next to the results
    assert saved["cpt.lora_alpha"] == 64 and saved["sft.target_modules"] == "attn" and saved["seed"] == 42

    lines = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["q1", "q2", "q3"]
    assert {"base", "cpt", "sft"} <= set(lines[0]) and "answer" in lines[0]["sft"]
    assert "ended_with_eos" in lines[0]["sft"]

    # the CPT model is a standalone checkpoint that plain transformers loads
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "cpt_model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "cpt_model")
    assert tok.chat_template and merged(torch.tensor([[1, 2, 3]])).logits.shape[-1] == len(tok)
    check = json.loads((tmp_path / "cpt_model" / "merge_check.json").read_text())
    assert check["max_abs_logit_diff"] <= 1e-4 and check["reload_max_abs_logit_diff"] <= 1e-5
    cpt_stats = json.loads((tmp_path / "cpt_adapter" / "cpt_stats.json").read_text())
    assert cpt_stats["modules_to_save"] == ["embed_tokens", "lm_head"]  # the default attn_mlp_embed

    # each output records what it is, its base and the output it was made from (pipeline/core/lineage.py)
    lineage = {d: json.loads((tmp_path / d / "lineage.json").read_text())
               for d in ("cpt_adapter", "cpt_model", "sft_adapter")}
    assert [r["kind"] for r in lineage.values()] == ["cpt_adapter", "cpt_model", "sft_adapter"]
    assert {r["base"]["identity"] for r in lineage.values()} == {model_identity(tiny_model)}
    assert lineage["cpt_adapter"]["parent"] is None
    assert lineage["cpt_model"]["parent"] == {"kind": "cpt_adapter", "id": lineage["cpt_adapter"]["id"]}
    assert lineage["sft_adapter"]["parent"] == {"kind": "cpt_model", "id": lineage["cpt_model"]["id"]}


# Each question's transition from whether the base, CPT and SFT answers contain the gold answer (README,
# "transitions/<kind>"): the base knew it; else CPT taught it and SFT kept or lost it; else SFT alone has it, or none.
TRANSITION_OF = {(True, False, False): "known_before", (True, False, True): "known_before",
                 (True, True, False): "known_before", (True, True, True): "known_before",
                 (False, True, True): "learned_kept", (False, True, False): "learned_lost",
                 (False, False, False): "not_learned", (False, False, True): "sft_only"}


@torch.no_grad()
def word_logprob(model, tok, prompt, word):
    """log P(word | prompt) summed over the word's tokens, the trailing space of the prompt moved to the word (as
    eval scores answers): the judge's quantity, computed here on its own, one unpadded sequence at a time."""
    context = prompt.rstrip(" ")
    ctx = tok(context)["input_ids"]
    whole = tok(context + prompt[len(context):] + word)["input_ids"]
    assert whole[:len(ctx)] == ctx
    logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def test_forgetting_measurements(tiny_model, data_files, tmp_path):
    """General-knowledge QA, held-out perplexity, transitions, format and a local judge, all in one run."""
    from pipeline.core.scoring import contains

    cfg = compose_cfg(tiny_overrides(tiny_model, data_files, **{
        "data.general_qa.path": data_files["qa"], "data.heldout.path": data_files["cpt"],
        "eval.expected_format": "'.{1,30}'", "eval.judge_path": tiny_model}))
    m = run_pipeline(cfg, tmp_path)
    for kind in ("base", "cpt", "sft"):
        assert 0 <= m[f"{kind}/general_contains"] <= 1 and m[f"{kind}/heldout_ppl"] > 1
    assert 0 <= m["sft/format_rate"] <= 1 and 0 <= m["sft/repetition_rate"] <= 1
    answers = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    lost = [json.loads(x) for x in (tmp_path / "lost_questions.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers if a["transition"] == "learned_lost"] == [x["id"] for x in lost]
    assert "judge" in answers[0]["sft"] and "in_format" in answers[0]["sft"]

    # transitions: each question's from its three answers, and the counts from those
    expected = []
    for a in answers:
        for k in ("base", "cpt", "sft"):
            assert a[k]["contains"] == contains(a[k]["answer"], a["gold"], a["aliases"]), (k, a["id"])
        expected.append(TRANSITION_OF[tuple(a[k]["contains"] == 1.0 for k in ("base", "cpt", "sft"))])
    assert [a["transition"] for a in answers] == expected
    assert {t: m[f"transitions/{t}"] for t in set(TRANSITION_OF.values())} == {
        t: expected.count(t) for t in set(TRANSITION_OF.values())}

    # the judge: each answer's verdict recomputed with the judge model, and each model's score their mean
    judge = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    judge_tok = AutoTokenizer.from_pretrained(tiny_model)
    for kind in ("base", "cpt", "sft"):
        for a in answers:
            prompt = cfg.eval.judge_prompt.format(question=a["question"], gold=a["gold"], answer=a[kind]["answer"])
            yes, no = (word_logprob(judge, judge_tok, prompt, w) for w in ("はい", "いいえ"))
            assert a[kind]["judge"] == float(yes > no), (kind, a["id"], yes, no)
        assert m[f"{kind}/judge"] == pytest.approx(sum(a[kind]["judge"] for a in answers) / len(answers))


def test_prefix_then_rest_from_inputs(tiny_model, data_files, tmp_path):
    first = tmp_path / "first"
    m = run_pipeline(compose_cfg(tiny_overrides(tiny_model, data_files, stages="[cpt,merge]")), first)
    assert is_complete(first / "cpt_model") and not (first / "sft_adapter").exists()
    assert "base/contains" not in m and not (first / "answers.jsonl").exists()

    second = tmp_path / "second"
    cfg = compose_cfg(tiny_overrides(tiny_model, data_files, stages="[sft,eval]",
                                     **{"inputs.cpt_model": first / "cpt_model"}))
    m = run_pipeline(cfg, second)
    assert "sft/contains" in m and not (second / "cpt_adapter").exists()


def test_missing_input_for_a_later_stage(tiny_model, data_files, tmp_path):
    cfg = compose_cfg(tiny_overrides(tiny_model, data_files, stages="[sft]"))
    with pytest.raises(PipelineError, match=r"stage sft needs a cpt model: add merge to stages or set "
                                            r"inputs.cpt_model=PATH"):
        run_pipeline(cfg, tmp_path)


def test_half_built_output_is_not_accepted_as_input(tiny_model, data_files, tmp_path):
    fake = tmp_path / "cpt_model"
    fake.mkdir()
    (fake / "config.json").write_text("{}")
    cfg = compose_cfg(tiny_overrides(tiny_model, data_files, stages="[sft]", **{"inputs.cpt_model": fake}))
    with pytest.raises(PipelineError, match="not a completed stage output"):
        run_pipeline(cfg, tmp_path / "run")


@pytest.mark.parametrize("tie, chat", [(True, True), (False, False)])
def test_tied_embeddings_and_prompt_template(tmp_path, data_files, tie, chat):
    """A tied model trains embeddings through one shared copy and merges exactly; no chat template → prompt_template."""
    model = make_tiny_model(tmp_path / "model", tie=tie, chat_template=chat)
    run_pipeline(compose_cfg(tiny_overrides(model, data_files)), tmp_path / "run")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "cpt_model")
    assert (merged.get_input_embeddings().weight is merged.get_output_embeddings().weight) == tie
    check = json.loads((tmp_path / "run" / "cpt_model" / "merge_check.json").read_text())
    assert check["tied_embeddings"] == tie and check["max_abs_logit_diff"] <= 1e-4


@pytest.mark.parametrize("overrides, message", [
    ({"stages": "[eval]", "eval.models": "[]"}, r"eval.models=\[\]: none of these models is available"),
    ({"stages": "[eval]", "eval.models": "[sft]"}, r"none of these models is available in this run"),
    ({"stages": "[eval]", "inputs.sft_adapter": "SELF"}, r"inputs.sft_adapter is set but there is no CPT model"),
])
def test_eval_inputs_that_cannot_work(tiny_model, data_files, tmp_path, overrides, message):
    if overrides.get("inputs.sft_adapter") == "SELF":
        run_pipeline(compose_cfg(tiny_overrides(tiny_model, data_files, stages="[cpt,merge,sft]")), tmp_path / "a")
        overrides = {**overrides, "inputs.sft_adapter": tmp_path / "a" / "sft_adapter"}
    with pytest.raises(PipelineError, match=message):
        run_pipeline(compose_cfg(tiny_overrides(tiny_model, data_files, **overrides)), tmp_path / "run")
