"""The levers that keep CPT knowledge through SFT (docs/levers.md), each shown changing what is trained: LoRA only in
the chosen layers, replayed text in the SFT batches, the KL and L2 terms in the loss, QA pairs in the CPT corpus, a
dev set that stops SFT, and chat-vector weights that are exactly CPT + ratio x (instruct - base)."""

import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from conftest import CORPUS, make_tiny_model, tiny_overrides, write_jsonl
from pipeline.core.backend import add_lora
from pipeline.core.outputs import PipelineError
from pipeline.core.config import ChatVectorConfig, CptConfig, DataPath, ModelConfig, SftConfig
from pipeline.core.data import load_qa
from pipeline.core.mixing import load_disjoint_qa, mix_qa_into_corpus, replay_records, replay_token_target, text_chunks
from pipeline.core.modules import lora_scale, resolve_layers, resolve_targets

CONF = Path(__file__).resolve().parents[1] / "conf"
TEMPLATE = "質問: {question}\n答え: {answer}"


def meta_llama(layers: int):
    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def lora_model(path, stage_cfg, layers=None):
    """The tiny model with the stage's LoRA, as cpt.py / sft.py build it."""
    model = AutoModelForCausalLM.from_pretrained(path)
    targets = resolve_targets(stage_cfg.target_modules, model, key="sft.target_modules")
    targets.layers, targets.layers_pattern = resolve_layers(layers, model, key="sft.layers")
    return add_lora("hf", model, targets, stage_cfg, 0, False)


# --- layers ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    (None, None), ([2, 0], [0, 2]), (3, [3]), ("1-2", [1, 2]), ("upper_half", [2, 3]), ("lower_half", [0, 1]),
    ("upper_1", [3]), ("upper_3", [1, 2, 3]), ("upper_4", [0, 1, 2, 3])])
def test_layer_settings(spec, expected):
    layers, pattern = resolve_layers(spec, meta_llama(4), key="sft.layers")
    assert layers == expected and pattern == (None if expected is None else "layers")


def test_odd_layer_counts_split_with_the_extra_layer_below():
    assert resolve_layers("upper_half", meta_llama(5))[0] == [3, 4]
    assert resolve_layers("lower_half", meta_llama(5))[0] == [0, 1, 2]


@pytest.mark.parametrize("spec, message", [
    ([4], r"sft\.layers: layer index 4 is out of range; this model has num_hidden_layers=4 \(indices 0-3\)"),
    ("3-1", r"sft\.layers='3-1': the range's start is above its end"),
    ("top", r"sft\.layers='top': use null"), ("upper_5", r"sft\.layers='upper_5': .* use upper_1 to upper_4"),
    ("upper_0", r"sft\.layers='upper_0': .* use upper_1 to upper_4"), ([], r"sft\.layers: no layer selected"),
    (["a"], r"sft\.layers=\['a'\]: use null")])
def test_bad_layer_settings_name_the_key(spec, message):
    with pytest.raises(PipelineError, match=message):
        resolve_layers(spec, meta_llama(4), key="sft.layers")


def test_lora_is_trained_only_in_the_chosen_layers(tiny_model):
    def trained_layers(layers):
        model = lora_model(tiny_model, SftConfig(r=4, lora_alpha=8, target_modules="attn_mlp"), layers)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert names and all("lora_" in n for n in names)
        return {int(re.search(r"\.layers\.(\d+)\.", n).group(1)) for n in names}

    assert trained_layers(None) == {0, 1}  # the tiny model has 2 layers
    assert trained_layers("upper_half") == {1}
    assert trained_layers([0]) == {0}


def test_unsloth_gets_the_same_layers():
    from pipeline.core.backend import unsloth_peft_kwargs

    model = meta_llama(4)
    targets = resolve_targets("attn", model)
    targets.layers, targets.layers_pattern = resolve_layers("upper_half", model)
    kw = unsloth_peft_kwargs(targets, 16, 32, 0.0, False, 0)
    assert kw["layers_to_transform"] == [2, 3] and kw["layers_pattern"] == "layers"


def test_lora_scale_is_the_factor_peft_applies(tiny_model):
    from peft.tuners.lora import LoraLayer

    for use_rslora, expected in ((False, 8 / 4), (True, 8 / 2)):
        model = lora_model(tiny_model, SftConfig(r=4, lora_alpha=8, use_rslora=use_rslora))
        scales = {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)}
        assert scales == {lora_scale(8, 4, use_rslora)} == {expected}


