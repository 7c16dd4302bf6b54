"""Stage 1 — continual pretraining (CPT): a PEFT LoRA adapter trained on raw domain documents.

    python -m pipeline.run stages=[cpt]

Documents are shuffled (seeded), tokenized, joined with EOS and cut into blocks of model.max_seq_length: no padding
except in the last block. A block may span two documents, as in every CPT recipe; EOS marks the boundary. Each block
is a plain causal sequence (TRL's padding-free packing is wrong without FlashAttention, see FIELD_NOTES). With
target_modules=attn_mlp_embed the embeddings and head are trained in full with their own embedding_learning_rate, as
unsloth's UnslothTrainingArguments does.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import List

import torch

from .common import (atomic_output, count_4bit_linears, count_trainable, final_loss, load_tokenizer, loss_summary,
                     resolve_device, resolve_dtype, training_arguments, write_json)
from .config import CptConfig, DataPath, ModelConfig
from .data import load_cpt_documents
from .backend import add_lora, load_for_training
from .modules import add_tokens, embedding_rows, fit_embeddings, resolve_targets, token_training

log = logging.getLogger(__name__)

# Parameter names of fully trained embedding copies (PEFT's modules_to_save / trainable tokens).
EMBEDDING_PARAM_MARKERS = ("modules_to_save", "trainable_tokens", "lora_embedding_")


def pack_documents(docs: List[str], tokenizer, block_len: int, seed: int) -> List[List[int]]:
    """Shuffle documents (seeded), tokenize, end each with EOS, concatenate, cut into blocks of `block_len`."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    stream: List[int] = []
    for i in order:
        ids = tokenizer(docs[i], verbose=False)["input_ids"]
        if not ids or ids[-1] != eos:
            ids = ids + [eos]
        stream.extend(ids)
    blocks = [stream[i:i + block_len] for i in range(0, len(stream), block_len)]
    if len(blocks) > 1 and len(blocks[-1]) < 2:
        blocks.pop()  # a 1-token block has nothing to predict
    return blocks


def pack_epochs(docs: List[str], tokenizer, block_len: int, seed: int, num_epochs: float) -> List[List[int]]:
    """One packing per epoch, each with its own document order: every pass shows a fact in a new context and at a
    new position. With a single fixed packing, many epochs let a small model memorise the blocks themselves (loss
    near zero) without being able to recall a fact from a fresh prompt."""
    blocks: List[List[int]] = []
    for epoch in range(max(1, math.ceil(num_epochs))):
        blocks += pack_documents(docs, tokenizer, block_len, seed + epoch)
    return blocks


def collate_blocks(pad_id: int):
    """Stack token blocks; only a short final block gets padding, masked out of attention and loss."""

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
        labels = ids.masked_fill(mask == 0, -100)  # EOS tokens stay in the labels even when pad == eos
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def param_groups(model, cfg: CptConfig):
    """LoRA weights at learning_rate; full embedding/head copies at embedding_learning_rate."""
    emb, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (emb if any(m in name for m in EMBEDDING_PARAM_MARKERS) else other).append(p)
    groups = [{"params": other, "lr": cfg.learning_rate, "weight_decay": cfg.weight_decay}]
    if emb:
        groups.append({"params": emb, "lr": cfg.embedding_learning_rate, "weight_decay": 0.0})
    return groups


