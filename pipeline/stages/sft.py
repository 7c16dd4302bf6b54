"""Stage 3 — supervised fine-tuning (SFT): a fresh LoRA adapter on the merged CPT model, trained with TRL.

    python -m pipeline.run stages=[sft] inputs.cpt_model=outputs/runs/<run>/cpt_model

Every record becomes a prompt/completion pair: the prompt is everything up to the last assistant turn rendered with
the tokenizer's chat template (or model.prompt_template when it has none), the completion is the last assistant
turn. TRL then trains on completion tokens only, EOS included, so the model learns to stop. Rendering here instead of
TRL's `assistant_only_loss` works with any chat template (that option needs {% generation %} markers, which few
templates have). No packing: TRL's padding-free packing is only correct with FlashAttention's variable-length
kernels (as for CPT, pipeline/stages/cpt.py).

Levers that keep what CPT taught (docs/levers.md), all off by default: sft.replay_ratio (CPT text in the batches,
pipeline/core/mixing.py), sft.layers (LoRA in some layers only), sft.kl_weight / sft.l2_weight (loss terms,
pipeline/core/retention.py) and sft.early_stopping_patience (a domain dev set, data.dev_qa.path).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import List, Optional

from pipeline.core.lineage import write_lineage
from pipeline.core.outputs import PipelineError, example, resumable_output, write_json
from pipeline.core.checkpoints import count_4bit_linears, load_tokenizer
from pipeline.core.training import count_trainable, final_loss, loss_summary, train_stage, training_arguments
from pipeline.core.devices import resolve_device, resolve_dtype
from pipeline.core.config import DataConfig, DataPath, ModelConfig, SftConfig, cache_settings
from pipeline.core.progress import attach_progress, loss_history
from pipeline.core.data import load_cpt_documents, load_sft_records, qa_source
from pipeline.core.backend import add_lora, check_attn_implementation, load_for_training
from pipeline.core.mixing import load_disjoint_qa, replay_records, replay_token_target, trained_tokens
from pipeline.core.modules import (add_tokens, embedding_rows, lora_scale, resolve_layers, resolve_targets,
                                   token_training)
from pipeline.core.prompts import apply_chat_template_override, to_prompt_completion, write_prompt_format

log = logging.getLogger(__name__)


def _expose_head_bias(model) -> None:
    """TRL's SFTTrainer computes the loss from `lm_head.weight` and `lm_head.bias` itself (its fused LM head). PEFT's
    TrainableTokensWrapper (new token rows, model.add_special_tokens) forwards `.weight`, merged with the trained
    rows, but not `.bias`, so the first step fails; give the wrapper its wrapped layer's bias (None for LM heads)."""
    head = model.get_output_embeddings()
    if type(head).__name__ == "TrainableTokensWrapper" and "bias" not in dir(head):
        head.bias = getattr(head.original_module, "bias", None)


def _step_of(checkpoint: Optional[str]) -> Optional[int]:
    """The step number of a Trainer checkpoint directory (checkpoint-<step>), None without one."""
    return int(Path(checkpoint).name.rsplit("-", 1)[-1]) if checkpoint else None


# --- levers that keep CPT knowledge (docs/levers.md): replay, dev-set early stopping; KL/L2 in retention.py -------

def _answer_tokens(rows: List[dict], tok, max_length: int) -> int:
    """The answer tokens TRL will train in `rows` (completion + EOS, after truncation to max_length), estimated
    before the trainer tokenizes them; the exact count is read off the trainer's dataset afterwards."""
    n = 0
    for r in rows:
        prompt = len(tok(r["prompt"])["input_ids"])
        full = len(tok(r["prompt"] + r["completion"])["input_ids"]) + (not r["completion"].endswith(tok.eos_token))
        n += max(0, min(full, max_length) - prompt)
    return n


def _replay_rows(cfg: SftConfig, rows: List[dict], tok, max_length: int, replay: Optional[DataPath],
                 seed: int) -> List[dict]:
    """sft.replay_ratio: CPT text records (prompt "", loss on every token) holding replay_ratio of all trained
    tokens, drawn (seeded) from data.replay.path, or from data.cpt.path when that is null."""
    if not cfg.replay_ratio:
        return []
    if replay is None or not replay.path:
        raise PipelineError(f"sft.replay_ratio={cfg.replay_ratio:g}: no text to replay; set data.replay.path (or "
                            f"data.cpt.path, its default)")
    target = replay_token_target(_answer_tokens(rows, tok, max_length), cfg.replay_ratio)
    docs = load_cpt_documents(replay.path, replay.text_field, key="data.replay.path")
    extra = replay_records(docs, tok, target, max_length - 2, seed)  # - 2: BOS and EOS
    log.info("SFT replay: %d records of text from %s (%d tokens planned, sft.replay_ratio=%g)", len(extra),
             replay.path, target, cfg.replay_ratio)
    return extra


