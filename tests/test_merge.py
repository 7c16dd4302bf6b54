"""The merge streams base + adapter into a checkpoint tensor by tensor, gets PEFT's own merge_and_unload exactly, and
refuses (publishing nothing) a merge whose logits differ from the adapter model's."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_tiny_model
from pipeline.core.outputs import PipelineError
from pipeline.core.config import MergeConfig, ModelConfig
from pipeline.stages.merge import merge_adapter, stream_merge
from pipeline.core.modules import fit_embeddings, lora_config, resolve_targets

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def as_if_trained(peft_model, seed=1):
    """Random values where training would have moved the adapter: a zero lora_B would make the LoRA a no-op, and
    untouched full copies would equal the base."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.5)
            elif "modules_to_save" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))


def save_adapter(model_dir, out, target_modules=None, config=None, add_tokens=(), save_embedding_layers="auto",
                 **lora_kw):
    """A LoRA adapter of the tiny model at `model_dir`, saved as CPT saves one (tokenizer and cpt_stats.json too)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    new_ids = []
    if add_tokens:
        tok.add_tokens(list(add_tokens), special_tokens=True)
        new_ids = tok.convert_tokens_to_ids(list(add_tokens))
        fit_embeddings(model, len(tok), new_ids)
    config = config or LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, **lora_kw)
    peft_model = get_peft_model(model, config)
    as_if_trained(peft_model)
    peft_model.save_pretrained(out, save_embedding_layers=save_embedding_layers)
    tok.save_pretrained(out)
    (out / "cpt_stats.json").write_text(json.dumps({"added_token_ids": new_ids}))
    return out


def peft_merged(model_dir, adapter, new_ids=()):
    """What PEFT's own in-memory merge gives: the reference for the streaming merge."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    fit_embeddings(base, len(AutoTokenizer.from_pretrained(adapter)), list(new_ids))
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


def saved_tensors(out):
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def assert_same_tensors(out, merged):
    expected = merged.state_dict()
    got = saved_tensors(out)
    if merged.get_output_embeddings().weight is merged.get_input_embeddings().weight:
        expected.pop("lm_head.weight")  # tied stays tied: no separate head tensor
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_sharded_base_streams_to_exactly_peft_merge_and_unload(tmp_path):
    """LoRA on every linear layer + embed_tokens/lm_head trained in full (the CPT default on an untied model)."""
    model_dir = make_tiny_model(tmp_path / "m")
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(model_dir, max_shard_size="20KB")
    assert (model_dir / "model.safetensors.index.json").is_file()  # the base is sharded
    adapter = save_adapter(model_dir, tmp_path / "adapter", ATTN_MLP, modules_to_save=["embed_tokens", "lm_head"])

    out = tmp_path / "out"
    out.mkdir()
    info = stream_merge(model_dir, adapter, out, torch.float32, n_tokens=400, shard_bytes=60_000)
    assert info["edited"] == {"lora": 14, "replaced": 2, "token_rows": 0, "grown": 0}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) == info["shards"] > 1 and set(index["weight_map"].values()) == {f.name for f in shards}
    # no shard over the limit unless one tensor alone is (the 400 x 32 fp32 embedding is 51 kB)
    assert all(sum(t.numel() * 4 for t in load_file(f).values()) <= 60_000 for f in shards)
    merged = peft_merged(model_dir, adapter)
    assert_same_tensors(out, merged)
    emb = saved_tensors(out)["model.embed_tokens.weight"]  # the trained copy replaced the base's embedding
    assert not torch.equal(emb, AutoModelForCausalLM.from_pretrained(model_dir).get_input_embeddings().weight)

    # the stage around it: verified, published, and loadable by plain transformers
    ckpt = merge_adapter(MergeConfig(), ModelConfig(path=str(model_dir)), adapter, tmp_path / "merged",
                         device="cpu")
    check = json.loads((ckpt / "merge_check.json").read_text())
    assert check["max_abs_logit_diff"] <= 1e-4 and check["reload_max_abs_logit_diff"] == 0
    ids = torch.randint(0, 400, (1, 40), generator=torch.Generator().manual_seed(0))
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt)
    assert torch.equal(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits)


