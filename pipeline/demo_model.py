"""Build the embedded demo base model: a byte-level BPE tokenizer and a tiny Llama, pretrained on the project's text.

    python -m pipeline.demo_model [OUT_DIR]        (the pipeline also runs this when model.path is missing)
    python -m pipeline.demo_model --instruct [OUT_DIR]   its instruct sibling (model.instruct_path, chat_vector stage)

The pretraining text (data/pretrain/) describes a *public* fictional world with the same kinds of facts and question
formats as the confidential demo domain (data/cpt/), plus general knowledge. The base model therefore knows Japanese
surface forms and how facts are asked (質問: …\n答え: …), but none of the domain facts: CPT has something to inject and
the QA set something to measure. The tokenizer is trained on the pretraining and SFT text, not on the CPT corpus, as
a real tokenizer would be. Reproducible: seeded, CPU, fp32; ~2-3 minutes on 2 cores.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import List

import torch

from pipeline.core.outputs import PipelineError, atomic_output, write_json
from pipeline.core.training import training_arguments
from pipeline.core.progress import CONSOLE, attach_progress
from pipeline.core.config import DemoBuildConfig, LoraStageConfig

log = logging.getLogger(__name__)

# The demo's chat template is the question/answer format the demo model saw in pretraining (質問: …\n答え: …), with
# EOS closing the answer: SFT then teaches answering style and stopping, not a new format, which a 5M-parameter model
# learns poorly from 300 examples (a real model learns a new template easily). The generation prompt ends at "答え:";
# the answer's first token carries the space, as in pretraining.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}質問: {{ m['content'] }}\n"
    "{% else %}答え: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}答え:{% endif %}"
)


def read_documents(paths: List[str]) -> List[str]:
    """Documents separated by blank lines in .txt files; the text fields of .jsonl (SFT) records."""
    from pipeline.core.data import iter_jsonl

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


def charset(paths: List[str]) -> List[str]:
    """Every distinct character in the files under `paths`, sorted (for tokenizer coverage only)."""
    chars = set()
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            chars.update(f.read_text(encoding="utf-8"))
    return sorted(ch for ch in chars if not ch.isspace())


def character_drills(chars: List[str], seed: int, repeats: int = 2, per_doc: int = 12) -> List[str]:
    """Short documents that use every character of `chars` a few times ("文字の練習: 鷺、重、工、…").

    A real base model has seen every common kanji. Without these drills a quarter of the demo CPT corpus's tokens
    would be embeddings the base model never trained: CPT would start from a loss of ~8.5 and its large early
    gradients would wipe out what the model knew, which says nothing about the settings being compared.
    """
    rng = random.Random(seed)
    pool = [ch for ch in chars for _ in range(repeats)]
    rng.shuffle(pool)
    return [f"文字の練習: {'、'.join(pool[i:i + per_doc])}。" for i in range(0, len(pool), per_doc)]


def train_tokenizer(texts: List[str], vocab_size: int, extra_chars: List[str] = ()):
    """Byte-level BPE on `texts`; each of `extra_chars` becomes one token (seen as a lone word, it forms no merges
    with its neighbours)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(list(texts) + [ch for ch in extra_chars for _ in range(2)], trainer)
    # BOS before every text, as Llama tokenizers do: a document in training and a prompt at inference both start
    # from the same token, so the model need not guess where a question begins.
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", chat_template=CHAT_TEMPLATE, model_max_length=4096)


def demo_config(cfg: DemoBuildConfig, vocab_size: int, max_seq_length: int, **token_ids):
    """The demo model's LlamaConfig. Its shapes follow from model.demo alone (the tokenizer only fixes the vocabulary's
    exact size), so validation checks target modules and layers against it before the minutes-long build."""
    from transformers import LlamaConfig

    if cfg.hidden_size % cfg.num_heads:
        raise PipelineError(f"model.demo.hidden_size={cfg.hidden_size}: not a multiple of "
                            f"model.demo.num_heads={cfg.num_heads}")
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(2048, max_seq_length), tie_word_embeddings=False, **token_ids)


