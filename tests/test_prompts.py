"""The prompt format SFT trained with is recorded next to the adapter and read back by eval."""

import pytest
from transformers import AutoTokenizer

from pipeline.core.outputs import PipelineError
from pipeline.core.config import ModelConfig
from pipeline.core.prompts import PROMPT_FORMAT_FILE, use_recorded_prompt_format, write_prompt_format


@pytest.fixture
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_the_recorded_format_round_trips(tok, tiny_model, tmp_path):
    template = tok.chat_template
    write_prompt_format(tmp_path, tok, "Q: {prompt}\nA:")
    other = AutoTokenizer.from_pretrained(tiny_model)
    other.chat_template = "{{ 'changed since SFT' }}"
    assert use_recorded_prompt_format(other, tmp_path, ModelConfig(prompt_template="now {prompt}")) == "Q: {prompt}\nA:"
    assert other.chat_template == template


def test_no_chat_template_is_recorded_as_null(tok, tiny_model, tmp_path):
    import json

    tok.chat_template = None
    write_prompt_format(tmp_path, tok, "Q: {prompt}\nA:")
    assert json.loads((tmp_path / PROMPT_FORMAT_FILE).read_text()) == {"chat_template": None,
                                                                       "prompt_template": "Q: {prompt}\nA:"}
    other = AutoTokenizer.from_pretrained(tiny_model)  # has a template: SFT did not use one, so neither does eval
    use_recorded_prompt_format(other, tmp_path, ModelConfig())
    assert other.chat_template is None


def test_an_adapter_without_the_record_follows_the_config(tok, tmp_path, caplog):
    cfg = ModelConfig(prompt_template="now {prompt}", chat_template="{{ 'configured' }}")
    assert use_recorded_prompt_format(tok, tmp_path, cfg) == "now {prompt}"
    assert tok.chat_template == "{{ 'configured' }}"
    assert f"no {PROMPT_FORMAT_FILE}" in caplog.text


def test_a_broken_record_names_the_file(tok, tmp_path):
    (tmp_path / PROMPT_FORMAT_FILE).write_text('{"prompt_template": 3}')
    with pytest.raises(PipelineError, match=f"{PROMPT_FORMAT_FILE}: not a prompt format record"):
        use_recorded_prompt_format(tok, tmp_path, ModelConfig())