# --- replay -----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def n_tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_replay_records_hold_the_planned_tokens(tok):
    recs = replay_records(CORPUS, tok, n_tokens=60, max_tokens=12, seed=0)
    sizes = [n_tokens(tok, r["completion"]) + 1 for r in recs]  # + the EOS TRL appends
    assert all(r["prompt"] == "" for r in recs)  # plain LM examples: the loss falls on the whole text
    assert max(sizes) <= 13 and 59 <= sum(sizes) <= 60
    assert recs == replay_records(CORPUS, tok, 60, 12, seed=0)  # deterministic with the seed
    assert recs != replay_records(CORPUS, tok, 60, 12, seed=1)
    # more than the corpus holds: the corpus is used again, in another order
    corpus_tokens = sum(n_tokens(tok, d) + 1 for d in CORPUS)
    many = replay_records(CORPUS, tok, 3 * corpus_tokens, 500, seed=0)
    assert 3 * corpus_tokens - 1 <= sum(n_tokens(tok, r["completion"]) + 1 for r in many) <= 3 * corpus_tokens


def test_text_chunks_lose_no_text(tok):
    for doc in CORPUS:
        chunks = list(text_chunks(doc, tok, 5))
        assert all(n_tokens(tok, c) <= 5 for c in chunks)
        assert "".join(chunks).replace(" ", "") == doc.replace(" ", "")


def test_replay_ratio_is_a_share_of_all_trained_tokens():
    assert replay_token_target(900, 0.1) == 100  # 100 / (900 + 100) = 10%
    assert replay_token_target(900, 0.0) == 0
    with pytest.raises(PipelineError, match=r"sft\.replay_ratio=1: must be >= 0 and < 1"):
        replay_token_target(900, 1.0)


def test_trl_trains_every_token_of_a_replayed_text(tiny_model, tok, tmp_path):
    """A record with an empty prompt is a plain LM example under completion_only_loss: every token but BOS is a
    label, EOS included (TRL 1.16 tokenizes "" to [BOS], the common prefix of prompt and prompt+completion)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, max_length=64, report_to="none",
                     use_cpu=True, gradient_checkpointing=False)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model), args=args, processing_class=tok,
                         train_dataset=Dataset.from_list([{"prompt": "", "completion": CORPUS[0]}]))
    row = trainer.train_dataset[0]
    ids = tok(CORPUS[0])["input_ids"] + [tok.eos_token_id]
    assert ids[0] == tok.bos_token_id
    assert row["input_ids"] == ids and row["labels"] == [-100] + ids[1:]


def sft_stats(out):
    return json.loads((Path(out) / "sft_stats.json").read_text())


def test_sft_replay_puts_cpt_text_into_the_batches(tiny_model, data_files, tmp_path):
    from pipeline.stages.sft import train_sft

    model_cfg = ModelConfig(path=str(tiny_model), max_seq_length=32)
    common = dict(r=4, lora_alpha=8, max_steps=1, batch_size=2, logging_steps=1)
    plain = sft_stats(train_sft(SftConfig(**common), model_cfg, DataPath(str(data_files["sft"])), tiny_model, 0,
                                tmp_path / "plain", "cpu"))
    stats = sft_stats(train_sft(SftConfig(**common, replay_ratio=0.3), model_cfg, DataPath(str(data_files["sft"])),
                                tiny_model, 0, tmp_path / "replay", "cpu", replay=DataPath(str(data_files["cpt"]))))
    assert plain["replay_tokens"] == 0 and plain["replay_records"] == 0
    assert stats["answer_tokens"] == plain["answer_tokens"] > 0  # the SFT records themselves are unchanged
    assert stats["replay_records"] >= 1 and stats["replay_tokens"] > 0
    assert stats["replay_share"] == pytest.approx(0.3, abs=0.05)  # counted off TRL's tokenized batches
    assert stats["lora_scale"] == 2.0 and stats["layers"] is None


# --- KL to the CPT model, L2 on the update ----------------------------------------------------------------------------

@pytest.fixture
def lever_trainer(tiny_model, tok, data_files, tmp_path):
    """RetentionSFTTrainer on the tiny model; `perturb` gives the adapter a nonzero update (a fresh one has B = 0, so
    the SFT model starts as the CPT model and every term is 0 at the first step)."""
    from datasets import Dataset
    from trl import SFTConfig

    from pipeline.core.data import load_sft_records
    from pipeline.core.prompts import to_prompt_completion
    from pipeline.core.retention import RetentionSFTTrainer

    def make(kl=0.0, l2=0.0, perturb=True):
        model = lora_model(tiny_model, SftConfig(r=4, lora_alpha=8, target_modules="attn_mlp"))
        if perturb:
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.copy_(0.2 * torch.randn(p.shape, generator=g))
        rows = [to_prompt_completion(m, tok, "{prompt}") for m in load_sft_records(str(data_files["sft"]))]
        args = SFTConfig(output_dir=str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=3,
                         learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                         completion_only_loss=True, max_length=32, gradient_checkpointing=False, seed=0)
        trainer = RetentionSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                      processing_class=tok, kl_weight=kl, l2_weight=l2)
        trainer.model.train()
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        return trainer, batch

    return make


def independent_kl(model, batch):
    """KL(p_cpt || p_sft) per trained token, computed here from the two models' logits."""
    mask = batch["labels"][:, 1:] != -100
    feed = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        log_sft = model(**feed).logits[:, :-1][mask].log_softmax(-1)
        with model.disable_adapter():
            log_cpt = model(**feed).logits[:, :-1][mask].log_softmax(-1)
    return ((log_cpt.exp() * (log_cpt - log_sft)).sum() / mask.sum()).item()


