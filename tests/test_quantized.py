"""model.load_in_4bit: QLoRA CPT/SFT on nf4 base weights; the merge uses the 16-bit weights and reports the drift.

bitsandbytes (0.50) runs nf4 on the CPU, so the whole path runs here; where it cannot run, the run stops with one line.
"""

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model, tiny_overrides
from test_pipeline import compose_cfg
from pipeline.core.outputs import PipelineError
from pipeline.core.devices import check_4bit_support
from pipeline.run import run_pipeline

bnb = pytest.importorskip("bitsandbytes")


def test_qlora_cpt_merges_into_16bit_and_reports_drift(tmp_path, data_files):
    # hidden 64: bitsandbytes' CPU kernel needs rows of at least one 64-value quantization block
    model = make_tiny_model(tmp_path / "model", hidden_size=64)
    cfg = compose_cfg(tiny_overrides(model, data_files, **{"model.load_in_4bit": "true", "cpt.learning_rate": 0.01}))
    metrics = run_pipeline(cfg, tmp_path / "run")

    stats = json.loads((tmp_path / "run" / "cpt_adapter" / "cpt_stats.json").read_text())
    # counted on the trained model: 2 layers x (4 attention + 3 MLP) linears ran in nf4
    assert stats["load_in_4bit"] is True and stats["linear_4bit_modules"] == 14
    check = json.loads((tmp_path / "run" / "cpt_model" / "merge_check.json").read_text())
    # the merge itself (16-bit base + adapter vs merged) is exact; the 4-bit model CPT trained is not the same model
    assert check["max_abs_logit_diff"] <= 1e-4
    drift = check["quantized_training_drift"]
    assert 0 < drift["max_abs_logit_diff"] < 5 and 0 <= drift["top1_agreement"] <= 1
    assert metrics["merge/4bit_max_abs_logit_diff"] == drift["max_abs_logit_diff"]
    assert metrics["merge/4bit_top1_agreement"] == drift["top1_agreement"]
    # the base's own rounding, measured the same way: nonzero, and reported next to the trained model's drift
    assert 0 < drift["base_mean_abs_logit_diff"] and 0 <= drift["base_top1_agreement"] <= 1
    assert metrics["merge/4bit_base_mean_abs_logit_diff"] == drift["base_mean_abs_logit_diff"]
    # the CPT model is a plain 16/32-bit checkpoint, not a quantized one
    config = json.loads((tmp_path / "run" / "cpt_model" / "config.json").read_text())
    assert "quantization_config" not in config
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "cpt_model").dtype == torch.float32
    assert json.loads((tmp_path / "run" / "sft_adapter" / "sft_stats.json").read_text())["linear_4bit_modules"] == 14
    assert "sft/contains" in metrics


def test_a_merge_where_4bit_cannot_run_still_merges_and_says_why_there_is_no_drift(tmp_path, data_files,
                                                                                   monkeypatch):
    model = make_tiny_model(tmp_path / "model", hidden_size=64)
    cfg = compose_cfg(tiny_overrides(model, data_files, **{"model.load_in_4bit": "true", "stages": "[cpt]"}))
    run_pipeline(cfg, tmp_path / "cpt")

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no 4-bit kernel for this backend")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", no_kernel)  # e.g. merging on another machine
    cfg = compose_cfg(tiny_overrides(model, data_files, **{
        "model.load_in_4bit": "true", "stages": "[merge]", "inputs.cpt_adapter": str(tmp_path / "cpt" / "cpt_adapter"),
        "cache.enabled": "false"}))
    metrics = run_pipeline(cfg, tmp_path / "merge")
    check = json.loads((tmp_path / "merge" / "cpt_model" / "merge_check.json").read_text())
    assert check["max_abs_logit_diff"] <= 1e-4  # the merge itself is checked as always
    assert "cannot run 4-bit (nf4) on cpu here" in check["quantized_training_drift"]["not_measured"]
    assert not [k for k in metrics if k.startswith("merge/4bit_")]


def test_prequantized_base_is_refused(tmp_path, data_files):
    model = make_tiny_model(tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError, match=r"a pre-quantized checkpoint; the merge needs the 16-bit weights"):
        run_pipeline(compose_cfg(tiny_overrides(model, data_files)), tmp_path / "run")


def test_without_bitsandbytes_the_option_fails_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes → ImportError
    with pytest.raises(PipelineError, match=r"model.load_in_4bit=true needs bitsandbytes: pip install bitsandbytes"):
        check_4bit_support(torch.device("cpu"))


def test_a_bitsandbytes_without_a_kernel_for_the_device_fails_clearly(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no 4-bit kernel for this backend\nmore detail")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", no_kernel)
    with pytest.raises(PipelineError, match=r"^model.load_in_4bit=true: bitsandbytes [0-9.]+ cannot run 4-bit \(nf4\) "
                                            r"on cpu here \(no 4-bit kernel for this backend\); set "
                                            r"model.load_in_4bit=false$"):
        check_4bit_support(torch.device("cpu"))
