"""The merge stage refuses a merge whose logits differ from the adapter model's."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_tiny_model
from pipeline.common import PipelineError
from pipeline.config import MergeConfig, ModelConfig
from pipeline.merge import merge_adapter


def save_adapter(model_dir, out, target_modules, **lora_kw):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, **lora_kw))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            p.data.normal_(0, 0.5)  # as if trained: a zero B would make the adapter a no-op
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def test_lora_on_tied_embeddings_is_caught(tmp_path):
    """The PEFT trap: LoRA on a tied embed_tokens + lm_head writes both deltas into the one shared tensor."""
    model_dir = make_tiny_model(tmp_path / "tied", tie=True)
    adapter = save_adapter(model_dir, tmp_path / "adapter", ["q_proj", "embed_tokens", "lm_head"])
    with pytest.raises(PipelineError, match=r"merge check failed: merged model's logits differ from the adapter "
                                            r"model's by [0-9.]+ \(> [0-9.e-]+ = merge.max_abs_logit_diff 0.0001 \+ "
                                            r"merge.rel_logit_diff 0.0001 x max\|logit\| [0-9.]+\)"):
        merge_adapter(MergeConfig(), ModelConfig(path=str(model_dir)), adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert not list(tmp_path.glob("merged.tmp-*"))  # nothing half-written is left behind


def test_good_merge_in_bfloat16_reports_drift(tmp_path):
    model_dir = make_tiny_model(tmp_path / "m")
    adapter = save_adapter(model_dir, tmp_path / "adapter", ["q_proj", "v_proj"])
    out = merge_adapter(MergeConfig(save_dtype="bfloat16"), ModelConfig(path=str(model_dir)), adapter,
                        tmp_path / "merged")
    check = json.loads((out / "merge_check.json").read_text())
    assert check["max_abs_logit_diff"] <= 1e-4        # the fp32 merge itself is exact
    assert check["save_dtype"] == "bfloat16" and check["save_dtype_logit_drift"] > 0  # rounding, reported
    assert check["reload_max_abs_logit_diff"] <= 1e-5  # the file reproduces what was verified
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