def test_kl_term_is_added_exactly(lever_trainer):
    trainer, batch = lever_trainer(kl=0.5)
    total = trainer.compute_loss(trainer.model, dict(batch)).item()
    trainer.kl_weight = 0.0
    plain = trainer.compute_loss(trainer.model, dict(batch)).item()
    kl = independent_kl(trainer.model, batch)
    assert kl > 1e-3
    assert total - plain == pytest.approx(0.5 * kl, abs=2e-6)  # float32 rounding of a loss of about 6


def test_fresh_adapter_is_the_cpt_model(lever_trainer):
    trainer, batch = lever_trainer(kl=0.5, l2=1.0, perturb=False)
    total = trainer.compute_loss(trainer.model, dict(batch)).item()
    trainer.kl_weight = trainer.l2_weight = 0.0
    assert total == pytest.approx(trainer.compute_loss(trainer.model, dict(batch)).item(), abs=1e-7)


def test_l2_is_the_squared_size_of_the_merged_update(lever_trainer):
    from peft.tuners.lora import LoraLayer

    from pipeline.core.retention import lora_update_sq_norm

    trainer, batch = lever_trainer(l2=2.0)
    model = trainer.model
    direct = sum(m.get_delta_weight("default").pow(2).sum().item() for m in model.modules()
                 if isinstance(m, LoraLayer))  # the dW the merge adds, formed in full
    assert lora_update_sq_norm(model).item() == pytest.approx(direct, rel=1e-5) and direct > 0
    total = trainer.compute_loss(model, dict(batch)).item()
    trainer.l2_weight = 0.0
    assert total - trainer.compute_loss(model, dict(batch)).item() == pytest.approx(2.0 * direct, rel=1e-4)


def test_each_term_trains_only_the_adapter(lever_trainer):
    from pipeline.core.retention import kl_to_adapter_free, lora_update_sq_norm

    trainer, batch = lever_trainer()
    model = trainer.model
    for term in (lambda: kl_to_adapter_free(model, dict(batch)), lambda: lora_update_sq_norm(model)):
        model.zero_grad(set_to_none=True)
        term().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads and all("lora_" in n for n in grads)  # the CPT weights never move
        assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n)


def test_kl_and_l2_are_logged(lever_trainer):
    trainer, _ = lever_trainer(kl=0.5, l2=1.0)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(h["kl"] > 0 and h["l2"] > 0 for h in logged)


# --- QA pairs in CPT, the SFT dev set, and their separation from the scored questions ----------------------------

@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return write_jsonl(d / "pairs.jsonl", [{"id": f"p{i}", "question": f"設備{i}の番号は？", "answer": f"{i}番"}
                                           for i in range(10)])


