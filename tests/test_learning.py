"""Training learns what it is given, and only that.

The batches the SFT and CPT trainers train on are checked tensor by tensor against token positions computed from the
tokenizer alone; then two tiny runs must move the loss by a margin that follows from the model's shape, not from an
earlier run:

A freshly initialised model guesses close to uniformly. Its final RMSNorm bounds the length of the last hidden state
(||h|| <= sqrt(d) * max|g|), so every logit w_i . h lies within ||w_i|| * ||h|| of zero; the loss on a token,
logsumexp(z) - z_y, then lies within the logits' spread of ln V, whatever the text (`uniform_bound`). The tiny model's
head is initialised small, so that spread is well below ln V / 2: before training the model cannot know half the
bits of any text, and after training on it, it must.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import CORPUS, make_tiny_model
from pipeline.stages import cpt, sft
from pipeline.core.config import CptConfig, DataPath, ModelConfig, SftConfig
from pipeline.stages.cpt import PackedEpochs, TokenizedCorpus, collate_blocks, pack_epochs, param_groups
from pipeline.core.data import load_sft_records
from pipeline.stages.eval import answer_logprobs, text_nll
from pipeline.core.prompts import to_prompt_completion

CPU = torch.device("cpu")


class Stop(Exception):
    """Raised instead of training: the test needs the trainer as the stage built it, not a trained model."""


def built_trainer(monkeypatch, module, train, *args, **kwargs):
    """The Trainer that `module`'s `train(*args)` builds and would train, caught where it would start training."""
    caught = []

    def instead_of_training(trainer, stage):
        caught.append(trainer)
        raise Stop

    monkeypatch.setattr(module, "train_stage", instead_of_training)
    with pytest.raises(Stop):
        train(*args, **kwargs)
    monkeypatch.undo()
    return caught[0]


# --- SFT: what the trainer trains on -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with a tokenizer that has no chat template: SFT then uses model.prompt_template."""
    out = tmp_path_factory.mktemp("plain") / "model"
    shutil.copytree(tiny_model, out, ignore=shutil.ignore_patterns("chat_template.jinja"))
    assert AutoTokenizer.from_pretrained(out).chat_template is None
    return out


def expected_sft_example(tok, prompt: str, completion: str):
    """(input ids, labels) of one prompt/completion pair, from the tokenizer alone: the prompt's tokens, as the
    tokenizer encodes the prompt on its own, are not trained (-100); the answer's tokens and one final EOS are."""
    eos = tok.eos_token
    answer = completion[:-len(eos)] if completion.endswith(eos) else completion
    ids = tok(prompt + answer)["input_ids"] + [tok.eos_token_id]
    n_prompt = len(tok(prompt)["input_ids"])
    # the prompt is a token prefix of the whole: SFT trains on the context the model is later asked in
    assert ids[:n_prompt] == tok(prompt)["input_ids"]
    assert ids.count(tok.eos_token_id) == 1  # the answer ends with one EOS, never two
    return ids, [-100] * n_prompt + ids[n_prompt:]


@pytest.mark.parametrize("fixture", ["tiny_model", "plain_model"])  # chat template / model.prompt_template
def test_sft_trains_the_answer_and_eos_but_not_the_prompt_or_padding(fixture, request, data_files, tmp_path,
                                                                     monkeypatch):
    model_dir = request.getfixturevalue(fixture)
    model_cfg = ModelConfig(path=str(model_dir), max_seq_length=128)  # long enough: nothing is truncated here
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [to_prompt_completion(m, tok, model_cfg.prompt_template) for m in load_sft_records(str(data_files["sft"]))]
    expected = {tuple(ids): labels for ids, labels in
                (expected_sft_example(tok, r["prompt"], r["completion"]) for r in rows)}
    assert len(expected) == 3 and max(map(len, expected)) < model_cfg.max_seq_length

    trainer = built_trainer(monkeypatch, sft, sft.train_sft, SftConfig(r=4, batch_size=3, save_steps=0), model_cfg,
                            DataPath(path=str(data_files["sft"])), model_dir, 0, tmp_path / "sft", device="cpu")
    batches = list(trainer.get_train_dataloader())  # one epoch, as the Trainer reads it
    assert len(batches) == 1
    batch = batches[0]
    seen, targets = [], []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n, pad = int(mask.sum()), len(ids) - int(mask.sum())
        want_ids = next(k for k in expected if list(k) == ids[:n].tolist())  # StopIteration: not a record's tokens
        seen.append(want_ids)
        targets.append(torch.tensor(expected[want_ids] + [-100] * pad))
        assert torch.equal(mask, torch.tensor([1] * n + [0] * pad))
        assert torch.equal(ids, torch.tensor(list(want_ids) + [tok.pad_token_id] * pad))
        assert torch.equal(labels, targets[-1])
        assert labels[n - 1] == tok.eos_token_id  # the model learns to stop
    assert sorted(seen) == sorted(expected)  # every record once
    assert (batch["attention_mask"] == 0).any()  # the padding checks were not vacuous

    # the loss the trainer minimises is the mean cross-entropy of exactly those answer tokens
    model = trainer.model
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = torch.stack(targets)
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten())
    torch.testing.assert_close(loss, manual, rtol=1e-4, atol=1e-5)


