"""Stage 3 — supervised fine-tuning (SFT): a fresh LoRA adapter on the merged CPT model, trained with TRL.

    python -m pipeline.run stages=[sft] inputs.cpt_model=outputs/runs/<run>/cpt_model

Every record becomes a prompt/completion pair: the prompt is everything up to the last assistant turn rendered with
the tokenizer's chat template (or model.prompt_template when it has none), the completion is the last assistant
turn. TRL then trains on completion tokens only, EOS included, so the model learns to stop. Rendering here instead of
TRL's `assistant_only_loss` works with any chat template (that option needs {% generation %} markers, which few
templates have). No packing: TRL's padding-free packing is only correct with FlashAttention (FIELD_NOTES).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import List, Optional

from .common import (PipelineError, atomic_output, count_4bit_linears, count_trainable, final_loss, load_tokenizer,
                     loss_summary, resolve_device, resolve_dtype, training_arguments, write_json)
from .config import DataPath, ModelConfig, SftConfig
from .data import load_sft_records
from .backend import add_lora, load_for_training
from .modules import add_tokens, embedding_rows, resolve_targets, token_training

log = logging.getLogger(__name__)


def chat_template_text(spec: Optional[str]) -> Optional[str]:
    """model.chat_template: a path ending in .jinja (must exist) or the Jinja template itself."""
    if spec and spec.endswith(".jinja"):
        if not Path(spec).is_file():
            raise PipelineError(f"model.chat_template={spec}: no such .jinja file")
        return Path(spec).read_text(encoding="utf-8")
    return spec


def apply_chat_template_override(tokenizer, model_cfg: ModelConfig) -> None:
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


def _expose_head_bias(model) -> None:
    """TRL's SFTTrainer computes the loss from `lm_head.weight` and `lm_head.bias` itself (its fused LM head). PEFT's
    TrainableTokensWrapper (new token rows, model.add_special_tokens) forwards `.weight`, merged with the trained
    rows, but not `.bias`, so the first step fails; give the wrapper its wrapped layer's bias (None for LM heads)."""
    head = model.get_output_embeddings()
    if type(head).__name__ == "TrainableTokensWrapper" and "bias" not in dir(head):
        head.bias = getattr(head.original_module, "bias", None)


def train_sft(cfg: SftConfig, model_cfg: ModelConfig, data_cfg: DataPath, cpt_model_dir: str | Path, seed: int,
              out_dir: str | Path, device: str = "auto", backend: str = "hf") -> Path:
    """Train an SFT LoRA adapter on the CPT model at `cpt_model_dir`; returns `out_dir` with adapter + tokenizer."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    out_dir = Path(out_dir)
    dev = resolve_device(device)
    dtype = resolve_dtype(model_cfg.dtype, dev)
    records = load_sft_records(data_cfg.path, key="data.sft.path")
    tok = load_tokenizer(cpt_model_dir, model_cfg.trust_remote_code)
    apply_chat_template_override(tok, model_cfg)
    rows = [to_prompt_completion(m, tok, model_cfg.prompt_template) for m in records]
    log.info("SFT data: %d records, formatted with %s; example prompt: %r", len(rows),
             "the chat template" if tok.chat_template else "model.prompt_template", rows[0]["prompt"][:80])
    max_length = cfg.max_length or model_cfg.max_seq_length
    # A prompt that fills max_length leaves no answer token to learn from; TRL drops such records silently.
    too_long = sum(len(tok(r["prompt"])["input_ids"]) >= max_length for r in rows)
    if too_long == len(rows):
        raise PipelineError(f"sft.max_length={max_length}: every SFT prompt is at least that many tokens long, so no "
                            f"answer would be trained; raise sft.max_length (or model.max_seq_length)")
    if too_long:
        log.warning("SFT data: %d of %d prompts are %d tokens or longer and teach nothing (raise sft.max_length)",
                    too_long, len(rows), max_length)

    set_seed(seed)
    model = load_for_training(backend, cpt_model_dir, model_cfg, dtype, dev)
    # Tokens are added at CPT; here they must already have rows. Their rows train again (a chat template's markers
    # are learned in SFT, where they first carry meaning).
    if add_tokens(tok, model_cfg.add_special_tokens, embedding_rows(model), f"CPT model {cpt_model_dir}"):
        raise PipelineError(f"model.add_special_tokens: {model_cfg.add_special_tokens} are not all in the CPT "
                            f"model's vocabulary ({cpt_model_dir}); tokens are added by the CPT stage: run cpt and "
                            f"merge with this setting")
    targets = resolve_targets(cfg.target_modules, model, model_cfg.modules, key="sft.target_modules")
    token_ids = tok.convert_tokens_to_ids(list(model_cfg.add_special_tokens))
    tokens = token_training(token_ids, targets, model, model_cfg.modules)
    model = add_lora(backend, model, targets, cfg, seed, model_cfg.load_in_4bit, tokens)
    _expose_head_bias(model)
    trainable, total = count_trainable(model)
    log.info("SFT model: LoRA r=%d alpha=%g on %s; trained in full: %s; token rows: %s; %d/%d parameters "
             "trainable%s; backend %s", cfg.r, cfg.lora_alpha, ",".join(targets.lora) or "-",
             ",".join(targets.modules_to_save) or "-", ",".join(tokens) if tokens else "-", trainable, total,
             "; base weights in 4-bit (QLoRA)" if model_cfg.load_in_4bit else "", backend)

    with atomic_output(out_dir) as tmp:
        args = training_arguments(
            SFTConfig, cfg, tmp / "trainer", dev, dtype, seed,
            max_length=max_length,
            packing=False,
            completion_only_loss=True,
            dataset_num_proc=None,
            gradient_checkpointing=False,  # TRL defaults to True; tiny LoRA runs do not need it
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        t0 = time.time()
        result = trainer.train()
        seconds = time.time() - t0
        log.info("SFT done: %d steps in %.1fs, %s", result.global_step, seconds,
                 loss_summary(trainer, result.training_loss))
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / "sft_stats.json", {
            "records": len(rows), "steps": result.global_step, "train_loss": result.training_loss,
            "final_loss": final_loss(trainer, result.training_loss), "seconds": round(seconds, 2),
            "lora_targets": targets.lora, "modules_to_save": targets.modules_to_save,
            "trainable_parameters": trainable, "load_in_4bit": model_cfg.load_in_4bit,
            "linear_4bit_modules": count_4bit_linears(model), "backend": backend,
        })
    return out_dir