def test_tied_model_stays_tied(tmp_path):
    """The pipeline's CPT setting on a tied model: the one shared tensor trained in full, the head re-tied to it."""
    model_dir = make_tiny_model(tmp_path / "tied", tie=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # as older transformers versions saved tied models: the head's tensor in the file too
    base = load_file(model_dir / "model.safetensors")
    save_file({**base, "lm_head.weight": base["model.embed_tokens.weight"].clone()}, model_dir / "model.safetensors",
              metadata={"format": "pt"})
    config = lora_config(resolve_targets("attn_mlp_embed", model), r=4, alpha=8, dropout=0.0, use_rslora=False)
    adapter = save_adapter(model_dir, tmp_path / "adapter", config=config)
    out = merge_adapter(MergeConfig(), ModelConfig(path=str(model_dir)), adapter, tmp_path / "merged",
                        device="cpu")

    assert "lm_head.weight" not in saved_tensors(out)
    check = json.loads((out / "merge_check.json").read_text())
    # tied: every row acts in the head at every position, so the logits cover them; no separate row comparison
    assert check["tied_embeddings"] is True and check["embedding_rows_compared"] is None
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    assert_same_tensors(out, peft_merged(model_dir, adapter))


def test_rslora_and_per_module_ranks_scale_as_peft_does(tmp_path):
    """rsLoRA scales by alpha/sqrt(r), not alpha/r; rank_pattern/alpha_pattern override r and alpha per module."""
    model_dir = make_tiny_model(tmp_path / "m")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ATTN_MLP, use_rslora=True,
                        rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 3})
    adapter = save_adapter(model_dir, tmp_path / "adapter", config=config)
    out = tmp_path / "out"
    out.mkdir()
    stream_merge(model_dir, adapter, out, torch.float32, n_tokens=400)
    assert_same_tensors(out, peft_merged(model_dir, adapter))


@pytest.mark.parametrize("trained, saved_layers", [(["embed_tokens", "lm_head"], "auto"), (["embed_tokens"], False)])
def test_added_tokens_grow_the_vocabulary_as_cpt_did(tmp_path, trained, saved_layers):
    """New tokens' rows, grown beyond the base's matrix at the mean of the old rows, trained as PEFT trainable tokens.

    As CPT saves it, the adapter holds the grown layers too (PEFT saves resized embeddings). Without them, and with
    only the embedding's rows trained, the head's new rows are the mean rows the merge grows itself."""
    model_dir = make_tiny_model(tmp_path / "m")
    adapter = save_adapter(model_dir, tmp_path / "adapter", ATTN_MLP, add_tokens=["<|im_start|>", "<|im_end|>"],
                           trainable_token_indices={name: [400, 401] for name in trained},
                           save_embedding_layers=saved_layers)
    out = merge_adapter(MergeConfig(), ModelConfig(path=str(model_dir)), adapter, tmp_path / "merged",
                        device="cpu")
    check = json.loads((out / "merge_check.json").read_text())
    assert check["vocab_rows"] == 402 and check["check_tokens"] > 128  # the new rows are in the check sample
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 402
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [400, 401]
    assert_same_tensors(out, peft_merged(model_dir, adapter, [400, 401]))


def test_fan_in_fan_out_layers(tmp_path):
    """GPT-2's Conv1D stores weights transposed: PEFT transposes the LoRA update for them."""
    model_dir = make_tiny_model(tmp_path / "gpt2", model_type="gpt2")
    adapter = save_adapter(model_dir, tmp_path / "adapter", ["c_attn", "c_fc"], fan_in_fan_out=True)
    out = tmp_path / "out"
    out.mkdir()
    stream_merge(model_dir, adapter, out, torch.float32, n_tokens=400)
    assert_same_tensors(out, peft_merged(model_dir, adapter))