def test_sft_truncation_keeps_the_start_and_drops_records_with_nothing_to_learn(tiny_model, data_files, tmp_path,
                                                                              monkeypatch):
    # At 40 tokens, of the fixture's records one fits whole, one loses the end of its answer (and its EOS) and one
    # is all prompt, so it teaches nothing and is dropped.
    max_length = 40
    model_cfg = ModelConfig(path=str(tiny_model), max_seq_length=max_length)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [to_prompt_completion(m, tok, model_cfg.prompt_template) for m in load_sft_records(str(data_files["sft"]))]
    expected = []
    for r in rows:
        ids, labels = expected_sft_example(tok, r["prompt"], r["completion"])
        if any(x != -100 for x in labels[:max_length]):
            expected.append((ids[:max_length], labels[:max_length]))
    lengths = sorted(len(ids) for ids, _ in expected)
    assert len(lengths) == 2 and lengths[0] < max_length == lengths[1]  # the cases the comment names

    trainer = built_trainer(monkeypatch, sft, sft.train_sft, SftConfig(r=4, batch_size=3, save_steps=0), model_cfg,
                            DataPath(path=str(data_files["sft"])), tiny_model, 0, tmp_path / "sft", device="cpu")
    got = sorted((r["input_ids"], r["labels"]) for r in trainer.train_dataset)
    assert got == sorted(expected)


# --- CPT: packing and batches ------------------------------------------------------------------------------------

class CharTokenizer:
    """A tokenizer whose ids can be written by hand: BOS 1, then 10 + the letter's place in the alphabet; EOS 2."""

    bos_token_id, eos_token_id = 1, 2

    def __init__(self, appends_eos: bool = False):
        self.appends_eos = appends_eos

    def __call__(self, texts, verbose=False):
        return {"input_ids": [[1] + [10 + ord(c) - ord("a") for c in t] + [2] * self.appends_eos for t in texts]}


@pytest.mark.parametrize("appends_eos", [False, True])
def test_every_document_ends_with_exactly_one_eos(appends_eos):
    corpus = TokenizedCorpus(["ab", "c", "", "de"], CharTokenizer(appends_eos))
    assert corpus.tokens.tolist() == [1, 10, 11, 2, 1, 12, 2, 1, 2, 1, 13, 14, 2]
    assert corpus.lengths.tolist() == [4, 3, 2, 4] and corpus.starts.tolist() == [0, 4, 7, 9]


def test_the_packed_stream_is_the_documents_joined_by_eos():
    docs = {"ab": [1, 10, 11, 2], "c": [1, 12, 2], "de": [1, 13, 14, 2]}  # 11 tokens
    streams = {tuple(docs[a] + docs[b] + docs[c]) for a in docs for b in docs for c in docs if len({a, b, c}) == 3}
    packed = PackedEpochs(TokenizedCorpus(list(docs), CharTokenizer()), block_len=4, seed=0, epochs=20)
    assert packed.blocks_per_epoch == 3  # 4 + 4 + 3 tokens: no padding except in the last block
    orders = set()
    for epoch in range(20):
        blocks = [packed.block(epoch, j).tolist() for j in range(3)]
        assert [len(b) for b in blocks] == [4, 4, 3]
        stream = tuple(sum(blocks, []))
        assert stream in streams  # whole documents, each once, each closed by its EOS
        orders.add(stream)
    assert len(orders) > 1  # the document order changes between epochs
    # pack_epochs (the demo base model's pretraining) reads the same packings
    assert pack_epochs(list(docs), CharTokenizer(), 4, seed=0, num_epochs=2) == \
        [packed.block(e, j).tolist() for e in range(2) for j in range(3)]


