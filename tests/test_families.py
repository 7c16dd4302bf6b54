"""Every model family config works with only model.path changed.

Tiny random instances of each family are built from config here (no download) and run through CPT (with and without
embed/lm_head training) → merge → SFT → eval via `model=<family>`. The merge check passes for tied and untied
embeddings alike, and the merged checkpoint, loaded with plain transformers, gives the logits of base + CPT adapter.
"""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model, tiny_overrides
from test_pipeline import compose_cfg
from pipeline.core.outputs import PipelineError
from pipeline.run import run_pipeline

# config option → the architecture a checkpoint of that family has: (model_type, tied embeddings, chat template)
FAMILIES = {
    "llm_jp_3": ("llama", False, False),      # base model: no chat template → the config's prompt_template
    "llama3": ("llama", True, True),          # Llama 3.2 1B/3B are tied
    "qwen2_5": ("qwen2", True, True),         # Qwen2.5 0.5B-3B are tied
    "qwen3": ("qwen3", False, True),
    "gemma2": ("gemma2", True, False),
    "gemma3": ("gemma3_text", True, False),
    "mistral": ("mistral", False, False),
    "smollm2_135m": ("llama", True, True),
}


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    built = {}

    def get(family):
        if family not in built:
            model_type, tie, chat = FAMILIES[family]
            built[family] = make_tiny_model(tmp_path_factory.mktemp(family) / "model", tie=tie, chat_template=chat,
                                            model_type=model_type)
        return built[family]

    return get


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("cpt_targets", ["attn_mlp_embed", "attn_mlp"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_end_to_end(family, cpt_targets, family_model, data_files, tmp_path):
    model_dir = family_model(family)
    model_type, tie, _ = FAMILIES[family]
    cfg = compose_cfg([f"model={family}"] + tiny_overrides(model_dir, data_files, **{
        "cpt.target_modules": cpt_targets, "cpt.lora_alpha": 64, "cpt.learning_rate": 0.01,
        "cpt.embedding_learning_rate": 0.01, "sft.max_length": 256}))
    metrics = run_pipeline(cfg, tmp_path)
    assert "sft/contains" in metrics and "sft/logprob" in metrics

    check = json.loads((tmp_path / "cpt_model" / "merge_check.json").read_text())
    assert check["max_abs_logit_diff"] <= check["tolerance"] and check["tied_embeddings"] == tie
    assert check["reload_max_abs_logit_diff"] <= 1e-5

    # Independently of the stage's own check: plain transformers + PEFT, merged file vs base + adapter.
    ids = torch.randint(0, 400, (1, 48), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "cpt_model", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base_logits = logits(base, ids)
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "cpt_adapter")).eval()
    assert merged.config.model_type == model_type
    assert (merged.get_input_embeddings().weight is merged.get_output_embeddings().weight) == tie
    assert (logits(merged, ids) - logits(adapted, ids)).abs().max() <= 1e-4
    assert (logits(merged, ids) - base_logits).abs().max() > 1e-3  # CPT changed the model: the check is not vacuous

    stats = json.loads((tmp_path / "cpt_adapter" / "cpt_stats.json").read_text())
    if cpt_targets == "attn_mlp_embed":
        assert stats["modules_to_save"] == (["embed_tokens"] if tie else ["embed_tokens", "lm_head"])
    else:
        assert stats["modules_to_save"] == []


def test_family_config_refuses_the_wrong_checkpoint(family_model, data_files, tmp_path):
    """gemma2.yaml says the embeddings are tied: an untied checkpoint is some other model."""
    cfg = compose_cfg(["model=gemma2"] + tiny_overrides(family_model("mistral"), data_files))
    with pytest.raises(PipelineError, match=r"model.tied_embeddings=true but the checkpoint at model.path=.* has "
                                            r"untied embeddings"):
        run_pipeline(cfg, tmp_path)


def test_family_config_needs_a_path(tmp_path):
    with pytest.raises(PipelineError, match=r"config key model.path: Missing mandatory value"):
        run_pipeline(compose_cfg(["model=llm_jp_3"]), tmp_path)