def test_lora_on_tied_embeddings_is_refused(tmp_path, monkeypatch):
    """The PEFT trap: LoRA on a tied embed_tokens + lm_head would write both deltas into the one shared tensor.

    The adapter is made on an untied twin of the model (same names and shapes) and streamed directly, so that what
    PEFT itself does with LoRA on tied layers (warn, untie on merge, or refuse) plays no part in the outcome."""
    import pipeline.stages.merge

    model_dir = make_tiny_model(tmp_path / "tied", tie=True)
    twin = make_tiny_model(tmp_path / "untied")
    adapter = save_adapter(twin, tmp_path / "adapter", ["q_proj", "embed_tokens", "lm_head"])
    out = tmp_path / "out"
    out.mkdir()
    refused = r"LoRA on lm_head, but the base's head is tied to its embedding"
    with pytest.raises(PipelineError, match=refused):
        stream_merge(model_dir, adapter, out, torch.float32, n_tokens=400)
    assert not list(out.iterdir())  # refused while planning, before any shard is written

    # the stage refuses it before the verification loads any model
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the adapter was refused")

    monkeypatch.setattr(pipeline.stages.merge, "_load_fp32", no_loading)
    with pytest.raises(PipelineError, match=refused):
        merge_adapter(MergeConfig(), ModelConfig(path=str(model_dir)), adapter, tmp_path / "merged", device="cpu")
    assert_nothing_published(tmp_path)


@pytest.fixture(scope="module")
def qv_adapter(tmp_path_factory):
    """An untied tiny model and a LoRA adapter on q_proj and v_proj, for the tests that only read them."""
    d = tmp_path_factory.mktemp("qv")
    model_dir = make_tiny_model(d / "m")
    return model_dir, save_adapter(model_dir, d / "adapter", ["q_proj", "v_proj"])


def assert_nothing_published(tmp_path):
    assert not (tmp_path / "merged").exists()  # no output directory, so no complete one
    assert not list(tmp_path.glob("merged.tmp-*"))  # and nothing half-written left behind


def test_a_broken_adapter_fails_the_check_and_publishes_nothing(tmp_path):
    """A lora_B that diverged (NaN) in training: the adapter model itself is broken."""
    model_dir = make_tiny_model(tmp_path / "m")
    adapter = save_adapter(model_dir, tmp_path / "adapter", ["q_proj", "v_proj"])
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PipelineError, match=r"merge check failed: merged model's logits differ from the adapter "
                                            r"model's by nan \(> nan = merge.max_abs_logit_diff 0.0001 \+ "
                                            r"merge.rel_logit_diff 0.0001 x max\|logit\| nan\)"):
        merge_adapter(MergeConfig(), ModelConfig(path=str(model_dir)), adapter, tmp_path / "merged",
                      device="cpu")
    assert_nothing_published(tmp_path)


def test_a_streaming_merge_that_disagrees_with_peft_is_not_published(tmp_path, monkeypatch, qv_adapter):
    """The saved file is checked against PEFT's merge: here the streaming merge scales every LoRA update twice."""
    import pipeline.stages.merge

    model_dir, adapter = qv_adapter
    scaling = pipeline.stages.merge._lora_scaling
    monkeypatch.setattr(pipeline.stages.merge, "_lora_scaling", lambda config, module: 2 * scaling(config, module))
    with pytest.raises(PipelineError, match=r"merge check failed: the saved checkpoint's logits differ from the "
                                            r"verified merge's by [0-9.]+ \(tolerance [0-9.e-]+\), tied=False vs "
                                            r"base tied=False; nothing was published"):
        merge_adapter(MergeConfig(), ModelConfig(path=str(model_dir)), adapter, tmp_path / "merged",
                      device="cpu")
    assert_nothing_published(tmp_path)


