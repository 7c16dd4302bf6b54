"""Stage 2 — merge the CPT adapter into the base model and save a standalone checkpoint (the "CPT model").

    python -m pipeline.run stages=[cpt,merge]

The merge always happens in float32 on the 16/32-bit base from model.path (never into a quantized model, which
changes outputs: peft #2321). Right after merging, the merged model's logits are compared with the adapter model's on
a fixed sample (a text plus random token ids, so every embedding row the adapter could have moved is likely hit).
Tolerance: merge.max_abs_logit_diff + merge.rel_logit_diff × max|logit| (1e-4 + 1e-4 × max|logit|). A correct fp32
merge differs by ~1e-6 for logits of a few units; the rounding grows with the logits' size and the LoRA update's
(correct merges of the demo's CPT adapters: 9e-5 to 3.4e-4 at max|logit| 20); the tied-embedding bug differs by 5-30. Then the saved checkpoint is reloaded with plain transformers and must give the
same logits as the in-memory merged model (this catches a head that is re-tied or untied on save). Any failure stops
the stage and publishes nothing.

When CPT trained on a 4-bit copy of the base (model.load_in_4bit, QLoRA), the merge still uses the 16-bit weights
from model.path (a pre-quantized checkpoint is refused), and the logit drift between the 4-bit adapter model CPT
trained and the merged model is measured and reported. When CPT added tokens (model.add_special_tokens), the base is
grown to the adapter's vocabulary the same way CPT grew it before the adapter is applied.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .common import (PipelineError, atomic_output, is_prequantized, load_model, load_tokenizer, resolve_device,
                     resolve_dtype, write_json)
from .config import MergeConfig, ModelConfig
from .modules import embedding_rows, fit_embeddings, is_tied

log = logging.getLogger(__name__)

CHECK_TEXT = "検証用の固定サンプル: The merged model must match the adapter model. 設定値は880トン、温度は45℃。"
RELOAD_TOLERANCE = 1e-5  # reloading what was just saved must be exact up to summation order


def check_sample(tokenizer, n_random: int, seed: int = 1234) -> torch.Tensor:
    text_ids = tokenizer(CHECK_TEXT)["input_ids"]
    g = torch.Generator().manual_seed(seed)
    rand_ids = torch.randint(0, len(tokenizer), (n_random,), generator=g).tolist()
    return torch.tensor([text_ids + rand_ids])


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def _save_dtype(name: str, base_path: str, trust_remote_code: bool = False) -> torch.dtype:
    if name == "auto":
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
        name = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32")
        name = name.replace("torch.", "")
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise PipelineError(f"merge.save_dtype={name!r}: use auto, float32, bfloat16 or float16")
    return table[name]


def _with_adapter(base, adapter_dir, n_tokens: int, new_ids):
    """`base` grown to the adapter's vocabulary exactly as CPT grew it, with the adapter applied."""
    from peft import PeftModel

    fit_embeddings(base, n_tokens, new_ids)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def _compare(reference: torch.Tensor, other: torch.Tensor) -> dict:
    diff = (reference - other).abs()
    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "top1_agreement": (reference.argmax(-1) == other.argmax(-1)).float().mean().item()}


def quantized_drift(model_cfg: ModelConfig, adapter_dir, vocab: tuple, ids: torch.Tensor, merged_logits,
                    base_ids: torch.Tensor, base_logits, device: str) -> dict:
    """How far the merged 16-bit model is from the model CPT actually trained (4-bit base + adapter).

    This is not an error: QLoRA trains against rounded weights, and the merged model uses the exact ones. It is
    the price of training in 4-bit, reported so that a user can see it (stage log, merge_check.json, metrics.json).
    The same comparison for the base alone (16-bit vs 4-bit, no adapter: `base_*`) says how much of it is the
    rounding itself, which on a small model is most of it (SmolLM2-135M: mean |dlogit| 1.96 of 2.09 after 8 steps).
    """
    dev = resolve_device(device)
    q = load_model(model_cfg.path, resolve_dtype(model_cfg.dtype, dev), dev, model_cfg.trust_remote_code,
                   load_in_4bit=True)
    q_base_logits = _logits(q, base_ids.to(dev)).cpu()
    q_logits = _logits(_with_adapter(q, adapter_dir, *vocab), ids.to(dev)).cpu()
    del q
    return {**_compare(merged_logits, q_logits),
            **{f"base_{k}": v for k, v in _compare(base_logits, q_base_logits).items()}}


