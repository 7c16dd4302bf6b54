"""target_modules presets resolve to each architecture's own names; embeddings are never given LoRA."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.core.outputs import PipelineError
from pipeline.core.modules import resolve_targets

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def tiny(model_type: str, tie: bool = False, **kw):
    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie, **kw)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma2"])
def test_presets_on_llama_style_families(model_type):
    m = tiny(model_type)
    assert resolve_targets("attn", m).lora == ATTN
    assert resolve_targets("mlp", m).lora == MLP
    t = resolve_targets("attn_mlp", m)
    assert t.lora == ATTN + MLP and t.modules_to_save == []


def test_embed_preset_untied_trains_both_in_full():
    t = resolve_targets("attn_mlp_embed", tiny("llama", tie=False))
    assert t.lora == ATTN + MLP
    assert t.modules_to_save == ["embed_tokens", "lm_head"]
    assert (t.tied, t.ensure_weight_tying) == (False, False)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_embed_preset_tied_trains_one_shared_copy(model_type):
    t = resolve_targets("attn_mlp_embed", tiny(model_type, tie=True))
    assert t.modules_to_save == ["embed_tokens"]  # the head is re-tied to it, never LoRA'd
    assert t.tied and t.ensure_weight_tying


def test_gpt_neox_names():
    cfg = AutoConfig.for_model("gpt_neox", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    t = resolve_targets("attn_mlp_embed", m)
    assert t.lora == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    assert t.modules_to_save == ["embed_in", "lm_head"]  # names read off the model (transformers 5 renamed the head)


def test_explicit_list_moves_embeddings_to_full_training():
    t = resolve_targets(["q_proj", "v_proj", "lm_head"], tiny("llama"))
    assert t.lora == ["q_proj", "v_proj"] and t.modules_to_save == ["lm_head"]


def test_override_module_names():
    t = resolve_targets("attn", tiny("llama"), override={"attn": ["q_proj", "v_proj"]})
    assert t.lora == ["q_proj", "v_proj"]


def test_unknown_module_lists_available():
    with pytest.raises(PipelineError, match=r"sft\.target_modules: module 'c_attn' does not exist in this llama "
                                            r"model; available: down_proj, gate_proj, k_proj, o_proj, q_proj, "
                                            r"up_proj, v_proj, embed_tokens, lm_head$"):
        resolve_targets(["c_attn"], tiny("llama"), key="sft.target_modules")


def test_unknown_preset():
    with pytest.raises(PipelineError, match="unknown preset; use one of attn, mlp, attn_mlp, attn_mlp_embed"):
        resolve_targets("all", tiny("llama"))