# --- the checks of the saved file, each made to fail for its own reason --------------------------------------------

RELOAD_FAILED = (r"merge check failed: the saved checkpoint's logits differ from the verified merge's by {diff} "
                 r"\(tolerance [0-9.e-]+\), tied={saved} vs base tied={base}; nothing was published")


def test_one_perturbed_merged_weight_is_caught(tmp_path, monkeypatch, qv_adapter):
    """One row of one q_proj weight written 0.01 off (its entries are ~0.02): PEFT's merge, the reference, is right,
    only the streamed file is wrong, and the reload comparison catches it."""
    import pipeline.stages.merge

    model_dir, adapter = qv_adapter
    apply, hit = pipeline.stages.merge._apply, []

    def off_by_a_little(w, edit, adapter_file, key):
        w = apply(w, edit, adapter_file, key)
        if key == "model.layers.1.self_attn.q_proj.weight":
            w[3] += 1e-2
            hit.append(key)
        return w

    monkeypatch.setattr(pipeline.stages.merge, "_apply", off_by_a_little)
    with pytest.raises(PipelineError, match=RELOAD_FAILED.format(diff="[0-9.e-]+", saved="False", base="False")):
        merge_adapter(MergeConfig(), ModelConfig(path=str(model_dir)), adapter, tmp_path / "merged", device="cpu")
    assert hit == ["model.layers.1.self_attn.q_proj.weight"]
    assert_nothing_published(tmp_path)


@pytest.mark.parametrize("save_dtype", ["float32", "bfloat16"])
def test_a_perturbed_embedding_row_outside_the_check_sample_is_caught(tmp_path, monkeypatch, qv_adapter, save_dtype):
    """An untied model's input-embedding row acts only where its token occurs, so the logits over the check sample
    cannot see a wrong row of a token outside it: those rows are compared directly."""
    import pipeline.stages.merge
    from pipeline.core.checkpoints import load_tokenizer

    model_dir, adapter = qv_adapter
    sample = set(pipeline.stages.merge.check_sample(load_tokenizer(adapter), MergeConfig().check_tokens)[0].tolist())
    row = max(set(range(len(load_tokenizer(adapter)))) - sample)  # a token the logit check never looks up
    apply = pipeline.stages.merge._apply

    def one_row_off(w, edit, adapter_file, key):
        w = apply(w, edit, adapter_file, key)
        if key == "model.embed_tokens.weight":
            w[row] += 0.05  # a quarter of the row's typical size, far beyond rounding
        return w

    monkeypatch.setattr(pipeline.stages.merge, "_apply", one_row_off)
    with pytest.raises(PipelineError, match=rf"merge check failed: the saved checkpoint's 1 row\(s\) of the input "
                                            rf"embeddings \(token ids \[{row}\]\) differ from the verified merge's"):
        merge_adapter(MergeConfig(save_dtype=save_dtype), ModelConfig(path=str(model_dir)), adapter,
                      tmp_path / "merged", device="cpu")
    assert_nothing_published(tmp_path)
    monkeypatch.undo()  # the same merge, unperturbed, passes the row comparison of every row
    merge_adapter(MergeConfig(save_dtype=save_dtype), ModelConfig(path=str(model_dir)), adapter, tmp_path / "merged",
                  device="cpu")
    check = json.loads((tmp_path / "merged" / "merge_check.json").read_text())
    assert check["embedding_rows_compared"] == len(load_tokenizer(adapter)) and check["shards"] == 1


def _drop_from_output(stream, key):
    """stream_merge, except that `key` never reaches the output shard (a tensor lost on the way to the file)."""
    def dropped(base_path, adapter_dir, out_dir, *args, **kw):
        info = stream(base_path, adapter_dir, out_dir, *args, **kw)
        file = out_dir / "model.safetensors"
        tensors = load_file(file)
        del tensors[key]
        save_file(tensors, file, metadata={"format": "pt"})
        return info
    return dropped