def merge_adapter(cfg: MergeConfig, model_cfg: ModelConfig, adapter_dir: str | Path, out_dir: str | Path,
                  device: str = "auto") -> Path:
    """Merge `adapter_dir` into model.path in fp32, verify logits, save a standalone checkpoint at `out_dir`."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    if is_prequantized(model_cfg.path):
        raise PipelineError(f"model.path={model_cfg.path}: a pre-quantized checkpoint (its config.json has a "
                            f"quantization_config); the merge needs the 16-bit weights. Point model.path at the "
                            f"16-bit model and set model.load_in_4bit=true to train in 4-bit")
    stats_file = Path(adapter_dir) / "cpt_stats.json"
    stats = json.loads(stats_file.read_text(encoding="utf-8")) if stats_file.is_file() else {}
    tok = load_tokenizer(adapter_dir, model_cfg.trust_remote_code)
    # Always the 16/32-bit weights from model.path, in fp32, even when CPT trained on a 4-bit copy of them.
    base = load_model(model_cfg.path, torch.float32, torch.device("cpu"), model_cfg.trust_remote_code)
    base_tied = is_tied(base)
    ids = check_sample(tok, cfg.check_tokens)
    quantized = bool(stats.get("load_in_4bit"))  # CPT trained on a 4-bit copy of the base (QLoRA)
    if quantized:  # the base's own logits, before the adapter (and any added rows) go in
        base_ids = ids[:, ids[0] < embedding_rows(base)]
        base_logits = _logits(base, base_ids)
    vocab = (len(tok), stats.get("added_token_ids", []))  # the vocabulary CPT trained with
    peft_model = _with_adapter(base, adapter_dir, *vocab)
    ref = _logits(peft_model, ids)

    merged = peft_model.merge_and_unload().eval()
    diff = (_logits(merged, ids) - ref).abs().max().item()
    scale = ref.abs().max().item()
    tolerance = cfg.max_abs_logit_diff + cfg.rel_logit_diff * scale
    log.info("merge check: max |logit(adapter) - logit(merged)| = %.3g on %d tokens (tolerance %.2g for max "
             "|logit| %.1f)", diff, ids.shape[1], tolerance, scale)
    if not diff <= tolerance:  # `not <=` also catches NaN
        raise PipelineError(
            f"merge check failed: merged model's logits differ from the adapter model's by {diff:.4g} (> "
            f"{tolerance:.3g} = merge.max_abs_logit_diff {cfg.max_abs_logit_diff:g} + merge.rel_logit_diff "
            f"{cfg.rel_logit_diff:g} x max|logit| {scale:.1f}); the merged model is broken and was not saved"
        )
    drift = None
    if quantized:
        try:  # a report, not a check: a machine that cannot run 4-bit still merges (e.g. stages=[merge] on a CPU)
            drift = quantized_drift(model_cfg, adapter_dir, vocab, ids, _logits(merged, ids), base_ids, base_logits,
                                    device)
            log.info("4-bit drift: the merged 16-bit model vs the 4-bit model CPT trained: max |dlogit| %.3g, mean "
                     "%.3g, same top-1 token on %.1f%% of positions (the base alone, 16-bit vs 4-bit: max %.3g, "
                     "mean %.3g, %.1f%%)", drift["max_abs_logit_diff"], drift["mean_abs_logit_diff"],
                     100 * drift["top1_agreement"], drift["base_max_abs_logit_diff"],
                     drift["base_mean_abs_logit_diff"], 100 * drift["base_top1_agreement"])
        except PipelineError as e:
            drift = {"not_measured": str(e)}
            log.warning("4-bit drift not measured: the 4-bit model CPT trained cannot be rebuilt here (%s); the merge "
                        "itself is verified as usual", e)
    if is_tied(merged) != base_tied:
        raise PipelineError(f"merge check failed: the base model's embeddings are {'tied' if base_tied else 'untied'}"
                            f" but the merged model's are not; refusing to save")

    save_dtype = _save_dtype(cfg.save_dtype, model_cfg.path, model_cfg.trust_remote_code)
    # What the saved file must reproduce: the merged weights as stored (a bf16 save rounds them once). Only the
    # parameters are rounded: buffers such as RoPE frequencies are not saved and are rebuilt in fp32 on reload.
    with torch.no_grad():
        for p in merged.parameters():
            p.data = p.data.to(save_dtype).to(torch.float32)
    stored = _logits(merged, ids)
    cast_drift = (stored - ref).abs().max().item()
    with atomic_output(out_dir) as tmp:
        merged.to(save_dtype).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)  # tokenizer files incl. the chat template
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, use_safetensors=True,
                                                        trust_remote_code=model_cfg.trust_remote_code).eval()
        reload_diff = (_logits(reloaded, ids) - stored).abs().max().item()
        log.info("reload check: max |logit(merged) - logit(reloaded checkpoint)| = %.3g (tolerance %.0e)",
                 reload_diff, RELOAD_TOLERANCE)
        if not reload_diff <= RELOAD_TOLERANCE or is_tied(reloaded) != base_tied:
            raise PipelineError(
                f"merge check failed: the saved checkpoint reloads with different logits (max diff "
                f"{reload_diff:.4g}, tied={is_tied(reloaded)} vs base tied={base_tied}); nothing was published"
            )
        write_json(tmp / "merge_check.json", {
            "adapter": str(adapter_dir), "base": str(model_cfg.path), "check_tokens": int(ids.shape[1]),
            "max_abs_logit_diff": diff, "tolerance": tolerance, "max_abs_logit": scale,
            "save_dtype": str(save_dtype).replace("torch.", ""), "save_dtype_logit_drift": cast_drift,
            "reload_max_abs_logit_diff": reload_diff, "tied_embeddings": base_tied,
            "vocab_rows": merged.get_input_embeddings().weight.shape[0], "quantized_training_drift": drift,
        })
    return out_dir