def train_cpt(cfg: CptConfig, model_cfg: ModelConfig, data_cfg: DataPath, seed: int, out_dir: str | Path,
              device: str = "auto", backend: str = "hf") -> Path:
    """Train a CPT LoRA adapter on `data_cfg.path`; returns `out_dir` holding the adapter and tokenizer."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, set_seed

    out_dir = Path(out_dir)
    dev = resolve_device(device)
    dtype = resolve_dtype(model_cfg.dtype, dev)
    docs = load_cpt_documents(data_cfg.path, data_cfg.text_field, key="data.cpt.path")
    tok = load_tokenizer(model_cfg.path, model_cfg.trust_remote_code)

    set_seed(seed)
    model = load_for_training(backend, model_cfg.path, model_cfg, dtype, dev)
    new_ids = add_tokens(tok, model_cfg.add_special_tokens, embedding_rows(model), f"model.path={model_cfg.path}")
    grown = fit_embeddings(model, len(tok), new_ids)
    if new_ids:
        log.info("vocabulary: %d new token(s) %s (ids %s); embedding matrix grown by %d rows", len(new_ids),
                 tok.convert_ids_to_tokens(new_ids), new_ids, grown)
    targets = resolve_targets(cfg.target_modules, model, model_cfg.modules, key="cpt.target_modules")
    tokens = token_training(new_ids, targets, model, model_cfg.modules)
    model = add_lora(backend, model, targets, cfg, seed, model_cfg.load_in_4bit, tokens)
    trainable, total = count_trainable(model)
    log.info("CPT model: LoRA r=%d alpha=%g on %s; trained in full: %s%s; new token rows: %s; %d/%d parameters "
             "trainable (%.2f%%)%s; backend %s", cfg.r, cfg.lora_alpha, ",".join(targets.lora) or "-",
             ",".join(targets.modules_to_save) or "-",
             " (tied, head re-tied to the embedding)" if targets.ensure_weight_tying else "",
             ",".join(tokens) if tokens else "-", trainable, total, 100 * trainable / total,
             "; base weights in 4-bit (QLoRA)" if model_cfg.load_in_4bit else "", backend)

    blocks = pack_epochs(docs, tok, model_cfg.max_seq_length, seed, cfg.num_epochs)
    passes = max(1, math.ceil(cfg.num_epochs))
    n_tokens = sum(len(b) for b in blocks) // passes
    log.info("CPT data: %d documents, %d tokens -> %d blocks of <=%d tokens per epoch, re-packed for each of %d "
             "epochs", len(docs), n_tokens, len(blocks) // passes, model_cfg.max_seq_length, passes)

    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.learning_rate)
    with atomic_output(out_dir) as tmp:
        # The dataset already holds every epoch's packing: one pass over it is cfg.num_epochs epochs.
        args = training_arguments(TrainingArguments, cfg, tmp / "trainer", dev, dtype, seed,
                                  num_train_epochs=cfg.num_epochs / passes)
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": blocks}),
                          data_collator=collate_blocks(tok.pad_token_id), optimizers=(optimizer, None))
        t0 = time.time()
        result = trainer.train()
        seconds = time.time() - t0
        steps = result.global_step
        seen_tokens = n_tokens * passes * (trainer.state.epoch or 0)  # trainer's "epoch" = share of all packings
        stats = {
            "documents": len(docs), "tokens_per_epoch": n_tokens, "blocks_per_epoch": len(blocks) // passes,
            "epochs": cfg.num_epochs, "steps": steps,
            "train_loss": result.training_loss, "final_loss": final_loss(trainer, result.training_loss), "seconds": round(seconds, 2),
            "tokens_per_second": round(seen_tokens / seconds, 1) if seconds > 0 else None,
            "lora_targets": targets.lora, "modules_to_save": targets.modules_to_save, "tied": targets.tied,
            "trainable_parameters": trainable, "load_in_4bit": model_cfg.load_in_4bit,
            "linear_4bit_modules": count_4bit_linears(model), "backend": backend,
            "added_tokens": tok.convert_ids_to_tokens(new_ids), "added_token_ids": new_ids,
            "embedding_rows": embedding_rows(model),
        }
        log.info("CPT done: %d steps in %.1fs (%.0f tokens/s), %s", steps, seconds, stats["tokens_per_second"] or 0,
                 loss_summary(trainer, result.training_loss))
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(tmp / "cpt_stats.json", stats)
    return out_dir