def _epochs(seed: int, epochs: int = 3):
    docs = [chr(ord("a") + i) for i in range(12)]  # 12 documents of 3 tokens: 6 blocks of 6 per epoch
    packed = PackedEpochs(TokenizedCorpus(docs, CharTokenizer()), block_len=6, seed=seed, epochs=epochs)
    assert packed.blocks_per_epoch == 6 and len(packed) == 6 * epochs
    items = [packed[i]["input_ids"].tolist() for i in range(len(packed))]  # the order the Trainer reads them
    return packed, [items[6 * e:6 * (e + 1)] for e in range(epochs)]


def test_every_epoch_is_a_new_packing_read_in_a_new_order():
    packed, epochs = _epochs(seed=7)
    letters = list(range(10, 22))
    for e, items in enumerate(epochs):
        tokens = sum(items, [])
        assert sorted(t for t in tokens if t >= 10) == letters  # every document once per epoch
        assert tokens.count(2) == 12
        in_packing_order = [packed.block(e, j).tolist() for j in range(6)]
        assert items != in_packing_order and sorted(items) == sorted(in_packing_order)  # blocks shuffled
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]  # a new order every epoch ...
    packings = [[packed.block(e, j).tolist() for j in range(6)] for e in range(3)]
    assert packings[0] != packings[1] != packings[2] != packings[0]  # ... of a new packing
    assert _epochs(seed=7)[1] == epochs  # deterministic for a seed
    assert _epochs(seed=8)[1][0] != epochs[0]


def test_content_eos_is_trained_and_padding_is_not_when_pad_is_eos():
    eos = 2
    batch = collate_blocks(pad_id=eos)([{"input_ids": np.array([5, 6, 2, 7, 8], dtype=np.int32)},
                                        {"input_ids": np.array([9, 10, 2], dtype=np.int32)}])
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 2, 7, 8], [9, 10, 2, 2, 2]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[5, 6, 2, 7, 8], [9, 10, 2, -100, -100]]))
    assert all(t.dtype == torch.long for t in batch.values())

    # the last block of a packing ends with a document's EOS, padded with EOS: that one is trained, the padding not
    packed = PackedEpochs(TokenizedCorpus(["ab", "c", "de"], CharTokenizer()), block_len=4, seed=0, epochs=1)
    batch = collate_blocks(pad_id=eos)([{"input_ids": packed.block(0, j)} for j in (0, 2)])
    assert batch["labels"][1].tolist() == packed.block(0, 2).tolist() + [-100] and batch["labels"][1, 2] == eos


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tied") / "model", tie=True)


@pytest.mark.parametrize("fixture", ["tiny_model", "tied_model"])
def test_embeddings_and_head_train_at_their_own_learning_rate(fixture, request):
    from pipeline.core.backend import add_lora, load_for_training
    from pipeline.core.modules import resolve_targets

    model_dir = request.getfixturevalue(fixture)
    cfg = CptConfig(r=4, target_modules="attn_mlp_embed", learning_rate=1e-3, embedding_learning_rate=1e-4,
                    weight_decay=0.1)
    model = load_for_training("hf", model_dir, ModelConfig(path=str(model_dir)), torch.float32, CPU)
    model = add_lora("hf", model, resolve_targets(cfg.target_modules, model, None, key="cpt.target_modules"), cfg, 0,
                     False)
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    embedding = {i for i, n in trainable.items() if "embed_tokens" in n or "lm_head" in n}
    assert embedding and len(embedding) < len(trainable)

    groups = param_groups(model, cfg)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.1), (1e-4, 0.0)]
    ids = [[id(p) for p in g["params"]] for g in groups]
    assert sum(map(len, ids)) == len(set(ids[0]) | set(ids[1])) == len(trainable)  # each trained parameter once
    assert set(ids[1]) == embedding and set(ids[0]) == set(trainable) - embedding
    assert all(".lora_" in trainable[i] for i in ids[0])