def test_training_qa_files_never_hold_a_scored_question(data_files, tmp_path):
    scored = str(data_files["qa"])
    same_id = write_jsonl(tmp_path / "a.jsonl", [{"id": "q1", "question": "別の質問ですか？", "answer": "x"}])
    with pytest.raises(PipelineError, match=r"data\.dev_qa\.path=.*a\.jsonl and data\.qa\.path=.*qa\.jsonl share "
                                            r"the question id 'q1'"):
        load_disjoint_qa(str(same_id), "data.dev_qa.path", scored)
    # the same question after normalisation: full-width letters and digits, another question mark
    reworded = write_jsonl(tmp_path / "b.jsonl", [{"id": "d1", "question": "Ｐ-１０１の定格能力は何トンですか?",
                                                   "answer": "880トン"}])
    with pytest.raises(PipelineError, match=r"data\.cpt_qa\.path=.*b\.jsonl and data\.qa\.path=.*qa\.jsonl ask the "
                                            r"same question \('d1' and 'q1'"):
        load_disjoint_qa(str(reworded), "data.cpt_qa.path", scored)
    other = write_jsonl(tmp_path / "c.jsonl", [{"id": "d1", "question": "P-101の能力は？", "answer": "880トン"}])
    assert [q.id for q in load_disjoint_qa(str(other), "data.cpt_qa.path", scored)] == ["d1"]


def test_the_demo_pairs_are_disjoint_from_the_demo_qa_set():
    root = Path(__file__).resolve().parents[1]
    items = load_disjoint_qa(str(root / "data/cpt_qa/faq_short_questions.jsonl"), "data.cpt_qa.path",
                             str(root / "eval_sets/qa.jsonl"))
    assert len(items) == 63  # one per FAQ fact


def test_a_reworded_question_about_a_scored_fact_is_found():
    """Same answer under the scorer's normalisation (八百八十トン = 880トン です) and a similar question: one fact, whatever
    the wording; the same answer to another question, or another answer to the same question, is not."""
    from pipeline.core.data import QAItem
    from pipeline.core.mixing import shared_facts

    scored = [QAItem("q1", "P-101の定格能力は何トンですか？", "880トン"), QAItem("q2", "天野雅史の役職は何ですか？", "主任")]
    items = [QAItem("a", "P-101は最大何トンまで加圧できますか？", "八百八十トンです。"),  # q1 reworded
             QAItem("b", "日本で一番高い山は？", "880トン"),                      # q1's answer, another question
             QAItem("c", "P-101の定格能力は？", "770トン"),                       # q1's question, another answer
             QAItem("d", "天野雅史の役職は？", "課長", aliases=["主任"])]           # q2's answer as an alias
    assert [(q.id, s.id) for q, s, _ in shared_facts(items, scored)] == [("a", "q1"), ("d", "q2")]


def test_the_demo_files_as_the_leak_check_reads_them():
    """The qa_mix pairs ask about all 63 faq facts (PIT practises on them: flagged); the early_stop dev set, none."""
    from pipeline.core.mixing import shared_facts

    root = Path(__file__).resolve().parents[1]
    scored = load_qa(str(root / "eval_sets/qa.jsonl"))
    assert len(shared_facts(load_qa(str(root / "data/cpt_qa/faq_short_questions.jsonl")), scored)) == 63
    assert shared_facts(load_qa(str(root / "data/sft/dev_qa.jsonl")), scored) == []


def test_qa_mix_adds_a_seeded_share_of_the_pairs(pairs, data_files):
    mixed = mix_qa_into_corpus(CORPUS, 0.5, TEMPLATE, str(pairs), str(data_files["qa"]), seed=0)
    assert mixed[:4] == CORPUS and len(mixed) == 4 + 5
    assert all(re.fullmatch(r"質問: 設備(\d)の番号は？\n答え: \1番", d) for d in mixed[4:])
    assert mixed == mix_qa_into_corpus(CORPUS, 0.5, TEMPLATE, str(pairs), str(data_files["qa"]), seed=0)
    assert mix_qa_into_corpus(CORPUS, 0.0, TEMPLATE, None, None, seed=0) == CORPUS  # off: nothing read
    with pytest.raises(PipelineError, match=r"cpt\.qa_mix=0\.5 needs data\.cpt_qa\.path"):
        mix_qa_into_corpus(CORPUS, 0.5, TEMPLATE, None, str(data_files["qa"]), seed=0)
    with pytest.raises(PipelineError, match=r"cpt\.qa_template=.*use the fields \{question\} and \{answer\}"):
        mix_qa_into_corpus(CORPUS, 0.5, "Q: {q}", str(pairs), str(data_files["qa"]), seed=0)


