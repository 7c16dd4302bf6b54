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
import math
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .common import PipelineError, atomic_output, load_model, load_tokenizer, resolve_device, resolve_dtype, write_json
from .config import EvalConfig, ModelConfig
from .data import QAItem, load_qa
from .scoring import HEADLINE_METRICS, STRING_METRICS
from .backend import for_inference, load_for_training
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


def pad_right(seqs: Sequence[List[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token lists → (ids, attention mask), padded on the right (scoring; generation pads on the left)."""
    ids = torch.full((len(seqs), max(len(x) for x in seqs)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(seqs):
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return ids, mask


@torch.no_grad()
def answer_logprobs(model, tokenizer, contexts: Sequence[str], answers: Sequence[str], batch_size: int,
                    device: torch.device) -> List[float]:
    """Mean per-token log-probability of each answer given its context (teacher forcing, one forward per batch)."""
    out: List[float] = []
    pairs = [encode_pair(tokenizer, c, a) for c, a in zip(contexts, answers)]
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        ids, mask = pad_right([c + a for c, a in batch], tokenizer.pad_token_id)
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        for i, (c, a) in enumerate(batch):
            positions = torch.arange(len(c) - 1, len(c) + len(a) - 1)  # logits at t predict token t+1
            targets = torch.tensor(a)
            out.append(logp[i, positions, targets].mean().item())
    return out


@torch.no_grad()
def text_nll(model, tokenizer, texts: Sequence[str], batch_size: int, device: torch.device,
             max_length: int = 1024) -> Tuple[float, int]:
    """Summed negative log-likelihood and token count of `texts` (each scored on its own, first token excluded)."""
    total, count = 0.0, 0
    encoded = [tokenizer(t)["input_ids"][:max_length] for t in texts]
    for start in range(0, len(encoded), batch_size):
        ids, mask = pad_right(encoded[start:start + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
        keep = mask[:, 1:].to(device).bool()
        total -= logp[keep].sum().item()
        count += int(keep.sum().item())
    return total, count


_REPEAT = re.compile(r"(.{2,10}?)\1\1")  # a 2-10 character piece three times in a row: "工場工場工場"


def is_repetitive(text: str) -> bool:
    return bool(_REPEAT.search(text))


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


def _load(kind: str, paths: Dict[str, Tuple[str, Optional[str]]], model_cfg: ModelConfig, dev, dtype,
          backend: str = "hf"):
    """A model as it is deployed: 16-bit weights (never 4-bit, even after QLoRA training), plus the SFT adapter."""
    model_dir, adapter = paths[kind]
    tok = load_tokenizer(adapter or model_dir, model_cfg.trust_remote_code)
    if backend == "unsloth":
        from dataclasses import replace

        model = load_for_training(backend, model_dir, replace(model_cfg, load_in_4bit=False), dtype, dev)
    else:
        model = load_model(model_dir, dtype, dev, model_cfg.trust_remote_code)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).to(dev)
    return for_inference(backend, model.eval()), tok


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
            row["repetitive"] = is_repetitive(text)
            row["in_format"] = (bool(re.fullmatch(cfg.expected_format, text)) if cfg.expected_format
                                else bool(text) and stopped and not row["repetitive"])
        rows.append(row)
    return rows


def judge_rows(judge, judge_tok, qa: List[QAItem], rows: List[dict], cfg: EvalConfig, dev) -> None:
    """Add `judge` (1.0/0.0) to each row: does the judge model find はい likelier than いいえ?"""
    prompts = [cfg.judge_prompt.format(question=q.question, gold=q.answer, answer=r["answer"])
               for q, r in zip(qa, rows)]
    yes = answer_logprobs(judge, judge_tok, prompts, ["はい"] * len(prompts), cfg.batch_size, dev)
    no = answer_logprobs(judge, judge_tok, prompts, ["いいえ"] * len(prompts), cfg.batch_size, dev)
    for r, y, n in zip(rows, yes, no):
        r["judge"] = float(y > n)


TRANSITIONS = ("known_before", "learned_kept", "learned_lost", "not_learned", "sft_only")


def transition(base: float, cpt: float, sft: float) -> str:
    """Where a question's knowledge came from and whether it survived SFT (by answer-contained)."""
    if base:
        return "known_before"
    if cpt:
        return "learned_kept" if sft else "learned_lost"
    return "sft_only" if sft else "not_learned"


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
            metrics["sft/repetition_rate"] = sum(r["repetitive"] for r in rows) / n
            metrics["sft/format_rate"] = sum(r["in_format"] for r in rows) / n
        if rows and "judge" in rows[0]:
            metrics[f"{kind}/judge"] = sum(r["judge"] for r in rows) / n
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
             out_dir: str | Path, device: str = "auto", general_qa_path: Optional[str] = None,
             heldout_path: Optional[str] = None, backend: str = "hf") -> Path:
    """Score the QA set on each of `models` ({"base": (dir, None), "cpt": (dir, None), "sft": (dir, adapter)}).

    Optionally also a general-knowledge QA set (`<model>/general_<metric>`) and the perplexity of held-out domain text
    (`<model>/heldout_ppl`). Writes answers.jsonl (one line per question, all models side by side, with the
    question's transition base → CPT → SFT), lost_questions.jsonl (learned by CPT, lost after SFT) and
    eval_metrics.json to `out_dir`.
    """
    from .data import load_cpt_documents

    if cfg.headline_metric not in HEADLINE_METRICS:
        raise PipelineError(f"eval.headline_metric={cfg.headline_metric!r}: use one of {', '.join(HEADLINE_METRICS)}")
    out_dir = Path(out_dir)
    dev = resolve_device(device)
    dtype = resolve_dtype(model_cfg.dtype, dev)
    qa = load_qa(qa_path)
    if cfg.max_questions:
        qa = qa[: cfg.max_questions]
    general = load_qa(general_qa_path, key="data.general_qa.path") if general_qa_path else []
    heldout = load_cpt_documents(heldout_path, key="data.heldout.path") if heldout_path else []
    per_model: Dict[str, List[dict]] = {}
    per_model_general: Dict[str, List[dict]] = {}
    extra: Dict[str, float] = {}
    for kind in MODEL_NAMES:
        if kind not in models:
            continue
        t0 = time.time()
        model, tok = _load(kind, models, model_cfg, dev, dtype, backend)
        per_model[kind] = score_model(kind, model, tok, qa, cfg, model_cfg, dev)
        if general:
            per_model_general[kind] = score_model(kind, model, tok, general, cfg, model_cfg, dev)
        if heldout:
            nll, n_tok = text_nll(model, tok, heldout, cfg.batch_size, dev)
            extra[f"{kind}/heldout_ppl"] = math.exp(nll / n_tok)
        rows = per_model[kind]
        log.info("eval %-4s: %d questions in %.1fs; contains %.3f, exact %.3f, logprob %.3f%s", kind, len(qa),
                 time.time() - t0, sum(r["contains"] for r in rows) / len(rows),
                 sum(r["exact_match"] for r in rows) / len(rows), sum(r["logprob"] for r in rows) / len(rows),
                 f", held-out ppl {extra[f'{kind}/heldout_ppl']:.1f}" if heldout else "")
        del model
    if cfg.judge_path:
        judge = load_model(cfg.judge_path, dtype, dev, model_cfg.trust_remote_code).eval()
        judge_tok = load_tokenizer(cfg.judge_path, model_cfg.trust_remote_code)
        for rows in per_model.values():
            judge_rows(judge, judge_tok, qa, rows, cfg, dev)
        del judge
    metrics = summarize(per_model, cfg.headline_metric, [q.group for q in qa])
    metrics["n_questions"] = len(qa)
    metrics.update(extra)
    if general:
        g = summarize(per_model_general, cfg.headline_metric)
        for kind in per_model_general:
            for name in (*STRING_METRICS, "logprob"):
                metrics[f"{kind}/general_{name}"] = g[f"{kind}/{name}"]
        metrics["n_general_questions"] = len(general)
    transitions = None
    if all(k in per_model for k in MODEL_NAMES):
        transitions = [transition(b["contains"], c["contains"], s["contains"])
                       for b, c, s in zip(*(per_model[k] for k in MODEL_NAMES))]
        for t in TRANSITIONS:
            metrics[f"transitions/{t}"] = transitions.count(t)
    with atomic_output(out_dir) as tmp:
        with open(tmp / "answers.jsonl", "w", encoding="utf-8") as f, \
                open(tmp / "lost_questions.jsonl", "w", encoding="utf-8") as lost:
            for i, q in enumerate(qa):
                line = {"id": q.id, "question": q.question, "gold": q.answer, "aliases": q.aliases, "group": q.group}
                if transitions:
                    line["transition"] = transitions[i]
                line.update({kind: rows[i] for kind, rows in per_model.items()})
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                if transitions and transitions[i] == "learned_lost":
                    lost.write(json.dumps(line, ensure_ascii=False) + "\n")
        write_json(tmp / "eval_metrics.json", metrics)
    return out_dir
