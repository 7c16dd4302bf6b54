"""Build the embedded demo base model: a byte-level BPE tokenizer and a tiny Llama, pretrained on the project's text.

    python -m pipeline.demo_model [OUT_DIR]        (the pipeline also runs this when model.path is missing)

The pretraining text (data/pretrain/) describes a *public* fictional world with the same kinds of facts and question
formats as the confidential demo domain (data/cpt/), plus general knowledge. The base model therefore knows Japanese
surface forms and how facts are asked (質問: …\n答え: …), but none of the domain facts: CPT has something to inject and
the QA set something to measure. The tokenizer is trained on the pretraining and SFT text, not on the CPT corpus, as
a real tokenizer would be. Reproducible: seeded, CPU, fp32; ~2-3 minutes on 2 cores.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import List

import torch

from .common import PipelineError, atomic_output, training_arguments, write_json
from .config import DemoBuildConfig, LoraStageConfig

log = logging.getLogger(__name__)

# Plain-text roles (no new special tokens: the tiny model has seen these characters in pretraining). The assistant
# turn ends with EOS, which the SFT stage trains and generation stops on. The generation prompt ends in a newline so
# that BPE never merges the prompt's last token with the answer's first.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}ユーザー: {{ m['content'] }}\n"
    "{% else %}アシスタント:\n{{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}アシスタント:\n{% endif %}"
)


def read_documents(paths: List[str]) -> List[str]:
    """Documents separated by blank lines in .txt files; the text fields of .jsonl (SFT) records."""
    from .data import iter_jsonl

    docs: List[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise PipelineError(f"model.demo: pretraining file {p} is missing")
        if p.suffix == ".jsonl":
            for _, obj in iter_jsonl(p):
                docs += [m["content"] for m in obj.get("messages", [])]
        else:
            docs += [d.strip() for d in p.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    return docs


def train_tokenizer(texts: List[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", chat_template=CHAT_TEMPLATE, model_max_length=4096)


def build_demo_model(cfg: DemoBuildConfig, out_dir: str | Path, max_seq_length: int = 256) -> Path:
    """Train tokenizer + tiny Llama from scratch and save them at `out_dir` (atomically)."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, set_seed

    from .cpt import collate_blocks, pack_documents

    out_dir = Path(out_dir)
    t0 = time.time()
    docs = read_documents(cfg.corpus)
    tok = train_tokenizer(docs + read_documents(cfg.tokenizer_extra_text), cfg.vocab_size)
    blocks = pack_documents(docs, tok, max_seq_length, cfg.seed)
    n_tokens = sum(map(len, blocks))
    set_seed(cfg.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(2048, max_seq_length), tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("demo model: pretraining a %.1fM-parameter Llama on %d documents (%d tokens, vocab %d) for %g epochs",
             n_params / 1e6, len(docs), n_tokens, len(tok), cfg.num_epochs)
    stage = LoraStageConfig(learning_rate=cfg.learning_rate, num_epochs=cfg.num_epochs, batch_size=cfg.batch_size,
                            warmup_ratio=0.05, weight_decay=0.01, lr_scheduler="cosine", logging_steps=25)
    with atomic_output(out_dir) as tmp:
        args = training_arguments(TrainingArguments, stage, tmp / "trainer", torch.device("cpu"), torch.float32,
                                  cfg.seed)
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": blocks}),
                          data_collator=collate_blocks(tok.pad_token_id))
        result = trainer.train()
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / "demo_build.json", {"parameters": n_params, "tokens": n_tokens, "documents": len(docs),
                                             "train_loss": result.training_loss, "seconds": round(time.time() - t0, 1),
                                             "vocab_size": len(tok)})
    log.info("demo model saved to %s (%.0fs, final train loss %.3f)", out_dir, time.time() - t0,
             result.training_loss)
    return out_dir


def ensure_demo_model(cfg: DemoBuildConfig, path: str | Path, max_seq_length: int) -> Path:
    """Build the demo model at `path` unless it is there; concurrent jobs wait for one builder."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not (path / "config.json").is_file():
            log.info("model.path=%s does not exist: building the demo base model (once)", path)
            build_demo_model(cfg, path, max_seq_length)
    return path


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    target = sys.argv[1] if len(sys.argv) > 1 else "outputs/demo_base_model"
    ensure_demo_model(DemoBuildConfig(), target, 256)
