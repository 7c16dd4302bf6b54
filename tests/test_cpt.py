"""CPT training that fits real corpora and survives crashes: lazy per-epoch packing, checkpoints and resume, the
non-finite-loss stop, fp32 master weights, gradient checkpointing, attention choice and GPU selection."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from transformers import AutoTokenizer, TrainerCallback

from conftest import CORPUS, tiny_overrides
from pipeline.core import devices, training
from pipeline.stages import cpt
from pipeline.core.backend import add_lora, check_attn_implementation, keep_fp32_masters, load_for_training
from pipeline.core.outputs import PipelineError, is_complete, resumable_output
from pipeline.core.config import CptConfig, DataPath, ModelConfig, SftConfig, check_ranges
from pipeline.stages.cpt import PackedEpochs, TokenizedCorpus, train_cpt
from pipeline.core.modules import resolve_targets

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def pack_documents_eagerly(docs, tokenizer, block_len, seed):
    """The packing as the stage first did it, for one epoch: the reference the lazy packing must reproduce."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    stream = []
    for i in order:
        ids = tokenizer(docs[i], verbose=False)["input_ids"]
        if not ids or ids[-1] != eos:
            ids = ids + [eos]
        stream.extend(ids)
    blocks = [stream[i:i + block_len] for i in range(0, len(stream), block_len)]
    if len(blocks) > 1 and len(blocks[-1]) < 2:
        blocks.pop()
    return blocks


DOCS = CORPUS * 3 + ["短い。", "P-101"]  # 14 documents of different lengths, 388 tokens


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("block_len", [7, 32, 129, 387, 1000])  # 129 and 387 leave a 1-token tail, which is dropped
def test_lazy_packing_equals_eager_packing_epoch_by_epoch(tok, block_len):
    corpus = TokenizedCorpus(DOCS, tok)
    packed = PackedEpochs(corpus, block_len, seed=42, epochs=4)
    for epoch in range(4):
        reference = pack_documents_eagerly(DOCS, tok, block_len, 42 + epoch)
        assert packed.blocks_per_epoch == len(reference)
        assert [packed.block(epoch, j).tolist() for j in range(len(reference))] == reference
        # the dataset serves packing `epoch` as one contiguous run of items, its blocks in a seeded order
        items = [packed[i]["input_ids"].tolist() for i in range(epoch * len(reference), (epoch + 1) * len(reference))]
        assert sorted(items) == sorted(reference)
    assert len(packed) == 4 * len(reference)  # the dataset is exactly four packings long
    again = PackedEpochs(TokenizedCorpus(DOCS, tok), block_len, seed=42, epochs=4)
    assert all((again[i]["input_ids"] == packed[i]["input_ids"]).all() for i in range(len(packed)))


def test_memory_follows_the_corpus_not_the_epochs(tok):
    corpus = TokenizedCorpus(DOCS, tok)
    assert corpus.tokens.nbytes == 4 * corpus.total_tokens  # one int32 per token, documents stored once
    tracemalloc.start()
    try:
        packed = PackedEpochs(corpus, 32, seed=0, epochs=100_000)  # as lists, 100k packings would take ~300 MB
        n = packed.blocks_per_epoch
        for i in (0, 1, n, 50_000 * n, len(packed) - 1):  # blocks from several packings
            packed[i]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(packed) == 100_000 * n
    assert peak < 64 * 1024, f"{peak} bytes allocated: the dataset grows with the number of epochs"


def _cfgs(tiny_model, **cpt):
    base = dict(r=4, target_modules="attn_mlp_embed", learning_rate=2e-3, embedding_learning_rate=2e-4,
                max_steps=6, batch_size=2, gradient_accumulation_steps=1, logging_steps=1, save_steps=2)
    return CptConfig(**{**base, **cpt}), ModelConfig(path=str(tiny_model), max_seq_length=32)


def _adapter(path: Path) -> dict:
    return load_file(str(path / "adapter_model.safetensors"))


class Killed(Exception):
    pass


