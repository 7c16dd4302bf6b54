"""Stage 1 — continual pretraining (CPT): a PEFT LoRA adapter trained on raw domain documents.

    python -m pipeline.run stages=[cpt]

Documents are tokenized once, then packed anew for every epoch (PackedEpochs): shuffled (seeded), joined with EOS and
cut into blocks of model.max_seq_length, built block by block as the Trainer reads them, so memory follows the
corpus, not epochs x corpus. Each block is a plain causal sequence (TRL's padding-free packing is only correct with
FlashAttention's variable-length kernels). With target_modules=attn_mlp_embed the embeddings and head are trained in
full with their own embedding_learning_rate, as unsloth's UnslothTrainingArguments does. The stage checkpoints every
cpt.save_steps steps; a run killed midway resumes from its last checkpoint (outputs.resumable_output, training.train_stage).
"""

from __future__ import annotations

import array
import itertools
import logging
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, List, Optional

import numpy as np
import torch

from pipeline.core.checkpoints import count_4bit_linears, load_tokenizer
from pipeline.core.training import count_trainable, final_loss, loss_summary, train_stage, training_arguments
from pipeline.core.devices import resolve_device, resolve_dtype
from pipeline.core.lineage import write_lineage
from pipeline.core.outputs import PipelineError, resumable_output, write_json
from pipeline.core.config import CptConfig, DataConfig, DataPath, ModelConfig, cache_settings
from pipeline.core.progress import attach_progress, loss_history
from pipeline.core.data import iter_document_batches
from pipeline.core.backend import add_lora, check_attn_implementation, load_for_training
from pipeline.core.mixing import mix_qa_into_corpus
from pipeline.core.modules import (add_tokens, embedding_rows, fit_embeddings, lora_scale, resolve_layers,
                                   resolve_targets, token_training)

log = logging.getLogger(__name__)

# Parameter names of fully trained embedding copies (PEFT's modules_to_save / trainable tokens).
EMBEDDING_PARAM_MARKERS = ("modules_to_save", "trainable_tokens", "lora_embedding_")


class TokenizedCorpus:
    """Every document tokenized once and ended with EOS, stored as one int32 array plus per-document offsets: 4 bytes
    a token, however many epochs read it (Python lists of ints cost a pointer and often an object per token).

    `docs` may be any iterable (a generator streaming a corpus from its Arrow files): it is tokenized `chunk`
    documents at a time with the fast tokenizer's batch call. With `path`, the ids are appended to that file as they
    come and then memory-mapped, so neither the text nor the ids of a corpus of gigabytes are ever held in memory
    whole, and never twice (benchmarks/corpus_scale.py measures it)."""

    def __init__(self, docs: Iterable[str], tokenizer, chunk: int = 256, path: Optional[Path] = None):
        eos = tokenizer.eos_token_id
        pieces, lengths = [], array.array("q")  # 8 bytes a document (a list: 36)
        sink = open(path, "wb") if path is not None else None
        try:
            docs = iter(docs)
            while batch := list(itertools.islice(docs, chunk)):
                ids_batch = [ids if ids and ids[-1] == eos else [*ids, eos]
                             for ids in tokenizer(batch, verbose=False)["input_ids"]]
                sizes = [len(ids) for ids in ids_batch]
                lengths.extend(sizes)
                # one array per batch, straight from the lists (an array per document costs more than the copy)
                ids = np.fromiter(itertools.chain.from_iterable(ids_batch), dtype=np.int32, count=sum(sizes))
                if sink is not None:
                    ids.tofile(sink)
                else:
                    pieces.append(ids)
        finally:
            if sink is not None:
                sink.close()
        self.lengths = np.frombuffer(lengths, dtype=np.int64) if lengths else np.zeros(0, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        if path is not None and self.lengths.sum():
            self.tokens = np.memmap(path, dtype=np.int32, mode="r", shape=(int(self.lengths.sum()),))
        else:
            self.tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)

    @property
    def documents(self) -> int:
        return len(self.lengths)

    @property
    def total_tokens(self) -> int:
        return int(self.tokens.size)


