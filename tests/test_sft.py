"""How SFT records become prompt/completion pairs: chat template, prompt template, BOS, EOS."""

import pytest
from transformers import AutoTokenizer

from pipeline.core.outputs import PipelineError
from pipeline.core.prompts import chat_template_text, render_prompt, to_prompt_completion

MSGS = [{"role": "user", "content": "日本の首都は？"}, {"role": "assistant", "content": "東京です。"}]


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_chat_template_pair(tok):
    # the demo template: the tokenizer adds BOS itself, the completion ends with EOS (TRL then adds no second one)
    pair = to_prompt_completion(MSGS, tok, "unused {prompt}")
    assert pair == {"prompt": "質問: 日本の首都は？\n答え:", "completion": " 東京です。</s>"}


def test_prompt_template_without_chat_template(tok):
    tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok.chat_template = None
    pair = to_prompt_completion(MSGS, tok, "Q: {prompt}\nA:\n")
    assert pair == {"prompt": "Q: 日本の首都は？\nA:\n", "completion": "東京です。"}  # TRL appends EOS
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, *MSGS]
    assert render_prompt(history[:-1], tok, "Q: {prompt}\nA:\n") == "Q: a\nA:\nb\n\nQ: 日本の首都は？\nA:\n"


def test_template_that_writes_bos_is_not_doubled(tok):
    tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert tok("a")["input_ids"][0] == tok.bos_token_id  # this tokenizer adds BOS when encoding
    assert render_prompt(MSGS[:1], tok, "{prompt}") == "日本の首都は？\n"


def test_missing_jinja_file_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match=r"model.chat_template=.*nope.jinja: no such .jinja file"):
        chat_template_text(str(tmp_path / "nope.jinja"))
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    assert chat_template_text(str(tmp_path / "t.jinja")) == "{{ messages }}"
    assert chat_template_text("{{ x }}") == "{{ x }}"


def test_the_loss_line_shows_a_curve_only_when_there_is_one():
    from types import SimpleNamespace

    from pipeline.core.training import loss_summary

    def trainer(history):
        return SimpleNamespace(state=SimpleNamespace(log_history=history))

    curve = [{"loss": 2.5, "step": 10}, {"loss": 1.25, "step": 20}, {"train_loss": 1.8, "step": 20}]
    assert loss_summary(trainer(curve), 1.8) == "loss 2.5000 -> 1.2500"
    # 8 steps with logging_steps=10: only the mean is known, and the line says so instead of "loss x -> x"
    short = [{"train_loss": 2.1754, "step": 8}]
    assert loss_summary(trainer(short), 2.1754).startswith("mean loss 2.1754 (fewer steps than")