# --- learning: a tiny deterministic run must move the loss by a derived margin -----------------------------------

def uniform_bound(model) -> float:
    """The farthest a model's per-token loss can be from ln V, on any text (see the module docstring)."""
    head = model.get_output_embeddings()
    assert getattr(head, "bias", None) is None
    gain = model.get_decoder().norm.weight.abs().max().item()
    return 2 * gain * math.sqrt(head.weight.shape[1]) * head.weight.norm(dim=1).max().item()


def _base(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ln_v, bound = math.log(len(tok)), uniform_bound(model)
    assert bound < ln_v / 2  # the premise: a fresh model cannot already know half the bits of a text
    return tok, model, ln_v, bound


def _mean_nll(model, tok, texts) -> float:
    total, count = text_nll(model, tok, texts, batch_size=8, device=CPU)
    return total / count


# The head and final norm of a fresh model bound how far LoRA on attention/MLP alone can move its output from uniform
# (the same bound as above), so both runs also train embeddings and head in full, as the demo recipe does. A constant
# high learning rate: a few dozen steps on a handful of tokens.
FAST = dict(r=8, lora_alpha=16.0, use_rslora=False, target_modules="attn_mlp_embed", learning_rate=1e-2,
            warmup_ratio=0.0, lr_scheduler="constant", gradient_accumulation_steps=1, logging_steps=5, save_steps=0)


def test_cpt_lowers_the_loss_on_the_injected_text(tiny_model, data_files, tmp_path, monkeypatch):
    tok, base, ln_v, bound = _base(tiny_model)
    before = _mean_nll(base, tok, CORPUS)
    assert abs(before - ln_v) <= bound

    # The embedding rate differs from the LoRA rate only so that the optimizer check below can tell the groups
    # apart; it is the higher one here because the small-initialised head has the farthest to move.
    cfg = CptConfig(**FAST, embedding_learning_rate=2e-2, max_steps=30, batch_size=4)
    trainers = []
    real = cpt.train_stage
    monkeypatch.setattr(cpt, "train_stage", lambda trainer, stage: trainers.append(trainer) or real(trainer, stage))
    out = cpt.train_cpt(cfg, ModelConfig(path=str(tiny_model), max_seq_length=64),
                        DataPath(path=str(data_files["cpt"])), 0, tmp_path / "cpt", device="cpu")
    # the run's optimizer held the LoRA weights at learning_rate and the embedding copies at embedding_learning_rate
    assert [g["initial_lr"] for g in trainers[0].optimizer.param_groups] == [1e-2, 2e-2]

    after = _mean_nll(PeftModel.from_pretrained(base, str(out)).eval(), tok, CORPUS)
    assert after < ln_v / 2, f"CPT left the loss on its own text at {after:.3f} nats/token (ln V = {ln_v:.3f})"


def test_sft_raises_the_gold_answers_logprob(tiny_model, data_files, tmp_path):
    tok, base, ln_v, bound = _base(tiny_model)
    max_length = 128
    rows = [to_prompt_completion(m, tok, ModelConfig().prompt_template)
            for m in load_sft_records(str(data_files["sft"]))]
    assert all(len(tok(r["prompt"] + r["completion"])["input_ids"]) <= max_length for r in rows)  # all trained
    prompts, answers = [r["prompt"] for r in rows], [r["completion"] for r in rows]  # the answer with its EOS
    before = answer_logprobs(base, tok, prompts, answers, batch_size=8, device=CPU)
    assert all(abs(lp + ln_v) <= bound for lp in before)

    cfg = SftConfig(**FAST, max_steps=20, batch_size=3)
    out = sft.train_sft(cfg, ModelConfig(path=str(tiny_model), max_seq_length=max_length),
                        DataPath(path=str(data_files["sft"])), tiny_model, 0, tmp_path / "sft", device="cpu")
    after = answer_logprobs(PeftModel.from_pretrained(base, str(out)).eval(), tok, prompts, answers, batch_size=8,
                            device=CPU)
    assert all(lp > -ln_v / 2 for lp in after), \
        f"SFT left the answers' mean log-probs at {[round(x, 3) for x in after]} (-ln V = {-ln_v:.3f})"