def _dev_rows(dev_qa, scored_qa, tok, prompt_template: str) -> List[dict]:
    """The SFT dev set (data.dev_qa.path): domain questions with their gold answers, asked as SFT asks, never one of
    the scored questions (data.qa.path)."""
    if not qa_source(dev_qa)[0]:
        raise PipelineError("sft.early_stopping_patience: needs a dev set, data.dev_qa.path (domain questions kept "
                            "out of data.qa.path)")
    items = load_disjoint_qa(dev_qa, "data.dev_qa.path", scored_qa)
    return [to_prompt_completion([{"role": "user", "content": q.question}, {"role": "assistant", "content": q.answer}],
                                 tok, prompt_template) for q in items]


def _early_stopping(cfg: SftConfig) -> tuple:
    """(extra SFTConfig arguments, callbacks) for sft.early_stopping_patience: evaluate the loss on the dev set's
    gold answers every sft.eval_steps, stop after `patience` evaluations without improvement, and end on the best
    checkpoint (transformers' EarlyStoppingCallback + load_best_model_at_end)."""
    if not cfg.early_stopping_patience:
        return {}, []
    from transformers import EarlyStoppingCallback

    args = {"eval_strategy": "steps", "eval_steps": cfg.eval_steps, "save_strategy": "steps",
            "save_steps": cfg.eval_steps, "save_total_limit": 1, "load_best_model_at_end": True,
            "metric_for_best_model": "eval_loss", "greater_is_better": False,
            "per_device_eval_batch_size": cfg.batch_size}
    return args, [EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience)]


def key_material(cfg: SftConfig, data_cfg: DataConfig, seed: int) -> dict:
    """What the SFT adapter depends on besides the model it trains on (run.py adds that and the model settings): the
    settings, the seed, and every file train_sft reads — the SFT set, the replayed text (sft.replay_ratio) and the
    dev set (sft.early_stopping_patience)."""
    from pipeline.core.data import fingerprint_documents, fingerprint_qa, fingerprint_sft, qa_fields

    # The records as train_sft reads them, whatever the format: the same records elsewhere reuse the stage.
    replay, dev = (data_cfg.replay if data_cfg.replay.path else data_cfg.cpt), data_cfg.dev_qa
    return {"sft": cache_settings(cfg), "seed": seed,
            "data": fingerprint_sft(data_cfg.sft.path, "data.sft.path", data_cfg.sft.messages_field),
            "replay": fingerprint_documents(replay.path, replay.text_field, "data.replay.path")
            if cfg.replay_ratio else None,
            "dev_qa": fingerprint_qa(dev.path, "data.dev_qa.path", **qa_fields(dev))
            if cfg.early_stopping_patience and dev.path else None}


