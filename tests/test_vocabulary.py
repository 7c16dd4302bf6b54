"""model.add_special_tokens: new tokens get embedding rows, which CPT and SFT train; merge and reload still agree."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_tiny_model, tiny_overrides
from test_pipeline import compose_cfg
from pipeline.core.outputs import PipelineError
from pipeline.run import run_pipeline

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("tie, cpt_targets", [(False, "attn_mlp_embed"), (True, "attn_mlp_embed"),
                                              (False, "attn_mlp"), (True, "attn_mlp")])
def test_added_chat_tokens_are_resized_trained_and_merged(tmp_path, data_files, tie, cpt_targets):
    model = make_tiny_model(tmp_path / "model", tie=tie)  # 400 tokens, 400 embedding rows
    (tmp_path / "chatml.jinja").write_text(CHATML)
    cfg = compose_cfg(tiny_overrides(model, data_files, **{
        "model.add_special_tokens": '["<|im_start|>","<|im_end|>"]', "model.chat_template": tmp_path / "chatml.jinja",
        "cpt.target_modules": cpt_targets, "sft.learning_rate": 0.05, "sft.max_length": 96}))
    run_pipeline(cfg, tmp_path / "run")
    run = tmp_path / "run"

    stats = json.loads((run / "cpt_adapter" / "cpt_stats.json").read_text())
    assert stats["added_tokens"] == ["<|im_start|>", "<|im_end|>"] and stats["added_token_ids"] == [400, 401]
    check = json.loads((run / "cpt_model" / "merge_check.json").read_text())
    assert check["vocab_rows"] == 402 and check["max_abs_logit_diff"] <= 1e-4
    assert check["reload_max_abs_logit_diff"] <= 1e-5 and check["tied_embeddings"] == tie

    merged = AutoModelForCausalLM.from_pretrained(run / "cpt_model")
    tok = AutoTokenizer.from_pretrained(run / "cpt_model")
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [400, 401]
    assert merged.get_input_embeddings().weight.shape[0] == 402
    assert (merged.get_input_embeddings().weight is merged.get_output_embeddings().weight) == tie
    emb = merged.get_input_embeddings().weight.detach()

    # CPT's corpus never contains the chat markers; SFT's chat template does, and SFT trains their rows (PEFT
    # trainable tokens): the adapter holds values that moved away from the CPT model's
    adapter = load_file(run / "sft_adapter" / "adapter_model.safetensors")
    deltas = {k: v for k, v in adapter.items() if "trainable_tokens_delta" in k}
    assert deltas and all(v.shape[0] == 2 for v in deltas.values())
    embed_delta = next(v for k, v in deltas.items() if "embed_tokens" in k)
    assert not torch.allclose(embed_delta, emb[400:402], atol=1e-5)
    if not tie:  # the untied head's rows train too, through TRL's fused LM head (pipeline.stages.sft._expose_head_bias)
        head_delta = next(v for k, v in deltas.items() if "lm_head" in k)
        assert not torch.allclose(head_delta, merged.get_output_embeddings().weight.detach()[400:402], atol=1e-5)


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path, data_files):
    model = make_tiny_model(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_tokens(["<extra>"], special_tokens=True)  # the tokenizer now has a token the model has no row for
    tok.save_pretrained(model)
    with pytest.raises(PipelineError, match=r"^model.path=.*/model: the tokenizer has 401 tokens but the model has "
                                            r"only 400 embedding rows; token\(s\) \['<extra>'\] have no embedding"):
        run_pipeline(compose_cfg(tiny_overrides(model, data_files)), tmp_path / "run")
    assert not (tmp_path / "run" / "cpt_adapter").exists()


@pytest.mark.parametrize("tie", [False, True])
def test_new_rows_start_at_the_mean_of_the_old_ones(tie):
    """Rows 0..3 hold 0, 1, 2, 3 (row 2 unused by any token before, as in Qwen's padded matrix); tokens get ids 2 and
    4..5. The mean of the other old rows, (0 + 1 + 3) / 3 = 4/3, is where all three start, in the head too."""
    from transformers import AutoConfig

    from pipeline.core.modules import fit_embeddings

    cfg = AutoConfig.for_model("llama", vocab_size=4, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for layer in {model.get_input_embeddings(), model.get_output_embeddings()}:
            layer.weight.copy_(torch.arange(4.0)[:, None].expand(4, 8))
    assert fit_embeddings(model, 6, [2, 4, 5]) == 2  # grown by two rows
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        assert torch.allclose(layer.weight[:, 0], torch.tensor([0, 1, 4 / 3, 3, 4 / 3, 4 / 3]))
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
