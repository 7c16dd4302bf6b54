"""The CPT stage's training speed against a bare PyTorch loop doing the same work, in one run.

    python benchmarks/cpt_throughput.py [--steps 12] [--batch-size 2] [--seq-len 128] [--hidden 512] [--layers 8]

Builds a random Llama (about 30M parameters at the defaults) with a byte-level BPE tokenizer trained on the demo
corpus (data/cpt), then trains the same CPT adapter for the same number of optimizer steps twice, fp32 on the CPU:

- the stage itself, `pipeline.stages.cpt.train_cpt` (HF Trainer, checkpoints off): tokens/s from its cpt_stats.json;
- a bare loop: the same blocks (PackedEpochs + collate_blocks, in the same order), the same LoRA (backend.add_lora,
  same seed), the same AdamW parameter groups, gradient clipping at 1.0 as the Trainer does, nothing else.

The learning rate is constant and without warmup in both, so the two runs do the same arithmetic: their mean losses
are printed side by side as a check. The bare loop runs first, after one untimed forward/backward (one-time kernel
set-up); the stage's time includes everything inside trainer.train(). Prints both speeds and the ratio (target
>= 0.8x).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402,F401  (offline environment)
import torch  # noqa: E402

from pipeline.core.backend import add_lora, load_for_training
from pipeline.core.config import CptConfig, DataPath, ModelConfig
from pipeline.stages.cpt import PackedEpochs, TokenizedCorpus, collate_blocks, packings_needed, param_groups, train_cpt
from pipeline.core.data import load_cpt_documents
from pipeline.core.modules import resolve_targets


def build_model(out: Path, docs, hidden: int, layers: int, vocab: int) -> int:
    """A random Llama and a tokenizer trained on `docs`, saved to `out`; returns the number of parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.demo_model import train_tokenizer

    tok = train_tokenizer(docs, vocab)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def bare_loop(cfg: CptConfig, model_cfg: ModelConfig, docs, seed: int) -> dict:
    """What train_cpt trains, without the Trainer: returns tokens/s and the mean loss."""
    from transformers import set_seed

    from pipeline.core.checkpoints import load_tokenizer

    tok = load_tokenizer(model_cfg.path)
    set_seed(seed)
    model = load_for_training("hf", model_cfg.path, model_cfg, torch.float32, torch.device("cpu"))
    targets = resolve_targets(cfg.target_modules, model, None, key="cpt.target_modules")
    model = add_lora("hf", model, targets, cfg, seed, False)
    corpus = TokenizedCorpus(docs, tok)
    probe = PackedEpochs(corpus, model_cfg.max_seq_length, seed, 1)
    data = PackedEpochs(corpus, model_cfg.max_seq_length, seed, packings_needed(cfg, probe.blocks_per_epoch))
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, collate_fn=collate_blocks(tok.pad_token_id))
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.learning_rate)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    warm = collate_blocks(tok.pad_token_id)([data[0]])  # not timed, no optimizer step: the math stays the stage's
    model(**warm).loss.backward()
    optimizer.zero_grad(set_to_none=True)
    tokens, losses = 0, []
    t0 = time.time()
    for step, batch in zip(range(cfg.max_steps), loader):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        losses.append(loss.item())
    seconds = time.time() - t0
    return {"tokens_per_second": tokens / seconds, "seconds": seconds, "loss": sum(losses) / len(losses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--target-modules", default="attn_mlp_embed")
    parser.add_argument("--data", default=str(ROOT / "data" / "cpt"))
    args = parser.parse_args()

    docs = load_cpt_documents(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        n_params = build_model(model_dir, docs, args.hidden, args.layers, args.vocab)
        cfg = CptConfig(r=16, lora_alpha=32, use_rslora=False, target_modules=args.target_modules,
                        learning_rate=1e-3, embedding_learning_rate=1e-4, max_steps=args.steps,
                        batch_size=args.batch_size, gradient_accumulation_steps=1, warmup_ratio=0.0,
                        lr_scheduler="constant", save_steps=0)
        model_cfg = ModelConfig(path=str(model_dir), max_seq_length=args.seq_len)
        print(f"model: random Llama, {n_params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers, "
              f"vocab {args.vocab}); LoRA r={cfg.r} on {args.target_modules}; {args.steps} steps of "
              f"{args.batch_size} x {args.seq_len} tokens; fp32, {torch.get_num_threads()} CPU threads")

        bare = bare_loop(cfg, model_cfg, docs, seed=0)
        out = train_cpt(cfg, model_cfg, DataPath(path=args.data), 0, tmp / "cpt", device="cpu", backend="hf")
        stats = json.loads((out / "cpt_stats.json").read_text())

    print(f"bare PyTorch loop:        {bare['tokens_per_second']:8.1f} tokens/s ({bare['seconds']:.1f} s); "
          f"mean loss {bare['loss']:.5f}")
    print(f"pipeline CPT (Trainer):   {stats['tokens_per_second']:8.1f} tokens/s ({stats['seconds']:.1f} s); "
          f"mean loss {stats['train_loss']:.5f}")
    print(f"ratio pipeline / bare: {stats['tokens_per_second'] / bare['tokens_per_second']:.2f}x (target >= 0.8x)")


if __name__ == "__main__":
    main()