def train_sft(cfg: SftConfig, model_cfg: ModelConfig, data_cfg: DataPath, cpt_model_dir: str | Path, seed: int,
              out_dir: str | Path, device: str = "auto", backend: str = "hf", replay: Optional[DataPath] = None,
              dev_qa: Optional[DataPath] = None, scored_qa: Optional[DataPath] = None) -> Path:
    """Train an SFT LoRA adapter on the CPT model at `cpt_model_dir`; returns `out_dir` with adapter + tokenizer.

    `replay`: where sft.replay_ratio draws its text; `dev_qa`: the dev set of sft.early_stopping_patience;
    `scored_qa`: the scored QA set, which the dev set must not overlap."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    out_dir = Path(out_dir)
    dev = resolve_device(device)
    dtype = resolve_dtype(model_cfg.dtype, dev)
    check_attn_implementation(cfg.attn_implementation, dev, "sft.attn_implementation")
    records = load_sft_records(data_cfg.path, key="data.sft.path", messages_field=data_cfg.messages_field)
    tok = load_tokenizer(cpt_model_dir, model_cfg.trust_remote_code)
    apply_chat_template_override(tok, model_cfg)
    rows = [to_prompt_completion(m, tok, model_cfg.prompt_template) for m in records]
    log.info("SFT data: %d records, formatted with %s; example prompt: %s", len(rows),
             "the chat template" if tok.chat_template else "model.prompt_template", example(rows[0]["prompt"]))
    max_length = cfg.max_length or model_cfg.max_seq_length
    # A prompt that fills max_length leaves no answer token to learn from; TRL drops such records silently.
    too_long = sum(len(tok(r["prompt"])["input_ids"]) >= max_length for r in rows)
    if too_long == len(rows):
        raise PipelineError(f"sft.max_length={max_length}: every SFT prompt is at least that many tokens long, so no "
                            f"answer would be trained; raise sft.max_length (or model.max_seq_length)")
    if too_long:
        log.warning("SFT data: %d of %d prompts are %d tokens or longer and teach nothing (raise sft.max_length)",
                    too_long, len(rows), max_length)
    n_sft = len(rows)
    rows += _replay_rows(cfg, rows, tok, max_length, replay, seed)
    dev_rows = _dev_rows(dev_qa, scored_qa, tok, model_cfg.prompt_template) if cfg.early_stopping_patience else []

    set_seed(seed)
    model = load_for_training(backend, cpt_model_dir, model_cfg, dtype, dev, cfg.attn_implementation)
    # Tokens are added at CPT; here they must already have rows. Their rows train again (a chat template's markers
    # are learned in SFT, where they first carry meaning).
    if add_tokens(tok, model_cfg.add_special_tokens, embedding_rows(model), f"CPT model {cpt_model_dir}"):
        raise PipelineError(f"model.add_special_tokens: {model_cfg.add_special_tokens} are not all in the CPT "
                            f"model's vocabulary ({cpt_model_dir}); tokens are added by the CPT stage: run cpt and "
                            f"merge with this setting")
    targets = resolve_targets(cfg.target_modules, model, model_cfg.modules, key="sft.target_modules")
    targets.layers, targets.layers_pattern = resolve_layers(cfg.layers, model, key="sft.layers")
    token_ids = tok.convert_tokens_to_ids(list(model_cfg.add_special_tokens))
    tokens = token_training(token_ids, targets, model, model_cfg.modules)
    model = add_lora(backend, model, targets, cfg, seed, model_cfg.load_in_4bit, tokens)
    _expose_head_bias(model)
    trainable, total = count_trainable(model)
    log.info("SFT model: LoRA r=%d alpha=%g on %s; trained in full: %s; token rows: %s; %d/%d parameters "
             "trainable%s; backend %s", cfg.r, cfg.lora_alpha, ",".join(targets.lora) or "-",
             ",".join(targets.modules_to_save) or "-", ",".join(tokens) if tokens else "-", trainable, total,
             "; base weights in 4-bit (QLoRA)" if model_cfg.load_in_4bit else "", backend)

    stop_args, callbacks = _early_stopping(cfg)
    with resumable_output(out_dir) as tmp:  # checkpoints survive a crash; a re-run resumes
        args = training_arguments(
            SFTConfig, cfg, tmp / "trainer", dev, dtype, seed, backend,
            max_length=max_length,
            packing=False,
            completion_only_loss=True,
            dataset_num_proc=None,
            **stop_args,
        )
        trainer_cls, lever_kwargs = SFTTrainer, {}
        if cfg.kl_weight or cfg.l2_weight:
            from pipeline.core.retention import RetentionSFTTrainer

            trainer_cls, lever_kwargs = RetentionSFTTrainer, {"kl_weight": cfg.kl_weight, "l2_weight": cfg.l2_weight}
        trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                              eval_dataset=Dataset.from_list(dev_rows) if dev_rows else None, callbacks=callbacks,
                              **lever_kwargs)
        attach_progress(trainer, "sft")  # console: a progress bar; the per-step dicts go to run.log
        answer_tokens, replay_tokens = trained_tokens(trainer.train_dataset, lambda row: row["prompt"] == "")
        log.info("SFT trained tokens per epoch: %d answer tokens, %d replayed CPT-text tokens (%.1f%%)", answer_tokens,
                 replay_tokens, 100 * replay_tokens / max(1, answer_tokens + replay_tokens))
        t0 = time.time()
        result, _ = train_stage(trainer, "sft")  # resumes a killed build; stops on a nan/inf loss
        seconds = time.time() - t0
        log.info("SFT done: %d steps in %.1fs, %s", result.global_step, seconds,
                 loss_summary(trainer, result.training_loss))
        # sft.early_stopping_patience: the dev loss of the adapter as saved, i.e. of the best checkpoint, reloaded
        dev_loss = trainer.evaluate()["eval_loss"] if dev_rows else None
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_prompt_format(tmp, tok, model_cfg.prompt_template)  # eval asks the SFT model the same way
        write_json(tmp / "sft_stats.json", {
            "records": n_sft, "steps": result.global_step, "train_loss": result.training_loss,
            "final_loss": final_loss(trainer, result.training_loss), "loss_history": loss_history(trainer),
            "seconds": round(seconds, 2),
            "lora_targets": targets.lora, "modules_to_save": targets.modules_to_save,
            "trainable_parameters": trainable, "load_in_4bit": model_cfg.load_in_4bit,
            "linear_4bit_modules": count_4bit_linears(model), "backend": backend,
            # the levers (docs/levers.md); run.py copies lora_scale and the token counts into metrics.json
            "lora_scale": lora_scale(cfg.lora_alpha, cfg.r, cfg.use_rslora), "layers": targets.layers,
            "answer_tokens": answer_tokens, "replay_records": len(rows) - n_sft, "replay_tokens": replay_tokens,
            "replay_share": replay_tokens / max(1, answer_tokens + replay_tokens),
            "best_eval_loss": trainer.state.best_metric, "dev_loss": dev_loss,
            "best_checkpoint_step": _step_of(trainer.state.best_model_checkpoint),
        })
        write_lineage(tmp, "sft_adapter", model_cfg.path, parent=cpt_model_dir)
    return out_dir