def test_cpt_trains_on_the_mixed_pairs_in_the_chosen_layers(tiny_model, data_files, pairs, tmp_path):
    from pipeline.stages.cpt import train_cpt

    cfg = CptConfig(r=4, lora_alpha=8, use_rslora=True, target_modules="attn", max_steps=1, batch_size=2,
                    qa_mix=1.0, layers=[0])
    out = train_cpt(cfg, ModelConfig(path=str(tiny_model), max_seq_length=32), DataPath(str(data_files["cpt"])), 0,
                    tmp_path / "cpt", "cpu", qa_pairs=str(pairs), scored_qa=str(data_files["qa"]))
    stats = json.loads((out / "cpt_stats.json").read_text())
    assert stats["documents"] == 4 + 10 and stats["layers"] == [0] and stats["lora_scale"] == 4.0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["layers_to_transform"] == [0] and adapter["layers_pattern"] == "layers"


def test_early_stopping_evaluates_the_dev_set_and_keeps_the_best(tiny_model, data_files, pairs, tmp_path):
    from pipeline.stages.sft import train_sft

    model_cfg, data = ModelConfig(path=str(tiny_model), max_seq_length=32), DataPath(str(data_files["sft"]))
    # at this learning rate the dev loss (questions the SFT data never asks) turns up after a few steps
    cfg = SftConfig(r=4, lora_alpha=8, max_steps=8, batch_size=2, logging_steps=1, learning_rate=0.05,
                    early_stopping_patience=1, eval_steps=1)
    stats = sft_stats(train_sft(cfg, model_cfg, data, tiny_model, 0, tmp_path / "sft", "cpu", dev_qa=str(pairs),
                                scored_qa=str(data_files["qa"])))
    assert stats["steps"] < 8  # stopped: one evaluation without improvement (patience 1)
    assert stats["best_checkpoint_step"] == stats["steps"] - 1
    assert stats["dev_loss"] == pytest.approx(stats["best_eval_loss"])  # the saved adapter is the best checkpoint
    with pytest.raises(PipelineError, match=r"sft\.early_stopping_patience: needs a dev set, data\.dev_qa\.path"):
        train_sft(cfg, model_cfg, data, tiny_model, 0, tmp_path / "nodev", "cpu", scored_qa=str(data_files["qa"]))


# --- chat vector ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cv_models(tmp_path_factory):
    """A base, an instruct model (base + a 'chat' difference) and a CPT model (base + other changes + 2 added
    tokens, whose embedding rows the instruct model does not have)."""
    from pipeline.core.modules import fit_embeddings

    d = tmp_path_factory.mktemp("cv")
    base = make_tiny_model(d / "base")

    def variant(name, seed, added=()):
        model, tok = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        if added:
            tok.add_tokens(list(added), special_tokens=True)
            fit_embeddings(model, len(tok), tok.convert_tokens_to_ids(list(added)))
        model.save_pretrained(d / name)
        tok.save_pretrained(d / name)
        return d / name

    return {"base": base, "instruct": variant("instruct", 1), "cpt": variant("cpt", 2, ("<a>", "<b>"))}