def demo_meta_model(cfg: DemoBuildConfig, max_seq_length: int):
    """The demo model's architecture without weights (meta device), before it is built: milliseconds."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(demo_config(cfg, cfg.vocab_size, max_seq_length))


def build_demo_model(cfg: DemoBuildConfig, out_dir: str | Path, max_seq_length: int = 256) -> Path:
    """Train tokenizer + tiny Llama from scratch and save them at `out_dir` (atomically)."""
    from datasets import Dataset
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments, set_seed

    from pipeline.stages.cpt import collate_blocks, pack_epochs

    out_dir = Path(out_dir)
    t0 = time.time()
    docs = read_documents(cfg.corpus)
    chars = charset(cfg.tokenizer_charset)
    tok = train_tokenizer(docs + read_documents(cfg.tokenizer_extra_text), cfg.vocab_size, chars)
    docs += character_drills(chars, cfg.seed)
    blocks = pack_epochs(docs, tok, max_seq_length, cfg.seed, cfg.num_epochs)
    passes = max(1, math.ceil(cfg.num_epochs))
    n_tokens = sum(map(len, blocks)) // passes
    set_seed(cfg.seed)
    model = LlamaForCausalLM(demo_config(cfg, len(tok), max_seq_length, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("demo model: pretraining a %.1fM-parameter Llama on %d documents (%d tokens, vocab %d) for %g epochs",
             n_params / 1e6, len(docs), n_tokens, len(tok), cfg.num_epochs)
    stage = LoraStageConfig(learning_rate=cfg.learning_rate, num_epochs=cfg.num_epochs, batch_size=cfg.batch_size,
                            warmup_ratio=0.05, weight_decay=0.01, lr_scheduler="cosine", logging_steps=25,
                            save_steps=0)  # minutes of training, built in a temporary directory: no checkpoints
    with atomic_output(out_dir) as tmp:
        args = training_arguments(TrainingArguments, stage, tmp / "trainer", torch.device("cpu"), torch.float32,
                                  cfg.seed, num_train_epochs=cfg.num_epochs / passes)
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": blocks}),
                          data_collator=collate_blocks(tok.pad_token_id))
        attach_progress(trainer, "demo model")  # console: a progress bar; the per-step dicts go to run.log
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
             result.training_loss, extra=CONSOLE)
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


def build_demo_instruct_model(cfg: DemoBuildConfig, base_dir: str | Path, out_dir: str | Path,
                              max_seq_length: int = 256) -> Path:
    """The demo base model's instruct sibling: the base trained further, in full, on `cfg.instruct_data` (the demo's
    chat records) with its chat template, loss on the answers (TRL SFTTrainer).

    It plays the role a real family's -instruct checkpoint plays for the chat_vector stage: the same architecture
    and tokenizer as the base, plus what chat training changed. Full fine-tuning, not LoRA, as instruct models are
    made; seeded, CPU, fp32.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTConfig, SFTTrainer

    from pipeline.cache import fingerprint_model
    from pipeline.core.checkpoints import load_tokenizer
    from pipeline.core.data import load_sft_records
    from pipeline.core.prompts import to_prompt_completion

    out_dir, t0 = Path(out_dir), time.time()
    tok = load_tokenizer(base_dir)
    rows = [to_prompt_completion(m, tok, "{prompt}")
            for m in load_sft_records(cfg.instruct_data, key="model.demo.instruct_data")]
    set_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, use_safetensors=True)
    stage = LoraStageConfig(learning_rate=cfg.instruct_learning_rate, num_epochs=cfg.instruct_num_epochs,
                            batch_size=16, gradient_accumulation_steps=1, warmup_ratio=0.05, weight_decay=0.0,
                            lr_scheduler="cosine", logging_steps=25, save_steps=0)
    with atomic_output(out_dir) as tmp:
        args = training_arguments(SFTConfig, stage, tmp / "trainer", torch.device("cpu"), torch.float32, cfg.seed,
                                  max_length=max_seq_length, packing=False, completion_only_loss=True,
                                  dataset_num_proc=None, gradient_checkpointing=False, save_strategy="no")
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        attach_progress(trainer, "demo instruct model")
        result = trainer.train()
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / "demo_build.json", {"instruct_of": str(base_dir), "base_fingerprint":
                                             fingerprint_model(base_dir), "records": len(rows),
                                             "train_loss": result.training_loss,
                                             "seconds": round(time.time() - t0, 1)})
    log.info("demo instruct model saved to %s (%.0fs, %d chat records, train loss %.3f)", out_dir, time.time() - t0,
             len(rows), result.training_loss)
    return out_dir


def ensure_demo_instruct_model(cfg: DemoBuildConfig, base_dir: str | Path, path: str | Path,
                               max_seq_length: int) -> Path:
    """Build the instruct sibling of the demo model at `base_dir` unless it is at `path`, built from that same base
    (a rebuilt base makes the old sibling's difference meaningless: it is rebuilt too)."""
    import json

    from filelock import FileLock

    from pipeline.cache import fingerprint_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        info = path / "demo_build.json"
        if info.is_file() and json.loads(info.read_text(encoding="utf-8")).get("base_fingerprint") != \
                fingerprint_model(base_dir):
            log.info("model.instruct_path=%s was built from another demo base model: rebuilding it", path)
            shutil.rmtree(path)
        if not (path / "config.json").is_file():
            log.info("model.instruct_path=%s does not exist: building the demo instruct model (once)", path)
            build_demo_instruct_model(cfg, base_dir, path, max_seq_length)
    return path


def main(argv: List[str]) -> None:
    """Build the demo model as conf/model/demo.yaml describes it (optionally at another path); with --instruct,
    its instruct sibling (the base model is built first if needed)."""
    from hydra import compose, initialize_config_dir

    from pipeline.core.config import typed

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    conf_dir = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        model_cfg = typed(compose("config", overrides=["model=demo"]), "model")
    instruct = "--instruct" in argv
    argv = [a for a in argv if a != "--instruct"]
    if instruct:
        base = ensure_demo_model(model_cfg.demo, model_cfg.path, model_cfg.max_seq_length)
        ensure_demo_instruct_model(model_cfg.demo, base, argv[0] if argv else model_cfg.instruct_path,
                                   model_cfg.max_seq_length)
    else:
        ensure_demo_model(model_cfg.demo, argv[0] if argv else model_cfg.path, model_cfg.max_seq_length)


if __name__ == "__main__":
    main(sys.argv[1:])
