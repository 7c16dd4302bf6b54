"""backend=auto|hf|unsloth: which stack trains, and the pipeline's settings in unsloth's terms.

unsloth needs CUDA, so here only the selection and the argument mapping are tested; the plain path is what
`backend=auto` runs on this machine (tests/test_pipeline.py and every other end-to-end test).
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import make_tiny_model, tiny_overrides
from test_pipeline import compose_cfg
from pipeline.core import backend as backends
from pipeline.core.backend import (resolve_backend, trains_embeddings, unsloth_blockers, unsloth_load_kwargs,
                                   unsloth_peft_kwargs)
from pipeline.core.outputs import PipelineError
from pipeline.core.checkpoints import declared_tied
from pipeline.core.config import ModelConfig
from pipeline.core.modules import resolve_targets, token_training
from pipeline.run import run_pipeline, validate

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


@pytest.mark.parametrize("installed", [False, True])
def test_auto_is_the_plain_path_without_cuda(monkeypatch, installed):
    monkeypatch.setattr(backends, "unsloth_installed", lambda: installed)
    assert resolve_backend("auto", CPU) == "hf"


def test_auto_takes_unsloth_on_cuda_when_installed(monkeypatch):
    monkeypatch.setattr(backends, "unsloth_installed", lambda: True)
    assert resolve_backend("auto", CUDA) == "unsloth"
    monkeypatch.setattr(backends, "unsloth_installed", lambda: False)
    assert resolve_backend("auto", CUDA) == "hf"
    assert resolve_backend("hf", CUDA) == "hf"


def test_unsloth_refuses_a_cpu_even_when_installed(monkeypatch):
    monkeypatch.setattr(backends, "unsloth_installed", lambda: True)
    with pytest.raises(PipelineError, match=r"^backend=unsloth needs a CUDA GPU, but this run's device is cpu "
                                            r"\(torch.cuda.is_available\(\)=False\); unsloth's CPU fallback would "
                                            r"silently run the plain path: use backend=hf or backend=auto$"):
        resolve_backend("unsloth", CPU)


def test_unsloth_on_cuda_without_the_package(monkeypatch):
    monkeypatch.setattr(backends, "unsloth_installed", lambda: False)
    with pytest.raises(PipelineError, match=r"backend=unsloth: unsloth is not installed; pip install -e '.\[gpu\]'"):
        resolve_backend("unsloth", CUDA)


def test_what_unsloth_cannot_train_is_known_before_any_import():
    both = ["cpt", "merge", "sft", "eval"]
    plain = ModelConfig(path="m")
    assert trains_embeddings("attn_mlp_embed") and not trains_embeddings("attn_mlp")
    assert trains_embeddings(["q_proj", "lm_head"]) and not trains_embeddings(["q_proj", "v_proj"])
    assert trains_embeddings(["wte"], {"embed": "wte"})  # model.modules renames the embedding
    # embedding training matters only when the model is (or may be) tied, and only for the stages that run
    assert unsloth_blockers(plain, both, "attn_mlp_embed", "attn_mlp", tied=False) == []
    assert unsloth_blockers(plain, both, "attn_mlp", "attn_mlp", tied=True) == []
    (reason,) = unsloth_blockers(plain, both, "attn_mlp_embed", "attn_mlp", tied=True)
    assert reason.startswith("cpt.target_modules=attn_mlp_embed (embedding training on a model with tied embeddings")
    assert unsloth_blockers(plain, ["sft", "eval"], "attn_mlp_embed", "attn_mlp", tied=True) == []
    assert "possibly tied" in unsloth_blockers(plain, both, "attn", "attn_mlp_embed", tied=None)[0]
    tokens = ModelConfig(path="m", add_special_tokens=["<|im_end|>"])
    assert unsloth_blockers(tokens, both, "attn", "attn", tied=False)[0].startswith("model.add_special_tokens")


def test_auto_takes_the_plain_path_for_what_unsloth_cannot_train(monkeypatch, caplog):
    monkeypatch.setattr(backends, "unsloth_installed", lambda: True)
    blockers = ["model.add_special_tokens (...)"]
    with caplog.at_level("INFO", logger="pipeline.core.backend"):
        assert resolve_backend("auto", CUDA, blockers) == "hf"
    assert "backend=auto: the plain path, because unsloth cannot run with model.add_special_tokens" in caplog.text
    with pytest.raises(PipelineError, match=r"^backend=unsloth cannot run with model.add_special_tokens \(...\); use "
                                            r"backend=hf \(or backend=auto\)$"):
        resolve_backend("unsloth", CUDA, blockers)


def test_a_second_gpu_is_chosen_outside_unsloth(monkeypatch):
    monkeypatch.setattr(backends, "unsloth_installed", lambda: True)
    assert resolve_backend("auto", torch.device("cuda:0")) == "unsloth"
    assert resolve_backend("auto", torch.device("cuda:1")) == "hf"
    with pytest.raises(PipelineError, match=r"^backend=unsloth cannot run with device=cuda:1 \(.*"
                                            r"CUDA_VISIBLE_DEVICES=1 and device=cuda\)"):
        resolve_backend("unsloth", torch.device("cuda:1"))


def test_tied_embeddings_are_read_from_config_json(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {
        "tie_word_embeddings": True}}))
    assert declared_tied(tmp_path) is True
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
    assert declared_tied(tmp_path) is False
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    assert declared_tied(tmp_path) is None and declared_tied(tmp_path / "missing") is None


def test_unknown_backend():
    with pytest.raises(PipelineError, match=r"backend='vllm': use one of auto, hf, unsloth"):
        resolve_backend("vllm", CPU)


def test_load_arguments_use_an_absolute_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kw = unsloth_load_kwargs("outputs/cpt_model", 2048, torch.bfloat16, load_in_4bit=False, trust_remote_code=False)
    # a relative path looks like a hub name (org/name) to unsloth, which would look it up online
    assert kw["model_name"] == str(tmp_path / "outputs" / "cpt_model") and Path(kw["model_name"]).is_absolute()
    assert kw["load_in_4bit"] is False  # unsloth's own default is True: the pipeline's setting is passed explicitly
    assert kw["local_files_only"] is True and kw["max_seq_length"] == 2048 and kw["dtype"] == torch.bfloat16


def tiny(tie: bool):
    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def test_peft_arguments_match_the_plain_path():
    targets = resolve_targets("attn_mlp_embed", tiny(tie=False))
    kw = unsloth_peft_kwargs(targets, r=16, alpha=32, dropout=0.0, use_rslora=True, seed=7)
    assert kw["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert kw["modules_to_save"] == ["embed_tokens", "lm_head"]  # trained in full, as on the plain path
    assert (kw["r"], kw["lora_alpha"], kw["use_rslora"], kw["random_state"], kw["bias"]) == (16, 32, True, 7, "none")
    # unsloth's offloaded checkpointing would save the frozen embeddings into the model directory: not with embed
    assert kw["use_gradient_checkpointing"] is True
    kw = unsloth_peft_kwargs(resolve_targets("attn", tiny(tie=False)), 8, 16, 0.1, False, 0)
    assert kw["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and kw["modules_to_save"] is None
    assert kw["use_gradient_checkpointing"] == "unsloth"


def test_what_unsloth_cannot_do_is_refused():
    tied = tiny(tie=True)
    with pytest.raises(PipelineError, match=r"backend=unsloth with tied embeddings and embed training"):
        unsloth_peft_kwargs(resolve_targets("attn_mlp_embed", tied), 16, 32, 0.0, False, 0)
    targets = resolve_targets("attn_mlp", tied)
    with pytest.raises(PipelineError, match=r"model.add_special_tokens with backend=unsloth"):
        unsloth_peft_kwargs(targets, 16, 32, 0.0, False, 0, token_training([60], targets, tied))


def test_auto_runs_the_plain_path_here(tiny_model, data_files, tmp_path):
    metrics = run_pipeline(compose_cfg(tiny_overrides(tiny_model, data_files, stages="[cpt]")), tmp_path)
    assert metrics["backend"] == "auto" and metrics["backend_used"] == "hf"
    import json

    assert json.loads((tmp_path / "cpt_adapter" / "cpt_stats.json").read_text())["backend"] == "hf"


def test_the_core_install_stays_cpu_friendly():
    """unsloth (which pulls CUDA torch) and bitsandbytes live in extras, never in the core dependencies."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    assert not any(name in core for name in ("unsloth", "bitsandbytes", "xformers", "torchvision"))
    gpu = " ".join(project["optional-dependencies"]["gpu"]).lower()
    assert "unsloth==" in gpu and "unsloth_zoo==" in gpu and "bitsandbytes" in gpu


def test_an_explicit_unsloth_is_checked_against_the_model_before_training(tmp_path, data_files):
    """config.json need not say whether embeddings are tied; validate reads the model and refuses before training."""
    model = make_tiny_model(tmp_path / "model", tie=True)
    cfg = compose_cfg(tiny_overrides(model, data_files, **{"cpt.target_modules": "attn_mlp_embed"}))
    validate(cfg, ["cpt", "merge", "sft", "eval"], "hf")
    with pytest.raises(PipelineError, match=r"^backend=auto chose unsloth, which cannot run with "
                                            r"cpt.target_modules=attn_mlp_embed \(embedding training on a model "
                                            r"with tied embeddings"):
        validate(cfg, ["cpt", "merge", "sft", "eval"], "unsloth")
