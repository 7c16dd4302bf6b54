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


def render_prompt(messages: List[dict], tokenizer, prompt_template: str) -> str:
    """The text the model sees before it answers: chat template with generation prompt, or the prompt template."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The tokenizer adds BOS itself when encoding; a template that also writes it would double it.
        if tokenizer.bos_token and _adds_bos(tokenizer) and text.startswith(tokenizer.bos_token):
            text = text[len(tokenizer.bos_token):]
        return text
    parts, history = [], []
    for m in messages:
        if m["role"] == "assistant":
            parts.append(prompt_template.format(prompt="\n".join(history)) + m["content"] + "\n\n")
            history = []
        else:
            history.append(m["content"])
    return "".join(parts) + prompt_template.format(prompt="\n".join(history))


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


# --- templates checked before any model loads (run.validate) -----------------------------------------------------

# Each format-string key: the fields it is formatted with, and those it must contain. A prompt_template without
# {prompt} would train SFT on prompts that never contain the question; a completion_prompt without {question} would
# ask every question the same thing.
FORMAT_FIELDS = {
    "model.prompt_template": ({"prompt"}, {"prompt"}),
    "eval.completion_prompt": ({"question"}, {"question"}),
    "cpt.qa_template": ({"question", "answer"}, {"question", "answer"}),
    "eval.judge_prompt": ({"question", "gold", "answer"}, {"gold", "answer"}),
}


def check_format(template: str, key: str) -> None:
    """A format-string key must use only its fields (literal braces doubled: {{ }}) and contain the required ones."""
    import string

    allowed, required = FORMAT_FIELDS[key]
    fields_used = set()
    try:
        for _, name, spec, conv in string.Formatter().parse(template):
            if name is None:
                continue
            base = name.split(".")[0].split("[")[0]
            if base not in allowed:
                raise PipelineError(f"{key}={template!r}: unknown field {{{name}}}; it may use "
                                    f"{', '.join('{%s}' % f for f in sorted(allowed))} (write a literal brace as "
                                    f"{{{{ or }}}})")
            fields_used.add(base)
        template.format(**{f: "x" for f in allowed})  # conversions and format specs (e.g. {prompt!z}, {prompt:d})
    except PipelineError:
        raise
    except (ValueError, KeyError, IndexError, AttributeError) as e:
        raise PipelineError(f"{key}={template!r}: not a valid format string ({e}); write a literal brace as {{{{ "
                            f"or }}}}") from None
    missing = sorted(required - fields_used)
    if missing:
        what = {"prompt": "the question", "question": "the question", "answer": "the answer", "gold": "the gold answer"}
        raise PipelineError(f"{key}={template!r}: has no {', '.join('{%s}' % f for f in missing)}, so "
                            f"{' and '.join(what[f] for f in missing)} would never reach the model")


SAMPLE_CONVERSATION = [{"role": "user", "content": "質問の例です。"}, {"role": "assistant", "content": "回答の例です。"}]


def check_chat_template(tokenizer, model_cfg, where: str, full: bool = True) -> None:
    """The chat template SFT and eval will use (model.chat_template, else the tokenizer's) parses as Jinja and renders
    a sample conversation: its prompt, as eval asks it, and (`full`, for SFT) the whole conversation too."""
    apply_chat_template_override(tokenizer, model_cfg)
    if not tokenizer.chat_template:
        return
    source = "model.chat_template" if model_cfg.chat_template else f"the chat template of {where}"
    try:
        if full:
            to_prompt_completion(SAMPLE_CONVERSATION, tokenizer, model_cfg.prompt_template)
        else:
            render_prompt(SAMPLE_CONVERSATION[:1], tokenizer, model_cfg.prompt_template)
    except PipelineError:
        raise
    except Exception as e:  # jinja2's TemplateSyntaxError, UndefinedError, raise_exception(...) of the template
        line = f" line {e.lineno}" if getattr(e, "lineno", None) else ""
        raise PipelineError(f"{source}: does not render a sample user/assistant conversation "
                            f"({type(e).__name__}{line}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})"
                            ) from None


def check_sft_lengths(records: List[dict], tokenizer, model_cfg, max_length: int, key: str) -> None:
    """Every SFT record, rendered as SFT renders it, must leave room in `max_length` tokens for at least one answer
    token: a longer prompt trains nothing (TRL drops the record silently). `records`: [{"where", "messages"}]. A
    record whose answer is only cut short still teaches its beginning: that is logged, not refused."""
    lost, cut, longest = [], 0, (0, "")
    for r in records:
        try:
            row = to_prompt_completion(r["messages"], tokenizer, model_cfg.prompt_template)
            prompt = len(tokenizer(row["prompt"])["input_ids"])
            full = len(tokenizer(row["prompt"] + row["completion"])["input_ids"]) + 1  # + EOS
        except PipelineError:
            raise
        except Exception as e:  # a template failing on this record's roles, text the tokenizer cannot encode
            raise PipelineError(f"{r['where']}: cannot be rendered and tokenized for SFT ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})") from None
        longest = max(longest, (prompt, r["where"]))
        if prompt >= max_length:
            lost.append(r["where"])
        elif full > max_length:
            cut += 1
    if lost:
        raise PipelineError(f"{key}={max_length}: {len(lost)} of {len(records)} SFT records would lose their whole "
                            f"answer (prompt of {max_length} tokens or more; the longest, {longest[0]} tokens, at "
                            f"{longest[1]}); raise {key} or shorten those prompts")
    if cut:
        log.warning("SFT data: %d of %d answers are cut short at %s=%d (their beginnings are trained)", cut,
                    len(records), key, max_length)
