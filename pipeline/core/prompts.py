"""Prompt rendering: how a conversation becomes the text a model reads, for SFT and for the SFT model's eval.

A tokenizer with a chat template renders it (model.chat_template may replace the tokenizer's own); one without uses
model.prompt_template. SFT trains on these strings, and eval must ask the SFT model in exactly the same format: the
format SFT used is therefore recorded next to the adapter (prompt_format.json) and eval reads it from there, so a
later change of model.prompt_template or model.chat_template cannot silently change how an existing adapter is asked.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional

from pipeline.core.outputs import PipelineError, write_json

log = logging.getLogger(__name__)

PROMPT_FORMAT_FILE = "prompt_format.json"


def chat_template_text(spec: Optional[str]) -> Optional[str]:
    """model.chat_template: a path ending in .jinja (must exist) or the Jinja template itself."""
    if spec and spec.endswith(".jinja"):
        if not Path(spec).is_file():
            raise PipelineError(f"model.chat_template={spec}: no such .jinja file")
        return Path(spec).read_text(encoding="utf-8")
    return spec


def apply_chat_template_override(tokenizer, model_cfg) -> None:
    """model.chat_template replaces the tokenizer's own template."""
    text = chat_template_text(model_cfg.chat_template)
    if text:
        tokenizer.chat_template = text


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def chat_text(messages: List[dict], tokenizer, add_generation_prompt: bool = True) -> str:
    """`messages` through the tokenizer's chat template, without a BOS text the tokenizer adds itself anyway."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    # The tokenizer adds BOS itself when encoding; a template that also writes it would double it.
    if tokenizer.bos_token and _adds_bos(tokenizer) and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token):]
    return text


def render_prompt(messages: List[dict], tokenizer, prompt_template: str) -> str:
    """The text the model sees before it answers: chat template with generation prompt, or the prompt template."""
    if tokenizer.chat_template:
        return chat_text(messages, tokenizer)
    parts, history = [], []
    for m in messages:
        if m["role"] == "assistant":
            parts.append(prompt_template.format(prompt="\n".join(history)) + m["content"] + "\n\n")
            history = []
        else:
            history.append(m["content"])
    return "".join(parts) + prompt_template.format(prompt="\n".join(history))


def chat_template_from_prompt_template(prompt_template: str) -> str:
    """A Jinja chat template that renders exactly what render_prompt renders with `prompt_template` (a tokenizer
    without a chat template), so that an exported model carries the format its SFT adapter was trained with: the
    user turns since the last answer joined by newlines into {prompt}, each earlier answer followed by a blank line
    (and, as trained, the model's own answer by EOS)."""
    before, _, after = prompt_template.partition("{prompt}")
    raw = lambda text: "{% raw %}" + text + "{% endraw %}" if text else ""  # noqa: E731  literal text, never Jinja
    turn = raw(before) + "{{ ns.history | join('\\n') }}" + raw(after)
    return ("{% set ns = namespace(history=[]) %}{% for m in messages %}{% if m['role'] == 'assistant' %}" + turn
            + "{{ m['content'] }}" + raw("\n\n") + "{% set ns.history = [] %}{% else %}"
            "{% set ns.history = ns.history + [m['content']] %}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}" + turn + "{% endif %}")


def to_prompt_completion(messages: List[dict], tokenizer, prompt_template: str) -> dict:
    prompt = render_prompt(messages[:-1], tokenizer, prompt_template)
    answer = messages[-1]["content"]
    if not tokenizer.chat_template:
        return {"prompt": prompt, "completion": answer}  # TRL appends EOS
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if tokenizer.bos_token and _adds_bos(tokenizer) and full.startswith(tokenizer.bos_token):
        full = full[len(tokenizer.bos_token):]
    if not full.startswith(prompt):
        raise PipelineError("the chat template renders a conversation's prompt differently on its own and inside the "
                            "full conversation; set model.chat_template to a template without that quirk")
    completion = full[len(prompt):]
    if completion.rstrip().endswith(tokenizer.eos_token):
        completion = completion.rstrip()  # TRL appends EOS unless the completion already ends with it
    return {"prompt": prompt, "completion": completion}


def write_prompt_format(out_dir: str | Path, tokenizer, prompt_template: str) -> None:
    """Record the format SFT trained with: the chat template actually used (null: none, the prompt template was)."""
    write_json(Path(out_dir) / PROMPT_FORMAT_FILE,
               {"chat_template": tokenizer.chat_template or None, "prompt_template": prompt_template})


def use_recorded_prompt_format(tokenizer, adapter_dir: str | Path, model_cfg) -> str:
    """Give `tokenizer` the chat template the SFT adapter at `adapter_dir` was trained with; return its prompt template.

    Adapters written before the format was recorded fall back to the current config (with a warning): their prompts
    are right only if model.chat_template / model.prompt_template did not change since SFT.
    """
    path = Path(adapter_dir) / PROMPT_FORMAT_FILE
    if not path.is_file():
        log.warning("%s: no %s (an adapter from an older version); the SFT model's prompts follow the current "
                    "model.chat_template / model.prompt_template, which may differ from what SFT trained with",
                    adapter_dir, PROMPT_FORMAT_FILE)
        apply_chat_template_override(tokenizer, model_cfg)
        return model_cfg.prompt_template
    try:
        fmt = json.loads(path.read_text(encoding="utf-8"))
        chat_template, prompt_template = fmt["chat_template"], fmt["prompt_template"]
    except (ValueError, KeyError, TypeError):
        raise PipelineError(f"{path}: not a prompt format record (JSON with chat_template and prompt_template)") \
            from None
    if not isinstance(prompt_template, str) or not isinstance(chat_template, (str, dict, type(None))):
        raise PipelineError(f"{path}: chat_template must be a string or null and prompt_template a string")
    tokenizer.chat_template = chat_template
    return prompt_template
