"""Stage 4 — score the QA set on the base model, the CPT model and the CPT model + SFT adapter.

    python -m pipeline.run stages=[eval] inputs.cpt_model=... inputs.sft_adapter=...

Two kinds of evidence per model:
- generated answers (greedy), scored by normalised exact match, answer-contained and character F1 against the gold
  answer and its aliases (pipeline/core/scoring.py). Base and CPT models are not instruction-tuned, so they get
  eval.completion_prompt; the SFT model gets the chat template (or prompt template) it was trained with, read from
  the adapter's prompt_format.json (pipeline/core/prompts.py).
- the mean per-token log-probability of the gold answer after eval.completion_prompt, for all three models alike: it
  needs no answer format, so it measures knowledge in the base and CPT models too, and compares all three directly.

The answer-cutting rule, one for all three models: greedy generation ends at EOS (the tokenizer's or the generation
config's) or after eval.max_new_tokens; the answer is the generated text from its first non-blank character up to the
first eval.completion_stop (default a newline), stripped: every model's answer is its first non-blank line. The SFT
model generates on until EOS, so that sft/eos_rate says whether it stopped by itself, and is then cut by the same
rule; base and CPT models stop generating at the cut, since nothing after it is used.

Retention, for every metric M (exact_match, contains, char_f1, logprob, judge, and general_* on the general QA set):
- cpt_gain/M = CPT − base.
- gain_kept/M = (SFT − base) ÷ (CPT − base): the share of what CPT changed that survives SFT (1: all of it, 0: back
  at the base model, above 1: SFT added to it). A ratio of means over the same questions. It is None, with the reason
  in gain_kept_reason/M, when |CPT − base| is below eval.min_gain (eval.min_logprob_gain, in nats, for logprob
  metrics): over a denominator of one or two questions the ratio is noise. On general_* metrics CPT's change is
  usually a loss, and gain_kept is then the share of that loss still there after SFT.
- sft_over_cpt/M = SFT ÷ CPT, for the share metrics only: the plain ratio, which also credits SFT with what the base
  model knew before CPT.
- knowledge_gain = cpt_gain of eval.headline_metric.
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

from pipeline.core.outputs import PipelineError, atomic_output, write_json
from pipeline.core.checkpoints import load_model, load_tokenizer
from pipeline.core.devices import resolve_device, resolve_dtype
from pipeline.core.config import DataConfig, EvalConfig, ModelConfig, cache_settings
from pipeline.core.data import QAItem, load_qa
from pipeline.core.scoring import HEADLINE_METRICS, STRING_METRICS
from pipeline.core.backend import for_inference, load_for_training
from pipeline.core.prompts import render_prompt, use_recorded_prompt_format

log = logging.getLogger(__name__)

MODEL_NAMES = ("base", "cpt", "sft")


def key_material(cfg: EvalConfig, data_cfg: DataConfig) -> dict:
    """What the scores depend on besides the models (run.py adds those): the settings and every file read here."""
    from pipeline.cache import fingerprint_model
    from pipeline.core.data import fingerprint_documents, fingerprint_qa, qa_fields

    out = {"eval": cache_settings(cfg), "judge": fingerprint_model(cfg.judge_path) if cfg.judge_path else None}
    for name in ("qa", "general_qa"):  # the records as scored, whatever the format (core/data.py)
        part = getattr(data_cfg, name)
        out[name] = fingerprint_qa(part.path, f"data.{name}.path", **qa_fields(part)) if part.path else None
    heldout = data_cfg.heldout
    out["heldout"] = fingerprint_documents(heldout.path, heldout.text_field, "data.heldout.path") \
        if heldout.path else None
    return out


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
                    device: torch.device, reduce: str = "mean") -> List[float]:
    """Log-probability of each answer given its context (teacher forcing, one forward per batch): the mean per token
    (`reduce="mean"`, comparable across answers of different lengths) or the sum (`"sum"`: the whole answer's)."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce={reduce!r}: use 'mean' or 'sum'")
    out: List[float] = []
    pairs = [encode_pair(tokenizer, c, a) for c, a in zip(contexts, answers)]
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start:start + batch_size]
        ids, mask = pad_right([c + a for c, a in batch], tokenizer.pad_token_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for i, (c, a) in enumerate(batch):
            # Only the answer's rows go through log_softmax, in fp32: the logits at t predict token t+1. Normalising
            # every position over the whole vocabulary would copy the batch's logits twice (fp32, then log-probs).
            rows = logits[i, len(c) - 1: len(c) + len(a) - 1].float()
            lp = torch.log_softmax(rows, -1).gather(-1, torch.tensor(a, device=rows.device)[:, None])[:, 0]
            out.append((lp.sum() if reduce == "sum" else lp.mean()).item())
    return out


@torch.no_grad()
def text_nll(model, tokenizer, texts: Sequence[str], batch_size: int, device: torch.device,
             max_length: int = 1024) -> Tuple[float, int]:
    """Summed negative log-likelihood and token count of `texts` (each scored on its own, first token excluded)."""
    total, count = 0.0, 0
    encoded = [tokenizer(t)["input_ids"][:max_length] for t in texts]
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        ids, mask = pad_right(batch, tokenizer.pad_token_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for i, x in enumerate(batch):
            if len(x) < 2:
                continue
            # One text's real positions at a time, in fp32: no log-probs over the padding, no fp32 copy of the batch.
            rows = logits[i, :len(x) - 1].float()
            total += torch.nn.functional.cross_entropy(rows, torch.tensor(x[1:], device=rows.device),
                                                       reduction="sum").item()
            count += len(x) - 1
    return total, count


_REPEAT = re.compile(r"(.{2,10}?)\1\1")  # a 2-10 character piece three times in a row: "工場工場工場"


def is_repetitive(text: str) -> bool:
    return bool(_REPEAT.search(text))


def cut_answer(text: str, stop: Optional[str]) -> str:
    """The answer-cutting rule (module docstring): from the first non-blank character to the first `stop`, stripped."""
    text = text.lstrip()
    if stop:
        text = text.split(stop, 1)[0]
    # max_new_tokens can end inside a multi-byte character: drop the undecodable tail (U+FFFD).
    return text.strip().rstrip("\ufffd").strip()


def _stop_at_cut(tokenizer, prompt_len: int, stop: str):
    """A stopping criterion that ends a row once its answer is complete under cut_answer: `stop` occurs after the
    first non-blank text. (transformers' own stop_strings would also stop at a leading newline, before any answer.)"""
    from transformers import StoppingCriteria

    class StopAtCut(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            return torch.tensor([stop in t.lstrip() for t in texts], dtype=torch.bool, device=input_ids.device)

    return StopAtCut()


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int, device: torch.device,
             stop_ids: Sequence[int], stop_string: Optional[str] = None, stop_at_cut: bool = True
             ) -> List[Tuple[str, bool]]:
    """Greedy answers, batched with left padding, cut by cut_answer. Returns (answer, stopped_by_eos) per prompt.

    `stop_at_cut`: stop generating a row once its answer is complete (saves time); False generates on until EOS or
    max_new_tokens, so that stopped_by_eos says whether the model would have stopped by itself.
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop_ids),
                               pad_token_id=tokenizer.pad_token_id)
    results: List[Tuple[str, bool]] = []
    for start in range(0, len(prompts), batch_size):
        batch = [p.rstrip(" ") for p in prompts[start:start + batch_size]]  # see encode_pair on trailing spaces
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(device)
        prompt_len = enc["input_ids"].shape[1]
        criteria = StoppingCriteriaList([_stop_at_cut(tokenizer, prompt_len, stop_string)]
                                        if stop_at_cut and stop_string else [])
        seqs = model.generate(**enc, generation_config=gen_cfg, stopping_criteria=criteria)
        for row in seqs[:, prompt_len:].tolist():
            eos = next((i for i, t in enumerate(row) if t in stop_ids), None)
            text = tokenizer.decode(row[:eos] if eos is not None else row, skip_special_tokens=True)
            results.append((cut_answer(text, stop_string), eos is not None))
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
                dev: torch.device, prompt_template: Optional[str] = None) -> List[dict]:
    """Per-question results for one model: logprob of the gold answer, the generated answer and its scores.

    The SFT model is asked through `tok`'s chat template, or `prompt_template` (default model.prompt_template) when
    it has none; the answers of all models are cut by the same rule (cut_answer)."""
    contexts = [cfg.completion_prompt.format(question=q.question) for q in qa]
    logps = answer_logprobs(model, tok, contexts, [q.answer for q in qa], cfg.batch_size, dev)
    stop = cfg.completion_stop or None
    if kind == "sft":
        template = model_cfg.prompt_template if prompt_template is None else prompt_template
        prompts = [render_prompt([{"role": "user", "content": q.question}], tok, template) for q in qa]
        answers = generate(model, tok, prompts, cfg.max_new_tokens, cfg.batch_size, dev, _stop_ids(tok, model),
                           stop_string=stop, stop_at_cut=False)  # on to EOS: sft/eos_rate
    else:
        answers = generate(model, tok, contexts, cfg.max_new_tokens, cfg.batch_size, dev, _stop_ids(tok, model),
                           stop_string=stop)
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
    """Add `judge` (1.0/0.0) to each row: does the judge model find はい likelier than いいえ?

    The whole words' log-probabilities (summed over their tokens) are compared: a per-token mean would favour the
    word split into more tokens whenever its later tokens are near-certain continuations."""
    prompts = [cfg.judge_prompt.format(question=q.question, gold=q.answer, answer=r["answer"])
               for q, r in zip(qa, rows)]
    yes = answer_logprobs(judge, judge_tok, prompts, ["はい"] * len(prompts), cfg.batch_size, dev, reduce="sum")
    no = answer_logprobs(judge, judge_tok, prompts, ["いいえ"] * len(prompts), cfg.batch_size, dev, reduce="sum")
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


def summarize(per_model: Dict[str, List[dict]], headline: str, groups: Optional[Sequence[Optional[str]]] = None,
              min_gain: float = EvalConfig.min_gain, min_logprob_gain: float = EvalConfig.min_logprob_gain
              ) -> Dict[str, object]:
    """Means per model (`<model>/<metric>`, and `<model>/<metric>@<group>` when questions carry a group label), then
    cpt_gain, gain_kept (with gain_kept_reason) and sft_over_cpt per metric and knowledge_gain (module docstring)."""
    metrics: Dict[str, object] = {}
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
    for name in (*STRING_METRICS, "logprob", "judge"):  # add_gain_metrics skips what was not measured
        add_gain_metrics(metrics, name, min_gain, min_logprob_gain)
    metrics["knowledge_gain"] = metrics.get(f"cpt_gain/{headline}")
    return metrics


def gain_threshold(name: str, min_gain: float, min_logprob_gain: float) -> Tuple[float, str]:
    """The smallest |CPT − base| for which gain_kept/<name> is reported, and the config key that sets it."""
    if name.endswith("logprob"):
        return min_logprob_gain, "eval.min_logprob_gain"
    return min_gain, "eval.min_gain"


# A difference of means of 0/1 scores that is 2/100 on paper can come out as 0.019999999999999962 in floating point.
GAIN_TOLERANCE = 1e-9


def gain_kept(base: float, cpt: float, sft: float, threshold: float, key: str = "the threshold"
              ) -> Tuple[Optional[float], Optional[str]]:
    """(SFT − base) ÷ (CPT − base) and None, or None and the reason when |CPT − base| is below `threshold`."""
    gain = cpt - base
    if gain == 0 or abs(gain) < threshold - GAIN_TOLERANCE:
        return None, f"|CPT - base| = {abs(gain):.3g} < {key} {threshold:g}" if threshold else "CPT - base = 0"
    return (sft - base) / gain, None


def add_gain_metrics(metrics: Dict[str, object], name: str, min_gain: float, min_logprob_gain: float) -> None:
    """cpt_gain/<name>, gain_kept/<name>, gain_kept_reason/<name> (None when defined) and, for share metrics,
    sft_over_cpt/<name>, from `<model>/<name>` in `metrics`; nothing for models that were not evaluated."""
    base, cpt, sft = (metrics.get(f"{k}/{name}") for k in MODEL_NAMES)
    if base is None or cpt is None:
        return
    metrics[f"cpt_gain/{name}"] = cpt - base
    if sft is None:
        return
    threshold, key = gain_threshold(name, min_gain, min_logprob_gain)
    metrics[f"gain_kept/{name}"], metrics[f"gain_kept_reason/{name}"] = gain_kept(base, cpt, sft, threshold, key)
    if not name.endswith("logprob"):
        metrics[f"sft_over_cpt/{name}"] = sft / cpt if cpt else None


def evaluate(cfg: EvalConfig, model_cfg: ModelConfig, qa_path: str, models: Dict[str, Tuple[str, Optional[str]]],
             out_dir: str | Path, device: str = "auto", general_qa_path: Optional[str] = None,
             heldout_path: Optional[str] = None, backend: str = "hf", heldout_text_field: str = "text") -> Path:
    """Score the QA set on each of `models` ({"base": (dir, None), "cpt": (dir, None), "sft": (dir, adapter)}).

    Optionally also a general-knowledge QA set (`<model>/general_<metric>`) and the perplexity of held-out domain text
    (`<model>/heldout_ppl`; in .jsonl files, each line's `heldout_text_field`). The SFT model is asked in the format
    recorded next to its adapter (pipeline/core/prompts.py). Writes answers.jsonl (one line per question, all models side
    by side, with the question's transition base → CPT → SFT), lost_questions.jsonl (learned by CPT, lost after SFT)
    and eval_metrics.json to `out_dir`.
    """
    from pipeline.core.data import load_cpt_documents, qa_source

    if cfg.headline_metric not in HEADLINE_METRICS:
        raise PipelineError(f"eval.headline_metric={cfg.headline_metric!r}: use one of {', '.join(HEADLINE_METRICS)}")
    out_dir = Path(out_dir)
    dev = resolve_device(device)
    dtype = resolve_dtype(model_cfg.dtype, dev)
    qa_file, fields = qa_source(qa_path)  # a path, or a config.DataPath with its field-mapping keys
    qa = load_qa(qa_file, **fields)
    if cfg.max_questions:
        qa = qa[: cfg.max_questions]
    general_file, fields = qa_source(general_qa_path)
    general = load_qa(general_file, key="data.general_qa.path", **fields) if general_file else []
    heldout = load_cpt_documents(heldout_path, heldout_text_field, key="data.heldout.path") if heldout_path else []
    per_model: Dict[str, List[dict]] = {}
    per_model_general: Dict[str, List[dict]] = {}
    extra: Dict[str, float] = {}
    for kind in MODEL_NAMES:
        if kind not in models:
            continue
        t0 = time.time()
        model, tok = _load(kind, models, model_cfg, dev, dtype, backend)
        template = model_cfg.prompt_template
        if kind == "sft" and models[kind][1]:  # ask the SFT model exactly as it was trained
            template = use_recorded_prompt_format(tok, models[kind][1], model_cfg)
        per_model[kind] = score_model(kind, model, tok, qa, cfg, model_cfg, dev, template)
        if general:
            per_model_general[kind] = score_model(kind, model, tok, general, cfg, model_cfg, dev, template)
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
    metrics = summarize(per_model, cfg.headline_metric, [q.group for q in qa], cfg.min_gain, cfg.min_logprob_gain)
    metrics["n_questions"] = len(qa)
    metrics.update(extra)
    if general:
        g = summarize(per_model_general, cfg.headline_metric)
        for name in (*STRING_METRICS, "logprob"):
            for kind in per_model_general:
                metrics[f"{kind}/general_{name}"] = g[f"{kind}/{name}"]
            add_gain_metrics(metrics, f"general_{name}", cfg.min_gain, cfg.min_logprob_gain)
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