class KillAfterCheckpoint(TrainerCallback):
    """Stands in for a kill: the process dies right after the Trainer saved the checkpoint of `step`."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed after checkpoint-{self.step}")


def _with_callback(monkeypatch, callback, module=cpt):
    real = module.train_stage

    def train_stage(trainer, stage):
        trainer.add_callback(callback)
        return real(trainer, stage)

    monkeypatch.setattr(module, "train_stage", train_stage)


def test_a_killed_run_resumes_to_the_same_adapter(tiny_model, data_files, tmp_path, monkeypatch):
    cfg, model_cfg = _cfgs(tiny_model)
    data = DataPath(path=str(data_files["cpt"]))
    train_cpt(cfg, model_cfg, data, 42, tmp_path / "whole", device="cpu")

    _with_callback(monkeypatch, KillAfterCheckpoint(4))
    with pytest.raises(Killed):
        train_cpt(cfg, model_cfg, data, 42, tmp_path / "resumed", device="cpu")
    monkeypatch.undo()
    build = tmp_path / "resumed.build"
    assert not (tmp_path / "resumed").exists()  # nothing published
    assert sorted(p.name for p in (build / "trainer").iterdir()) == ["checkpoint-4"]  # the older one was rotated out
    # a kill in the middle of the next save leaves a checkpoint without its trainer_state.json: it must be skipped
    (build / "trainer" / "checkpoint-6").mkdir()
    (build / "trainer" / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"half a file")
    (build / "cpt_stats.json").write_text("{}")  # nor is anything else a dead build left behind ever published

    out = train_cpt(cfg, model_cfg, data, 42, tmp_path / "resumed", device="cpu")
    stats = json.loads((out / "cpt_stats.json").read_text())
    assert stats["resumed_from_step"] == 4 and stats["steps"] == 6
    assert is_complete(out) and not build.exists() and not (out / "trainer").exists()
    whole, resumed = _adapter(tmp_path / "whole"), _adapter(out)
    assert whole.keys() == resumed.keys() and any(k.endswith("embed_tokens.weight") for k in whole)
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=1e-6, msg=name)


def test_a_killed_sft_run_resumes_to_the_same_adapter(tiny_model, data_files, tmp_path, monkeypatch):
    from pipeline.stages import sft

    cfg = SftConfig(r=4, max_steps=4, batch_size=1, gradient_accumulation_steps=1, save_steps=2)
    args = (cfg, ModelConfig(path=str(tiny_model), max_seq_length=32), DataPath(path=str(data_files["sft"])),
            tiny_model, 42)
    sft.train_sft(*args, tmp_path / "whole", device="cpu")
    _with_callback(monkeypatch, KillAfterCheckpoint(2), module=sft)
    with pytest.raises(Killed):
        sft.train_sft(*args, tmp_path / "resumed", device="cpu")
    monkeypatch.undo()
    assert (tmp_path / "resumed.build" / "trainer" / "checkpoint-2" / "trainer_state.json").is_file()
    steps = []

    class Count(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    _with_callback(monkeypatch, Count(), module=sft)
    sft.train_sft(*args, tmp_path / "resumed", device="cpu")
    assert steps == [3, 4]  # resumed after step 2, not trained afresh
    whole, resumed = _adapter(tmp_path / "whole"), _adapter(tmp_path / "resumed")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=1e-6, msg=name)


def test_resume_takes_the_newest_complete_checkpoint(tmp_path):
    def checkpoint(step, state=None):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if state is not None:
            (path / "trainer_state.json").write_text(json.dumps({"global_step": step, **state}))
        return path

    checkpoint(10, {"best_model_checkpoint": str(tmp_path / "checkpoint-20")})
    checkpoint(20, {})
    checkpoint(30, {"best_model_checkpoint": str(tmp_path / "checkpoint-20")})
    checkpoint(40)  # killed while saving: no state yet
    (checkpoint(50) / "trainer_state.json").write_text('{"global_st')  # killed while writing the state
    assert training.resume_checkpoint(tmp_path) == tmp_path / "checkpoint-30"
    # the half-written ones and the superseded one are gone; the best one (early stopping loads it) stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20", "checkpoint-30"]
    assert training.resume_checkpoint(tmp_path / "nothing-here") is None


def test_resumable_output_keeps_only_checkpoints_across_failures(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with resumable_output(final) as build:
            (build / "trainer" / "checkpoint-2").mkdir(parents=True)
            (build / "adapter_model.safetensors").write_text("half")
            raise RuntimeError("died")
    assert not final.exists() and (tmp_path / "out.build" / "trainer" / "checkpoint-2").is_dir()
    with resumable_output(final) as build:
        assert build == tmp_path / "out.build"
        assert [p.name for p in build.iterdir()] == ["trainer"]  # the half-saved model is gone, the checkpoint stays
        (build / "result.txt").write_text("done")
    assert is_complete(final) and sorted(p.name for p in final.iterdir()) == [".complete", "result.txt"]
    with pytest.raises(PipelineError, match="already exists"):
        with resumable_output(final):
            pass


def test_a_non_finite_loss_stops_the_pipeline_with_one_line(tiny_model, data_files, tmp_path, capsys):
    from pipeline.run import run_and_report

    cache = tmp_path / "cache"
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=tiny_overrides(tiny_model, data_files, **{
            "cache.dir": cache, "cpt.learning_rate": 1e30, "cpt.logging_steps": 1, "stages": "[cpt,merge]"}))
    assert run_and_report(cfg, tmp_path / "run") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # not the progress bar
    assert len(err) == 1, err
    assert err[0].startswith("error: cpt: the training loss is nan at step ")
    assert "Lower cpt.learning_rate" in err[0] and "bfloat16" in err[0]
    assert not (tmp_path / "run" / "cpt_adapter").exists() and not (tmp_path / "run" / "cpt_model").exists()
    assert not [p for p in (cache / "cpt").iterdir() if is_complete(p)]


def test_a_non_finite_loss_stops_sft_too(tiny_model, data_files, tmp_path):
    from pipeline.stages.sft import train_sft

    cfg = SftConfig(r=4, learning_rate=1e30, max_steps=3, batch_size=2, gradient_accumulation_steps=1,
                    logging_steps=10, save_steps=0)
    with pytest.raises(PipelineError, match=r"^sft: the training loss is (nan|inf) in steps 1-3 \(of 3\); nothing was "
                                            r"published\. Lower sft.learning_rate"):
        train_sft(cfg, ModelConfig(path=str(tiny_model), max_seq_length=32), DataPath(path=str(data_files["sft"])),
                  tiny_model, 42, tmp_path / "sft", device="cpu")
    assert not (tmp_path / "sft").exists()


def test_trained_copies_keep_fp32_master_weights_in_a_bf16_model(tiny_model):
    model_cfg = ModelConfig(path=str(tiny_model))
    model = load_for_training("hf", tiny_model, model_cfg, torch.float32, torch.device("cpu")).to(torch.bfloat16)
    targets = resolve_targets("attn_mlp_embed", model, None, key="cpt.target_modules")
    model = add_lora("hf", model, targets, CptConfig(r=4), 0, False)

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    assert any("lm_head.modules_to_save" in n for n in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    frozen = {p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}  # the base (and the original embedding) stay 16-bit
    assert keep_fp32_masters(model) == 0  # nothing left to cast

    # autocast runs the step in bf16 and the gradients land on the fp32 copies
    ids = torch.tensor([[1, 5, 9, 12, 2]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for n, p in trainable.items()
               if "modules_to_save" in n)


def test_gradient_checkpointing_trains_the_same_lora(tiny_model, data_files, tmp_path, monkeypatch):
    data = DataPath(path=str(data_files["cpt"]))
    cfg, model_cfg = _cfgs(tiny_model, target_modules="attn_mlp", max_steps=2, save_steps=0)
    plain = train_cpt(cfg, model_cfg, data, 0, tmp_path / "plain", device="cpu")

    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(model.is_gradient_checkpointing)

    _with_callback(monkeypatch, Probe())
    cfg, _ = _cfgs(tiny_model, target_modules="attn_mlp", max_steps=2, save_steps=0, gradient_checkpointing=True)
    ckpt = train_cpt(cfg, model_cfg, data, 0, tmp_path / "ckpt", device="cpu")
    assert seen == [True, True]
    a, b = _adapter(plain), _adapter(ckpt)
    init = {k: v for k, v in a.items() if "lora_B" in k}
    assert any(v.abs().max() > 0 for v in init.values())  # LoRA B starts at 0: the adapter did train
    for name in a:  # with checkpointing the LoRA weights of every block get the same gradients
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_attn_implementation_reaches_the_model_and_is_checked(tiny_model):
    model = load_for_training("hf", tiny_model, ModelConfig(path=str(tiny_model)), torch.float32,
                              torch.device("cpu"), "eager")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(PipelineError, match=r"^cpt.attn_implementation=flash_attention_2 needs a CUDA GPU"):
        check_attn_implementation("flash_attention_2", torch.device("cpu"), "cpt.attn_implementation")
    with pytest.raises(PipelineError, match=r"^cpt.attn_implementation='flash': use one of eager, sdpa, "
                                            r"flash_attention_2"):
        check_ranges(CptConfig(attn_implementation="flash"), "cpt")
    with pytest.raises(PipelineError, match=r"^sft.save_steps=-1: must be >= 0"):
        check_ranges(SftConfig(save_steps=-1), "sft")


def test_training_arguments_checkpoint_only_when_asked(tmp_path):
    from transformers import TrainingArguments

    cpu = torch.device("cpu")
    args = training.training_arguments(TrainingArguments, CptConfig(save_steps=50), tmp_path, cpu, torch.float32, 0)
    assert (args.save_strategy, args.save_steps, args.save_total_limit) == ("steps", 50, 1)
    assert args.logging_nan_inf_filter is False and args.gradient_checkpointing is False
    args = training.training_arguments(TrainingArguments, CptConfig(save_steps=0, gradient_checkpointing=True),
                                     tmp_path, cpu, torch.float32, 0)
    assert args.save_strategy == "no"
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    # unsloth checkpoints inside its own model wrapper: the Trainer must not add a second layer
    args = training.training_arguments(TrainingArguments, CptConfig(gradient_checkpointing=True), tmp_path, cpu,
                                     torch.float32, 0, "unsloth")
    assert args.gradient_checkpointing is False


@pytest.fixture
def fake_gpus(monkeypatch):
    """A machine with 4 GPUs whose CUDA runtime honours CUDA_VISIBLE_DEVICES, without a GPU."""
    import os

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored (unset) afterwards, whatever resolve_device sets
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(devices, "_PINNED_GPU", None)
    state = {"initialised_with": None}

    def count():
        env = state["initialised_with"] or os.environ.get("CUDA_VISIBLE_DEVICES")
        return len(env.split(",")) if env else 4

    def init():
        state["initialised_with"] = state["initialised_with"] or os.environ.get("CUDA_VISIBLE_DEVICES") or "0,1,2,3"

    monkeypatch.setattr(torch.cuda, "device_count", count)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "init", init)
    return state


def test_cuda_n_pins_the_process_to_that_gpu(fake_gpus):
    import os

    assert devices.resolve_device("cuda:2") == torch.device("cuda")  # the Trainer's cuda:0 is now physical GPU 2
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    assert devices.resolve_device("cuda:2") == torch.device("cuda")  # later stages: the same GPU
    with pytest.raises(PipelineError, match=r"^device=cuda:1: this process already trains on GPU 2"):
        devices.resolve_device("cuda:1")
    assert devices.resolve_device("cpu") == torch.device("cpu")


def test_cuda_n_counts_within_cuda_visible_devices(fake_gpus, monkeypatch):
    import os

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    with pytest.raises(PipelineError, match=r"^device=cuda:2: only 2 GPU\(s\) visible \(cuda:0 to cuda:1, "
                                            r"CUDA_VISIBLE_DEVICES=3,1\)"):
        devices.resolve_device("cuda:2")
    assert devices.resolve_device("cuda:1") == torch.device("cuda")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(devices, "_PINNED_GPU", None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(PipelineError, match=r"^device=cuda:1 but CUDA is not available on this machine"):
        devices.resolve_device("cuda:1")
    assert devices.resolve_device("auto") == torch.device("cpu")


def test_auto_and_cuda_use_one_gpu_and_a_late_pin_is_refused(fake_gpus, monkeypatch):
    import os

    assert devices.resolve_device("auto") == torch.device("cuda")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"  # not DataParallel over all four
    monkeypatch.setattr(devices, "_PINNED_GPU", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    fake_gpus["initialised_with"] = "0,1,2,3"  # something used CUDA before the device was chosen
    with pytest.raises(PipelineError, match=r"^device=cuda:3: CUDA was initialised in this process before the GPU "
                                            r"could be chosen; start the run with CUDA_VISIBLE_DEVICES=3"):
        devices.resolve_device("cuda:3")
