"""The export stage: a standalone checkpoint that plain transformers loads and that answers as eval's SFT model."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from conftest import tiny_overrides
from pipeline.core.outputs import PipelineError, is_complete
from pipeline.core.prompts import chat_template_from_prompt_template, render_prompt
from pipeline.run import run_pipeline
from pipeline.stages.export import stop_token_ids

CONF = str(Path(__file__).resolve().parents[1] / "conf")
FULL = "[cpt,merge,sft,eval,export]"


def replace_tokens(gen, n):
    gen.max_new_tokens, gen.do_sample = n, False  # greedy, eval.max_new_tokens of tiny_overrides
    return gen


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.fixture(scope="module")
def exported(tiny_model, data_files, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    metrics = run_pipeline(compose_cfg(tiny_overrides(tiny_model, data_files, stages=FULL)), run)
    return run, metrics


def test_export_answers_as_the_evaluated_sft_model(exported):
    run, metrics = exported
    assert is_complete(run / "export")
    model_dir = run / "export" / "model"
    # plain transformers, nothing from the pipeline: the checkpoint, its chat template and its generation config
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    gen = GenerationConfig.from_pretrained(model_dir)
    assert tok.eos_token_id in (gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])
    for line in (run / "answers.jsonl").read_text().splitlines():
        row = json.loads(line)
        text = tok.apply_chat_template([{"role": "user", "content": row["question"]}], add_generation_prompt=True,
                                       tokenize=False)
        ids = tok(text, return_tensors="pt")["input_ids"]  # the tokenizer adds BOS (the demo template writes none)
        with torch.no_grad():
            out = model.generate(ids, generation_config=replace_tokens(gen, 6))
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        answer = text.lstrip().split("\n")[0].strip().rstrip("\ufffd").strip()  # eval's cut: the first line
        assert answer == row["sft"]["answer"], row["id"]
    check = json.loads((run / "export" / "export_check.json").read_text())
    assert check["answers"]["answers_same_as_eval"] == check["answers"]["questions"] == 3
    assert check["merge"]["max_abs_logit_diff"] <= check["merge"]["tolerance"]
    assert metrics["export/answers_same_as_eval"] == 1.0


def test_export_card_and_modelfile(exported, tiny_model):
    run, _ = exported
    card = (run / "export" / "model" / "README.md").read_text()
    assert str(tiny_model) in card and "## Evaluation on the QA set" in card and "pipeline version" in card
    for stage in ("cpt", "merge", "sft", "eval"):
        assert f"### {stage}\n" in card
    assert "| sft |" in card and "[" in card  # the eval table with its intervals
    modelfile = (run / "export" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model\n") and 'PARAMETER stop "</s>"' in modelfile
    assert not (run / "export" / "model" / ".complete").exists()


def test_export_is_cached(exported, tiny_model, data_files, tmp_path):
    metrics = run_pipeline(compose_cfg(tiny_overrides(tiny_model, data_files, stages=FULL)), tmp_path)
    assert metrics["stage/export"] == "reused"
    # another dtype is another export; the stages before it are reused
    metrics = run_pipeline(compose_cfg(tiny_overrides(tiny_model, data_files, stages=FULL,
                                                      **{"export.dtype": "bfloat16"})), tmp_path / "bf16")
    assert metrics["stage/export"] == "built" and metrics["stage/sft"] == "reused"
    assert json.loads((tmp_path / "bf16" / "export" / "model" / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_needs_the_final_model(tiny_model, data_files, tmp_path):
    with pytest.raises(PipelineError, match="stage export needs the final chat model"):
        run_pipeline(compose_cfg(tiny_overrides(tiny_model, data_files, stages="[cpt,merge,export]")), tmp_path)


def test_gguf_refused_before_anything_runs(tiny_model, data_files, tmp_path):
    converter = tmp_path / "llama.cpp"
    (converter / "gguf-py").mkdir(parents=True)
    (converter / "convert_hf_to_gguf.py").write_text("")
    cases = {"[f16]": ("/nowhere", "make gguf-converter"), "[q3]": (converter, "unknown type 'q3'"),
             "[q4_k_m]": (converter, "llama-quantize")}
    for types, (where, message) in cases.items():
        with pytest.raises(PipelineError, match=message):
            run_pipeline(compose_cfg(tiny_overrides(tiny_model, data_files, stages=FULL, **{
                "export.gguf": types, "export.llama_cpp": where})), tmp_path / types)
        assert not (tmp_path / types / "cpt_adapter").exists()


def test_stop_tokens_of_chatml(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert tok.convert_ids_to_tokens(stop_token_ids(tok)) == ["</s>", "<|im_end|>"]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    assert tok.convert_ids_to_tokens(stop_token_ids(tok)) == ["</s>"]


def test_prompt_template_becomes_a_chat_template(tiny_model):
    """An adapter trained with model.prompt_template (no chat template) is exported with a chat template that renders
    the same text, multi-turn history included."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = None
    template = "### 指示:\n{prompt}\n\n### 応答:\n"
    chat = [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "a."},
            {"role": "user", "content": "B"}, {"role": "user", "content": "C?"}]
    expected = "### 指示:\nA?\n\n### 応答:\na.\n\n### 指示:\nB\nC?\n\n### 応答:\n"
    assert render_prompt(chat, tok, template) == expected
    tok.chat_template = chat_template_from_prompt_template(template)
    assert render_prompt(chat, tok, template) == expected


def test_chat_asks_the_export_in_sfts_place(exported, data_files, capsys):
    from pipeline import chat

    run, _ = exported
    assert chat.main([str(run), "--question-file", str(data_files["qa"]), "--models", "cpt,sft"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["question", "cpt", "export"]
    for line, row in zip(lines[2:], map(json.loads, (run / "answers.jsonl").read_text().splitlines())):
        assert [c.strip() for c in line.strip("|").split("|")] == [row["question"], row["cpt"]["answer"],
                                                                   row["sft"]["answer"]]
