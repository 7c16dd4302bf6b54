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
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .common import PipelineError, atomic_output, load_model, load_tokenizer, write_json
from .config import MergeConfig, ModelConfig
from .modules import is_tied

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


def merge_adapter(cfg: MergeConfig, model_cfg: ModelConfig, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge `adapter_dir` into model.path in fp32, verify logits, save a standalone checkpoint at `out_dir`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tok = load_tokenizer(adapter_dir, model_cfg.trust_remote_code)
    base = load_model(model_cfg.path, torch.float32, torch.device("cpu"), model_cfg.trust_remote_code)
    base_tied = is_tied(base)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids = check_sample(tok, cfg.check_tokens)
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
        })
    return out_dir
