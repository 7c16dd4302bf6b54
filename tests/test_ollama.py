"""The Ollama Modelfile's TEMPLATE renders a chat exactly as the tokenizer's chat template does, for every family."""

import pytest
from transformers import AutoTokenizer

from pipeline.core.ollama import Untranslatable, go_template, modelfile, render_go, template_pieces
from pipeline.core.prompts import chat_text
from pipeline.demo_model import CHAT_TEMPLATE as DEMO

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# SmolLM2-135M-Instruct's own template (as its tokenizer ships it): ChatML with a default system message
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
           "<|im_end|>\n' }}"
           "{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Meta-Llama-3-Instruct's: BOS written by the template, contents trimmed
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
          "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# llm-jp-3-*-instruct's: a fixed instruction header for any system message, EOS after each answer
LLM_JP_3 = ("{{bos_token}}{% for message in messages %}{% if message['role'] == 'user' %}"
            "{{ '\\n\\n### 指示:\\n' + message['content'] }}{% elif message['role'] == 'system' %}"
            "{{ '以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。' }}"
            "{% elif message['role'] == 'assistant' %}{{ '\\n\\n### 応答:\\n' + message['content'] + "
            "eos_token }}{% endif %}{% if loop.last and add_generation_prompt %}{{ '\\n\\n### 応答:\\n' }}{% endif %}"
            "{% endfor %}")
# Mistral's folds the system message into the first user turn: not a sequence of per-role pieces
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{% if loop.index0 == 1 and "
           "messages[0]['role'] == 'system' %}[INST] {{ messages[0]['content'] }}\n\n{{ m['content'] }} [/INST]"
           "{% else %}[INST] {{ m['content'] }} [/INST]{% endif %}{% elif m['role'] == 'assistant' %}"
           "{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")

TWO_TURNS = [{"role": "user", "content": "P-101の定格能力は？"}, {"role": "assistant", "content": "880トンです。"},
             {"role": "user", "content": "担当者は誰ですか？"}]


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def renderer(tok, template):
    tok.chat_template = template
    return lambda messages, gen: chat_text(messages, tok, gen)


@pytest.mark.parametrize("template", [DEMO, CHATML, SMOLLM2, LLAMA3, LLM_JP_3],
                         ids=["demo", "chatml", "smollm2", "llama3", "llm_jp_3"])
@pytest.mark.parametrize("system", [None, "工場の質問に答えてください。"])
def test_two_turn_chat_renders_as_the_chat_template(tok, template, system):
    render = renderer(tok, template)
    mf = modelfile(render, ["</s>"])
    chat = ([{"role": "system", "content": system}] if system else []) + TWO_TURNS
    assert render_go(mf["template"], chat, mf["system"]) == render(chat, True)


def test_chatml_modelfile_by_hand(tok):
    mf = modelfile(renderer(tok, SMOLLM2), ["<|im_end|>"])
    assert mf["text"] == (
        'FROM ./model\n\n'
        'TEMPLATE """{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n'
        '{{ end }}{{ end }}<|im_start|>assistant\n"""\n'
        'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""\n'
        'PARAMETER stop "<|im_end|>"\n')
    # Ollama puts SYSTEM first when the request has none: the default system message, as the chat template writes it
    assert render_go(mf["template"], TWO_TURNS[:1], mf["system"]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nP-101の定格能力は？<|im_end|>\n<|im_start|>assistant\n")


def test_llama3_bos_is_left_to_the_runtime(tok):
    """The template writes BOS and the tokenizer adds it: the TEMPLATE has none (llama.cpp adds it)."""
    mf = modelfile(renderer(tok, LLAMA3), [])
    assert "<s>" not in mf["template"] and mf["system"] is None
    assert render_go(mf["template"], TWO_TURNS[:1]) == (
        "<|start_header_id|>user<|end_header_id|>\n\nP-101の定格能力は？<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_fixed_system_text_of_llm_jp_3(tok):
    pieces = template_pieces(renderer(tok, LLM_JP_3))
    assert pieces.system == ("以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。", None)
    assert pieces.user == ("\n\n### 指示:\n", "") and pieces.assistant == ("\n\n### 応答:\n", "</s>")


def test_untranslatable_template_is_refused(tok):
    with pytest.raises(Untranslatable, match="system message"):
        modelfile(renderer(tok, MISTRAL), [])


def test_delimiters_in_text_are_quoted(tok):
    pieces = template_pieces(renderer(tok, "{% for m in messages %}{{ '{{' }}{{ m['content'] }}}}\n{% endfor %}"
                                           "{% if add_generation_prompt %}>{% endif %}"))
    template = go_template(pieces)
    assert '{{ "{{" }}' in template
    assert render_go(template, TWO_TURNS[:1]) == "{{P-101の定格能力は？}}\n>"


def test_render_go_refuses_what_it_cannot_render():
    with pytest.raises(ValueError, match="unsupported"):
        render_go("{{ range .Messages }}{{ .Images }}{{ end }}", TWO_TURNS)
    with pytest.raises(ValueError, match="missing"):
        render_go("{{ range .Messages }}{{ .Content }}", TWO_TURNS)