def _reload_the_base(load, base):
    """_load_fp32, except that the saved checkpoint's reload reads the base model instead (a wrong path)."""
    def wrong(path, *args, **kw):
        return load(base if ".tmp-" in str(path) else path, *args, **kw)
    return wrong


@pytest.mark.parametrize("breakage", ["tensor missing from the shard", "reload reads the base"])
def test_a_broken_reload_is_caught(tmp_path, monkeypatch, qv_adapter, breakage):
    """The saved checkpoint does not load as the merge that was verified: a tensor the file lacks (transformers
    initialises it at random), or a loader that reads another checkpoint. The reload comparison catches both."""
    import pipeline.stages.merge

    model_dir, adapter = qv_adapter
    if breakage == "tensor missing from the shard":
        monkeypatch.setattr(pipeline.stages.merge, "stream_merge",
                            _drop_from_output(pipeline.stages.merge.stream_merge, "model.layers.0.mlp.down_proj.weight"))
    else:
        monkeypatch.setattr(pipeline.stages.merge, "_load_fp32", _reload_the_base(pipeline.stages.merge._load_fp32, model_dir))
    with pytest.raises(PipelineError, match=RELOAD_FAILED.format(diff="[0-9.e-]+", saved="False", base="False")):
        merge_adapter(MergeConfig(), ModelConfig(path=str(model_dir)), adapter, tmp_path / "merged", device="cpu")
    assert_nothing_published(tmp_path)


def test_a_tied_base_saved_untied_is_caught(tmp_path, monkeypatch):
    """A tied base whose saved checkpoint comes out untied: the head stored as its own tensor (with the embedding's
    values, so every logit is the same) and tie_word_embeddings=false. Only the tied/untied check can catch it."""
    import pipeline.stages.merge

    model_dir = make_tiny_model(tmp_path / "tied", tie=True)
    adapter = save_adapter(model_dir, tmp_path / "adapter", ["q_proj", "v_proj"])
    stream = pipeline.stages.merge.stream_merge

    def untied(base_path, adapter_dir, out_dir, *args, **kw):
        info = stream(base_path, adapter_dir, out_dir, *args, **kw)
        tensors = load_file(out_dir / "model.safetensors")
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((out_dir / "config.json").read_text())
        (out_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
        return info

    monkeypatch.setattr(pipeline.stages.merge, "stream_merge", untied)
    with pytest.raises(PipelineError, match=RELOAD_FAILED.format(diff="0", saved="False", base="True")):
        merge_adapter(MergeConfig(), ModelConfig(path=str(model_dir)), adapter, tmp_path / "merged", device="cpu")
    assert_nothing_published(tmp_path)


def test_good_merge_in_bfloat16_reports_drift(tmp_path):
    """A bf16 save: the file must hold PEFT's fp32 merge rounded once, and the rounding's effect is reported."""
    model_dir = make_tiny_model(tmp_path / "m")
    adapter = save_adapter(model_dir, tmp_path / "adapter", ["q_proj", "v_proj"])
    out = merge_adapter(MergeConfig(save_dtype="bfloat16"), ModelConfig(path=str(model_dir)), adapter,
                        tmp_path / "merged", device="cpu")
    check = json.loads((out / "merge_check.json").read_text())
    assert check["max_abs_logit_diff"] <= 1e-4        # the fp32 merge itself is exact
    assert check["save_dtype"] == "bfloat16" and check["save_dtype_logit_drift"] > 0  # rounding, reported
    assert check["reload_max_abs_logit_diff"] <= 1e-5  # the file reproduces what was verified
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    merged = peft_merged(model_dir, adapter)
    got = saved_tensors(out)
    assert all(torch.equal(got[k], v.to(torch.bfloat16)) for k, v in merged.state_dict().items())
