"""Stage 4 — score the QA set on the base model, the CPT model and the CPT model + SFT adapter.

    python -m pipeline.run stages=[eval] inputs.cpt_model=... inputs.sft_adapter=...

Two kinds of evidence per model:
- generated answers (greedy), scored by normalised exact match, answer-contained and character F1 against the gold
  answer and its aliases (pipeline/scoring.py). Base and CPT models are not instruction-tuned, so they get
  eval.completion_prompt and their answer ends at the first eval.completion_stop; the SFT model gets the chat template
  (or model.prompt_template) it was trained with, and we record whether it stopped by itself (EOS) within
  eval.max_new_tokens.
- the mean per-token log-probability of the gold answer after eval.completion_prompt, for all three models alike: it
  needs no answer format, so it measures knowledge in the base and CPT models too, and compares all three directly.

Headline: knowledge_gain = CPT − base, retention = SFT ÷ CPT (for logprob, which is negative: the share of the CPT
gain that SFT kept, (SFT − base) ÷ (CPT − base)).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .common import PipelineError, atomic_output, load_model, load_tokenizer, resolve_device, resolve_dtype, write_json
from .config import EvalConfig, ModelConfig
from .data import QAItem, load_qa
from .scoring import HEADLINE_METRICS, STRING_METRICS
from .sft import render_prompt

log = logging.getLogger(__name__)

MODEL_NAMES = ("base", "cpt", "sft")


def encode_pair(tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """Token ids of context and continuation as the model would see them in one text.

    Trailing spaces move from the context to the continuation (as lm-evaluation-harness does): BPE attaches a space to
    the following word, so "答え: 880" tokenizes as "答え", ":", " 880", not "答え", ":", " ", "880".
    """
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    ctx = tokenizer(stripped)["input_ids"]
    whole = tokenizer(stripped + continuation)["input_ids"]
    if whole[: len(ctx)] == ctx:
        return ctx, whole[len(ctx):]
    return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def answer_logprobs(model, tokenizer, contexts: Sequence[str], answers: Sequence[str], batch_size: int,
                    device: torch.device) -> List[float]:
    """Mean per-token log-probability of each answer given its context (teacher forcing, one forward per batch)."""
    out: List[float] = []
    pairs = [encode_pair(tokenizer, c, a) for c, a in zip(contexts, answers)]
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        seqs = [c + a for c, a in batch]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        for i, (c, a) in enumerate(batch):
            positions = torch.arange(len(c) - 1, len(c) + len(a) - 1)  # logits at t predict token t+1
            targets = torch.tensor(a)
            out.append(logp[i, positions, targets].mean().item())
    return out


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int, device: torch.device,
             stop_ids: Sequence[int], stop_string: Optional[str] = None) -> List[Tuple[str, bool]]:
    """Greedy answers, batched with left padding. Returns (text, stopped_by_eos) per prompt."""
    from transformers import GenerationConfig

    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop_ids),
                               pad_token_id=tokenizer.pad_token_id,
                               stop_strings=[stop_string] if stop_string else None)
    results: List[Tuple[str, bool]] = []
    for start in range(0, len(prompts), batch_size):
        batch = [p.rstrip(" ") for p in prompts[start:start + batch_size]]  # see encode_pair on trailing spaces
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
        seqs = model.generate(**enc, generation_config=gen_cfg, tokenizer=tokenizer)
        for row in seqs[:, enc["input_ids"].shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stop_ids), None)
            text = tokenizer.decode(row[:cut] if cut is not None else row, skip_special_tokens=True)
            if stop_string:
                text = text.split(stop_string)[0]
            # max_new_tokens can end inside a multi-byte character: drop the undecodable tail (U+FFFD).
            results.append((text.strip().rstrip("\ufffd").strip(), cut is not None))
    return results


def _stop_ids(tokenizer, model) -> List[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    return sorted(i for i in ids if i is not None)


def _load(kind: str, paths: Dict[str, Tuple[str, Optional[str]]], model_cfg: ModelConfig, dev, dtype):
    model_dir, adapter = paths[kind]
    tok = load_tokenizer(adapter or model_dir, model_cfg.trust_remote_code)
    model = load_model(model_dir, dtype, dev, model_cfg.trust_remote_code)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).to(dev)
    return model.eval(), tok


def score_model(kind: str, model, tok, qa: List[QAItem], cfg: EvalConfig, model_cfg: ModelConfig,
                dev: torch.device) -> List[dict]:
    """Per-question results for one model: logprob of the gold answer, the generated answer and its scores."""
    contexts = [cfg.completion_prompt.format(question=q.question) for q in qa]
    logps = answer_logprobs(model, tok, contexts, [q.answer for q in qa], cfg.batch_size, dev)
    if kind == "sft":
        prompts = [render_prompt([{"role": "user", "content": q.question}], tok, model_cfg.prompt_template)
                   for q in qa]
        answers = generate(model, tok, prompts, cfg.max_new_tokens, cfg.batch_size, dev, _stop_ids(tok, model))
    else:
        answers = generate(model, tok, contexts, cfg.max_new_tokens, cfg.batch_size, dev, _stop_ids(tok, model),
                           stop_string=cfg.completion_stop or None)
    rows = []
    for q, lp, (text, stopped) in zip(qa, logps, answers):
        row = {"answer": text, "logprob": lp}
        row.update({name: fn(text, q.answer, q.aliases) for name, fn in STRING_METRICS.items()})
        if kind == "sft":
            row["ended_with_eos"] = stopped
        rows.append(row)
    return rows


def summarize(per_model: Dict[str, List[dict]], headline: str, groups: Optional[Sequence[Optional[str]]] = None
              ) -> Dict[str, float]:
    """Means per model; `<model>/<metric>@<group>` too when questions carry a group label."""
    metrics: Dict[str, float] = {}
    for kind, rows in per_model.items():
        n = len(rows)
        for name in (*STRING_METRICS, "logprob"):
            metrics[f"{kind}/{name}"] = sum(r[name] for r in rows) / n
            for g in sorted({g for g in groups or [] if g}):
                sel = [r[name] for r, rg in zip(rows, groups) if rg == g]
                metrics[f"{kind}/{name}@{g}"] = sum(sel) / len(sel)
        metrics[f"{kind}/answer_chars"] = sum(len(r["answer"]) for r in rows) / n
        if kind == "sft":
            metrics["sft/eos_rate"] = sum(r["ended_with_eos"] for r in rows) / n
    metrics["headline_metric"] = headline
    base, cpt, sft = (metrics.get(f"{k}/{headline}") for k in MODEL_NAMES)
    metrics["knowledge_gain"] = cpt - base if cpt is not None and base is not None else None
    if headline == "logprob":
        metrics["retention"] = _gain_kept(base, cpt, sft)
    else:
        metrics["retention"] = sft / cpt if sft is not None and cpt else None
    lb, lc, ls = (metrics.get(f"{k}/logprob") for k in MODEL_NAMES)
    metrics["logprob_gain"] = lc - lb if lc is not None and lb is not None else None
    metrics["logprob_gain_kept"] = _gain_kept(lb, lc, ls)
    return metrics


def _gain_kept(base, cpt, sft):
    if None in (base, cpt, sft) or cpt == base:
        return None
    return (sft - base) / (cpt - base)


def evaluate(cfg: EvalConfig, model_cfg: ModelConfig, qa_path: str, models: Dict[str, Tuple[str, Optional[str]]],
             out_dir: str | Path, device: str = "auto") -> Path:
    """Score the QA set on each of `models` ({"base": (dir, None), "cpt": (dir, None), "sft": (dir, adapter)}).

    Writes answers.jsonl (one line per question, all models side by side) and eval_metrics.json to `out_dir`.
    """
    if cfg.headline_metric not in HEADLINE_METRICS:
        raise PipelineError(f"eval.headline_metric={cfg.headline_metric!r}: use one of {', '.join(HEADLINE_METRICS)}")
    out_dir = Path(out_dir)
    dev = resolve_device(device)
    dtype = resolve_dtype(model_cfg.dtype, dev)
    qa = load_qa(qa_path)
    if cfg.max_questions:
        qa = qa[: cfg.max_questions]
    per_model: Dict[str, List[dict]] = {}
    for kind in MODEL_NAMES:
        if kind not in models:
            continue
        t0 = time.time()
        model, tok = _load(kind, models, model_cfg, dev, dtype)
        per_model[kind] = score_model(kind, model, tok, qa, cfg, model_cfg, dev)
        rows = per_model[kind]
        log.info("eval %-4s: %d questions in %.1fs; contains %.3f, exact %.3f, logprob %.3f", kind, len(qa),
                 time.time() - t0, sum(r["contains"] for r in rows) / len(rows),
                 sum(r["exact_match"] for r in rows) / len(rows), sum(r["logprob"] for r in rows) / len(rows))
        del model
    metrics = summarize(per_model, cfg.headline_metric, [q.group for q in qa])
    metrics["n_questions"] = len(qa)
    with atomic_output(out_dir) as tmp:
        with open(tmp / "answers.jsonl", "w", encoding="utf-8") as f:
            for i, q in enumerate(qa):
                line = {"id": q.id, "question": q.question, "gold": q.answer, "aliases": q.aliases, "group": q.group}
                line.update({kind: rows[i] for kind, rows in per_model.items()})
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        write_json(tmp / "eval_metrics.json", metrics)
    return out_dir
