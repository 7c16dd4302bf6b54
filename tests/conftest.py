"""Shared fixtures: a tiny random Llama with a real byte-level BPE tokenizer, and small data files.

Nothing is downloaded: the tokenizer is trained on the strings below in well under a second.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import pipeline  # noqa: F401  (offline environment first)

# `datasets` keeps an Arrow copy of every table it reads under its cache: the tests' copies go to a temporary
# directory (inherited by the pipeline's subprocesses), never the user's ~/.cache.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="kk-datasets-"))
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)

CORPUS = [
    "北斗精機の第二工場にはプレス機P-101がある。P-101の定格能力は880トンです。",
    "P-101は最大880トンまで加圧できる。担当者は佐藤健一です。",
    "炉-3の設定温度は1150度である。炉-3の点検は毎週月曜日に行う。",
    "第二工場の始業点検は15分かかる。保護具はヘルメットと安全靴が必要です。",
]
SFT = [
    {"messages": [{"role": "user", "content": "日本の首都はどこですか？"},
                  {"role": "assistant", "content": "日本の首都は東京です。"}]},
    {"prompt": "一週間は何日ですか？", "completion": "一週間は七日です。"},
    {"instruction": "次の文を丁寧語にしてください。", "input": "これはペンだ。", "output": "これはペンです。"},
]
QA = [
    {"id": "q1", "question": "P-101の定格能力は何トンですか？", "answer": "880トン", "aliases": ["880t"]},
    {"id": "q2", "question": "炉-3の設定温度は何度ですか？", "answer": "1150度"},
    {"id": "q3", "question": "始業点検は何分かかりますか？", "answer": "15分"},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def make_tiny_model(out: Path, tie: bool = False, chat_template: bool = True, model_type: str = "llama",
                    hidden_size: int = 32, **config) -> Path:
    """A 2-layer random model of `model_type` with a BPE tokenizer trained on the fixture text.

    `config` overrides or adds config fields (e.g. a family's own settings)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.demo_model import train_tokenizer

    texts = CORPUS + [m["content"] for r in SFT if "messages" in r for m in r["messages"]] + [q["question"] for q in QA]
    tok = train_tokenizer(texts * 3, vocab_size=400)
    if not chat_template:
        tok.chat_template = None
    cfg = AutoConfig.for_model(
        model_type, **{**dict(
            vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4, max_position_embeddings=512,
            tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id), **config},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def data_files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("data")
    (d / "cpt").mkdir()
    for i, text in enumerate(CORPUS):
        (d / "cpt" / f"doc{i}.md").write_text(text, encoding="utf-8")
    return {
        "cpt": d / "cpt",
        "sft": write_jsonl(d / "sft.jsonl", SFT),
        "qa": write_jsonl(d / "qa.jsonl", QA),
    }


def tiny_overrides(model: Path, data: dict, **extra) -> list:
    """Command-line overrides that shrink the pipeline to seconds on the tiny model.

    The stage cache is shared by the tests of one session (next to the data files), never the repository's.
    """
    base = {
        "cache.dir": Path(data["cpt"]).parent / "cache",
        # CPT blocks of 32 tokens; SFT records up to 96, so every fixture record's answer and EOS are trained
        "model.path": model, "model.build_demo_if_missing": "false", "model.max_seq_length": 32, "sft.max_length": 96,
        "data.cpt.path": data["cpt"], "data.sft.path": data["sft"], "data.qa.path": data["qa"],
        "cpt.max_steps": 3, "sft.max_steps": 3, "cpt.batch_size": 2, "sft.batch_size": 2,
        "cpt.r": 4, "sft.r": 4, "eval.max_new_tokens": 6, "device": "cpu",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