class PackedEpochs(torch.utils.data.Dataset):
    """`epochs` packings of a tokenized corpus, each cut into blocks only when the Trainer asks for one.

    Packing e: the documents in their own seeded order (random.Random(seed + e)), joined, cut into blocks of
    `block_len`; no padding except in the last block, and a final 1-token block (nothing to predict) is dropped. A
    block may span two documents, as in every CPT recipe; EOS marks the boundary. Every packing shows each fact in a
    new context and at a new position: with one fixed packing, many epochs let a small model memorise the blocks
    themselves (loss near zero) without being able to recall a fact from a fresh prompt.

    Item i is a block of packing i // blocks_per_epoch, the packing's blocks in a seeded random order; read in order
    (the Trainer's "sequential" sampling) the epochs are real passes, all of packing e before any of packing e + 1.
    That is also what keeps memory at the corpus's size: the dataset holds the tokens once plus one packing's
    document and block order, however many epochs it spans.
    """

    def __init__(self, corpus: TokenizedCorpus, block_len: int, seed: int, epochs: int):
        self.corpus, self.block_len, self.seed, self.epochs = corpus, block_len, seed, epochs
        total = corpus.total_tokens
        n = -(-total // block_len)  # every packing has the same length: only the order of the documents changes
        if n > 1 and total - (n - 1) * block_len < 2:
            n -= 1
        self.blocks_per_epoch = n
        self._layout = None  # (epoch, document order, end of each document in the packed stream, block order)

    def __len__(self) -> int:
        return self.epochs * self.blocks_per_epoch

    def _packing(self, epoch: int):
        if self._layout is None or self._layout[0] != epoch:
            order = list(range(self.corpus.documents))
            random.Random(self.seed + epoch).shuffle(order)
            order = np.asarray(order, dtype=np.int64)
            ends = np.cumsum(self.corpus.lengths[order])
            blocks = np.random.default_rng([epoch, self.seed % 2**63]).permutation(self.blocks_per_epoch)
            self._layout = (epoch, order, ends, blocks)
        return self._layout

    def block(self, epoch: int, j: int) -> np.ndarray:
        """Block j of packing `epoch`, in packing order (before the shuffle)."""
        _, order, ends, _ = self._packing(epoch)
        c = self.corpus
        lo, hi = j * self.block_len, min((j + 1) * self.block_len, int(ends[-1]))
        k = int(np.searchsorted(ends, lo, side="right"))  # the first document that ends after `lo`
        parts, pos = [], lo
        while pos < hi:
            doc, doc_pos = order[k], ends[k] - c.lengths[order[k]]  # the document and where it starts in the stream
            stop = min(hi, int(ends[k]))
            parts.append(c.tokens[c.starts[doc] + pos - doc_pos:c.starts[doc] + stop - doc_pos])
            pos, k = stop, k + 1
        return np.concatenate(parts)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        epoch, k = divmod(int(i), self.blocks_per_epoch)
        return {"input_ids": self.block(epoch, int(self._packing(epoch)[3][k]))}


def pack_epochs(docs: List[str], tokenizer, block_len: int, seed: int, num_epochs: float) -> List[List[int]]:
    """Every packing's blocks as lists, in packing order: for small corpora that are shuffled as a whole (the demo
    base model's pretraining)."""
    packed = PackedEpochs(TokenizedCorpus(docs, tokenizer), block_len, seed, max(1, math.ceil(num_epochs)))
    return [packed.block(e, j).tolist() for e in range(packed.epochs) for j in range(packed.blocks_per_epoch)]


def packings_needed(cfg: CptConfig, blocks_per_epoch: int) -> int:
    """How many packings the run reads: ceil(num_epochs), or with max_steps > 0 enough for max_steps batches (a run
    longer than num_epochs then still sees a new packing on every pass)."""
    if cfg.max_steps > 0:
        return max(1, math.ceil(cfg.max_steps * cfg.batch_size * cfg.gradient_accumulation_steps / blocks_per_epoch))
    return max(1, math.ceil(cfg.num_epochs))


def collate_blocks(pad_id: int):
    """Stack token blocks; only a short final block gets padding, masked out of attention and loss."""

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
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


def key_material(cfg: CptConfig, data_cfg: DataConfig, seed: int) -> dict:
    """What the CPT adapter depends on besides the base model (run.py adds the model settings): the settings, the
    seed, and every file train_cpt reads — the corpus and, with cpt.qa_mix, the QA pairs mixed into it."""
    from pipeline.core.data import fingerprint_documents, fingerprint_qa, qa_fields

    # The documents and pairs as train_cpt reads them, whatever the files' format: the same records reuse the stage.
    return {"cpt": cache_settings(cfg), "seed": seed,
            "data": fingerprint_documents(data_cfg.cpt.path, data_cfg.cpt.text_field, "data.cpt.path"),
            "cpt_qa": fingerprint_qa(data_cfg.cpt_qa.path, "data.cpt_qa.path", **qa_fields(data_cfg.cpt_qa))
            if cfg.qa_mix else None}


def corpus_documents(data_cfg: DataPath, extra: List[str]) -> Iterator[str]:
    """The corpus streamed from its files in order (one batch of text in memory at a time), then `extra`."""
    for batch in iter_document_batches(data_cfg.path, data_cfg.text_field, key="data.cpt.path"):
        yield from batch
    yield from extra


def train_cpt(cfg: CptConfig, model_cfg: ModelConfig, data_cfg: DataPath, seed: int, out_dir: str | Path,
              device: str = "auto", backend: str = "hf", qa_pairs: Optional[DataPath | str] = None,
              scored_qa: Optional[DataPath | str] = None, augmented: str | None = None) -> Path:
    """Train a CPT LoRA adapter on `data_cfg.path`; returns `out_dir` holding the adapter and tokenizer.

    With cpt.qa_mix > 0, the QA pairs of `qa_pairs` (data.cpt_qa.path) join the documents; they must not share a
    question with `scored_qa` (data.qa.path)."""
    from transformers import Trainer, TrainingArguments, set_seed

    out_dir = Path(out_dir)
    dev = resolve_device(device)
    dtype = resolve_dtype(model_cfg.dtype, dev)
    check_attn_implementation(cfg.attn_implementation, dev, "cpt.attn_implementation")
    extra = mix_qa_into_corpus([], cfg.qa_mix, cfg.qa_template, qa_pairs, scored_qa, seed)  # cpt.qa_mix (PIT-style)
    if augmented:  # the augment stage's kept texts: more documents, shuffled with the originals in every packing
        from pipeline.stages.augment import load_augmented

        generated = load_augmented(augmented, cfg.qa_template)
        log.info("CPT data: %d generated texts from the augment stage join the corpus", len(generated))
        extra = extra + generated
    tok = load_tokenizer(model_cfg.path, model_cfg.trust_remote_code)

    set_seed(seed)
    model = load_for_training(backend, model_cfg.path, model_cfg, dtype, dev, cfg.attn_implementation)
    new_ids = add_tokens(tok, model_cfg.add_special_tokens, embedding_rows(model), f"model.path={model_cfg.path}")
    grown = fit_embeddings(model, len(tok), new_ids)
    if new_ids:
        log.info("vocabulary: %d new token(s) %s (ids %s); embedding matrix grown by %d rows", len(new_ids),
                 tok.convert_ids_to_tokens(new_ids), new_ids, grown)
    targets = resolve_targets(cfg.target_modules, model, model_cfg.modules, key="cpt.target_modules")
    targets.layers, targets.layers_pattern = resolve_layers(cfg.layers, model, key="cpt.layers")
    tokens = token_training(new_ids, targets, model, model_cfg.modules)
    model = add_lora(backend, model, targets, cfg, seed, model_cfg.load_in_4bit, tokens)
    trainable, total = count_trainable(model)
    log.info("CPT model: LoRA r=%d alpha=%g on %s; trained in full: %s%s; new token rows: %s; %d/%d parameters "
             "trainable (%.2f%%)%s; backend %s", cfg.r, cfg.lora_alpha, ",".join(targets.lora) or "-",
             ",".join(targets.modules_to_save) or "-",
             " (tied, head re-tied to the embedding)" if targets.ensure_weight_tying else "",
             ",".join(tokens) if tokens else "-", trainable, total, 100 * trainable / total,
             "; base weights in 4-bit (QLoRA)" if model_cfg.load_in_4bit else "", backend)

    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.learning_rate)
    with resumable_output(out_dir) as build, tempfile.TemporaryDirectory(dir=build) as scratch:
        # Tokenized after the vocabulary is final (added tokens are split on), into a file of the build directory
        # that goes when the stage is published.
        corpus = TokenizedCorpus(corpus_documents(data_cfg, extra), tok, path=Path(scratch) / "corpus.int32")
        n_docs = corpus.documents
        if not n_docs:
            raise PipelineError(f"data.cpt.path={data_cfg.path}: the corpus is empty (all documents are blank)")
        probe = PackedEpochs(corpus, model_cfg.max_seq_length, seed, 1)
        passes = packings_needed(cfg, probe.blocks_per_epoch)
        dataset = PackedEpochs(corpus, model_cfg.max_seq_length, seed, passes)
        log.info("CPT data: %d documents, %d tokens -> %d blocks of <=%d tokens per epoch, re-packed for each of %d "
                 "epochs", n_docs, corpus.total_tokens, dataset.blocks_per_epoch, model_cfg.max_seq_length, passes)
        # One pass over the dataset is `passes` epochs; read in order, so that the epochs come one after another.
        args = training_arguments(TrainingArguments, cfg, build / "trainer", dev, dtype, seed, backend,
                                  num_train_epochs=cfg.num_epochs / passes, train_sampling_strategy="sequential")
        trainer = Trainer(model=model, args=args, train_dataset=dataset,
                          data_collator=collate_blocks(tok.pad_token_id), optimizers=(optimizer, None))
        attach_progress(trainer, "cpt")  # console: a progress bar; the per-step dicts go to run.log
        t0 = time.time()
        result, resumed = train_stage(trainer, "cpt")
        seconds = time.time() - t0
        steps = result.global_step
        # The Trainer's "epoch" is the share of the whole dataset read; tokens/s counts this process's steps only.
        trained_epochs = (trainer.state.epoch or 0) * passes
        this_run = trained_epochs - (resumed or {}).get("epoch", 0) * passes
        stats = {
            "documents": n_docs, "tokens_per_epoch": corpus.total_tokens,
            "blocks_per_epoch": dataset.blocks_per_epoch, "epochs": round(trained_epochs, 4), "steps": steps,
            "resumed_from_step": (resumed or {}).get("global_step", 0),
            "train_loss": result.training_loss, "final_loss": final_loss(trainer, result.training_loss),
            "loss_history": loss_history(trainer), "seconds": round(seconds, 2),
            "tokens_per_second": round(corpus.total_tokens * this_run / seconds, 1) if seconds > 0 else None,
            "lora_targets": targets.lora, "modules_to_save": targets.modules_to_save, "tied": targets.tied,
            "trainable_parameters": trainable, "load_in_4bit": model_cfg.load_in_4bit,
            "linear_4bit_modules": count_4bit_linears(model), "backend": backend,
            # unsloth always checkpoints activations (its own way, pipeline/core/backend.py); the Trainer's flag is off
            "gradient_checkpointing": True if backend == "unsloth" else bool(args.gradient_checkpointing),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "added_tokens": tok.convert_ids_to_tokens(new_ids), "added_token_ids": new_ids,
            "embedding_rows": embedding_rows(model),
            "lora_scale": lora_scale(cfg.lora_alpha, cfg.r, cfg.use_rslora), "layers": targets.layers,
        }
        log.info("CPT done: %d steps in %.1fs (%.0f tokens/s), %s", steps, seconds, stats["tokens_per_second"] or 0,
                 loss_summary(trainer, result.training_loss))
        model.save_pretrained(build)
        tok.save_pretrained(build)
        write_json(build / "cpt_stats.json", stats)
        write_lineage(build, "cpt_adapter", model_cfg.path)  # what this is and its base, for inputs.* checks
    return out_dir