def weights(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def run_chat_vector(cv_models, out, **cfg):
    from pipeline.stages.chat_vector import apply_chat_vector

    model_cfg = ModelConfig(path=str(cv_models["base"]), instruct_path=str(cv_models["instruct"]))
    return apply_chat_vector(ChatVectorConfig(**cfg), model_cfg, cv_models["cpt"], out, "cpu")


def test_chat_vector_is_the_arithmetic_tensor_by_tensor(cv_models, tmp_path):
    out = run_chat_vector(cv_models, tmp_path / "cv", ratio=0.5)
    b, i, c, o = (weights(p) for p in (cv_models["base"], cv_models["instruct"], cv_models["cpt"], out))
    rows = b["model.embed_tokens.weight"].shape[0]
    assert set(o) == set(c) and {"model.embed_tokens.weight", "lm_head.weight"} <= set(o)
    for name, t in c.items():
        if t.shape == b[name].shape:
            assert torch.equal(o[name], t + 0.5 * (i[name] - b[name])), name
        else:  # the 2 added tokens' rows: kept as CPT trained them, the others get the vector
            assert t.shape[0] == rows + 2
            assert torch.equal(o[name][:rows], t[:rows] + 0.5 * (i[name] - b[name])), name
            assert torch.equal(o[name][rows:], t[rows:]), name
    report = json.loads((out / "chat_vector.json").read_text())
    assert report["verified"] and report["tensors_partial_rows"] == {"model.embed_tokens.weight": rows,
                                                                     "lm_head.weight": rows}
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, the CPT tokenizer's vocabulary
    assert model.get_input_embeddings().weight.shape[0] == len(AutoTokenizer.from_pretrained(out)) == rows + 2


def test_chat_vector_can_leave_the_embeddings_alone(cv_models, tmp_path):
    out = run_chat_vector(cv_models, tmp_path / "cv", ratio=1.0, skip_embeddings=True)
    b, i, c, o = (weights(p) for p in (cv_models["base"], cv_models["instruct"], cv_models["cpt"], out))
    for name in c:
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(o[name], c[name])
        else:
            assert torch.equal(o[name], c[name] + (i[name] - b[name])), name


def test_chat_vector_streams_into_shards(cv_models, tmp_path, monkeypatch):
    import pipeline.stages.chat_vector as chat_vector

    whole = run_chat_vector(cv_models, tmp_path / "whole")
    monkeypatch.setattr(chat_vector, "SHARD_BYTES", 40_000)  # the tiny model is ~100 kB: several shards
    sharded = run_chat_vector(cv_models, tmp_path / "sharded")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1 and (sharded / chat_vector.INDEX_FILE).is_file()
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(whole)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(sharded)(ids).logits
    assert torch.equal(a, b)


def test_chat_vector_needs_an_instruct_model_of_the_same_family(cv_models, tmp_path):
    from pipeline.stages.chat_vector import apply_chat_vector

    other = make_tiny_model(tmp_path / "other", hidden_size=48)
    model_cfg = ModelConfig(path=str(cv_models["base"]), instruct_path=str(other))
    with pytest.raises(PipelineError, match=r"model\.instruct_path=.*other: hidden_size=48 but model\.path has "
                                            r"hidden_size=32"):
        apply_chat_vector(ChatVectorConfig(), model_cfg, cv_models["cpt"], tmp_path / "cv", "cpu")
    with pytest.raises(PipelineError, match=r"stage chat_vector needs model\.instruct_path"):
        apply_chat_vector(ChatVectorConfig(), ModelConfig(path=str(cv_models["base"]), instruct_path=None),
                          cv_models["cpt"], tmp_path / "cv", "cpu")


# --- each lever end to end: one short cell of conf/lever/<name>.yaml on the tiny model -----------------------------

@pytest.fixture(scope="module")
def tiny_instruct(tiny_model, tmp_path_factory):
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("instruct") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


LEVERS = sorted(p.stem for p in (CONF / "lever").glob("*.yaml"))


@pytest.mark.parametrize("lever", LEVERS)
def test_each_lever_runs_end_to_end(lever, tiny_model, tiny_instruct, data_files, tmp_path):
    from pipeline.run import run_pipeline

    extra = {"model.instruct_path": tiny_instruct, "sft.eval_steps": 1, "eval.max_questions": 2,
             "data.general_qa.path": "null", "data.heldout.path": "null"}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+lever={lever}", *tiny_overrides(tiny_model, data_files, **extra)])
    metrics = run_pipeline(cfg, tmp_path)
    assert "sft/contains" in metrics and metrics["stage/eval"] in ("built", "reused")
    expect = {"baseline": ("sft/replay_tokens", 0), "replay": ("sft.replay_ratio", 0.1),
              "upper_layers": ("sft.layers", "upper_half"), "kl": ("sft.kl_weight", 1.0), "l2": ("sft.l2_weight", 1.0),
              "low_lr": ("sft.learning_rate", 3.0e-4), "chat_vector": ("stage/chat_vector", "built"),
              "qa_mix": ("cpt.qa_mix", 1.0), "early_stop": ("sft.early_stopping_patience", 2)}
    key, value = expect[lever]
    if lever == "chat_vector":
        value = metrics[key]  # built, or reused from another test of this session
        assert "stage/sft" not in metrics and metrics["chat_vector/ratio"] == 1.0
    assert metrics[key] == value
    if lever == "replay":  # 10% of the tiny set's few answer tokens is a token or two: too little for a record
        assert metrics["sft/replay_share"] < 0.2 and metrics["sft/answer_tokens"] > 0
    if lever == "early_stop":
        assert metrics["sft/best_eval_loss"] > 0 and 0 < metrics["sft/best_checkpoint_step"] <= metrics["sft/steps"]
        assert metrics["leak/dev_qa_shared_facts"] == 0  # the demo's dev set asks nothing of the tiny QA set


def test_sft_trains_on_the_chat_vector_model_when_both_run(tiny_model, tiny_instruct, data_files, tmp_path):
    from pipeline.run import run_pipeline

    overrides = tiny_overrides(tiny_model, data_files, **{
        "stages": "[cpt,merge,chat_vector,sft,eval]", "model.instruct_path": tiny_instruct,
        "eval.max_questions": 1, "data.general_qa.path": "null", "data.heldout.path": "null"})
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        metrics = run_pipeline(compose("config", overrides=overrides), tmp_path)
    adapter = json.loads((tmp_path / "sft_adapter" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]).resolve() == (tmp_path / "cv_model").resolve()
    assert metrics["stage/sft"] in ("built", "reused") and "sft/contains" in metrics
    cv, sft = (json.loads((tmp_path / d / "lineage.json").read_text()) for d in ("cv_model", "sft_adapter"))
    assert cv["kind"] == "chat_vector_model" and cv["parent"]["kind"] == "cpt_model"
    assert sft["parent"] == {"kind": "chat_vector_model", "id": cv["id"]}


def test_demo_instruct_sibling_is_its_base_trained_on_chat(tiny_model, data_files, tmp_path):
    """`python -m pipeline.demo_model --instruct`: the base trained further, in full, on chat records; built once per
    base model (a rebuilt base gets a new sibling, or the chat vector would be the difference of unrelated models)."""
    from pipeline.core.config import DemoBuildConfig
    from pipeline.demo_model import ensure_demo_instruct_model

    cfg = DemoBuildConfig(instruct_data=str(data_files["sft"]), instruct_num_epochs=3, instruct_learning_rate=1e-3)
    out = ensure_demo_instruct_model(cfg, tiny_model, tmp_path / "instruct", 32)
    b, i = weights(tiny_model), weights(out)
    assert set(b) == set(i) and any(not torch.equal(b[k], i[k]) for k in b)
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(tiny_model).chat_template
    built = json.loads((out / "demo_build.json").read_text())
    assert ensure_demo_instruct_model(cfg, tiny_model, out, 32) == out  # reused
    assert json.loads((out / "demo_build.json").read_text()) == built
    base2 = make_tiny_model(tmp_path / "base2")
    ensure_demo_instruct_model(cfg, base2, out, 32)
    assert json.loads((out / "demo_build.json").read_text())["instruct_of"] == str(base2)


@pytest.mark.parametrize("extra, message", [
    ({"sft.layers": "[5]"}, r"sft\.layers: layer index 5 is out of range; this model has num_hidden_layers=2"),
    ({"cpt.layers": "top"}, r"cpt\.layers='top': use null"),
    ({"stages": "[cpt,merge,chat_vector,eval]", "model.instruct_path": "null"},
     r"stage chat_vector needs model\.instruct_path"),
    ({"cpt.qa_mix": 0.5}, r"cpt\.qa_mix=0\.5 needs data\.cpt_qa\.path"),
    ({"sft.early_stopping_patience": 2}, r"sft\.early_stopping_patience=2: needs a dev set, data\.dev_qa\.path"),
    ({"sft.replay_ratio": 1.0}, r"sft\.replay_ratio=1\.0: must be < 1"),
    ({"chat_vector.ratio": -1}, r"chat_vector\.ratio=-1\.0: must be >= 0"),
])
def test_bad_lever_settings_stop_before_training(extra, message, tiny_model, data_files, tmp_path):
    from pipeline.run import run_pipeline

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=tiny_overrides(tiny_model, data_files, **extra))
    with pytest.raises(PipelineError, match=message):
        run_pipeline(cfg, tmp_path)
    assert not (tmp_path / "cpt_adapter").exists()
