"""Every bad input is refused up front: one line naming the key or file:line, exit 2, no model loaded, nothing
written to the cache or published. Each case is a mistake a user can make; docs/reliability.md lists them.

The cases run in-process through `run_and_report` (what `python -m pipeline.run` calls) so that 30+ of them take
seconds; tests/test_cli.py runs a few through the real command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import QA, tiny_overrides, write_jsonl
from pipeline.run import run_and_report

CONF = Path(__file__).resolve().parents[1] / "conf"


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else lambda t: path.write_text(t, encoding="utf-8"))(text)
    return path


def _model_dir(tmp: Path, name: str, config=None, files=("model.safetensors",)) -> Path:
    d = tmp / name
    d.mkdir()
    if config is not None:
        _write(d / "config.json", config if isinstance(config, str) else json.dumps(config))
    for f in files:
        _write(d / f, b"\0")
    return d


def _parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def cases(tmp: Path, model: Path) -> dict:
    """name -> (overrides, the one line's pattern)."""
    empty = tmp / "empty_corpus"
    _write(empty / "blank.md", "\n \n")
    qa_dup = write_jsonl(tmp / "qa_dup.jsonl", [QA[0], {**QA[1], "id": QA[0]["id"]}])
    llama = json.loads((model / "config.json").read_text())
    return {
        # the config itself: ranges declared next to each key in pipeline/core/config.py
        "negative lora_alpha": ({"cpt.lora_alpha": -4}, r"^cpt\.lora_alpha=-4\.0: must be > 0"),
        "rank zero": ({"sft.r": 0}, r"^sft\.r=0: must be >= 1"),
        "dropout of one": ({"cpt.lora_dropout": 1.0}, r"^cpt\.lora_dropout=1\.0: must be < 1"),
        "zero learning rate": ({"sft.learning_rate": 0}, r"^sft\.learning_rate=0\.0: must be > 0"),
        "zero batch": ({"cpt.batch_size": 0}, r"^cpt\.batch_size=0: must be >= 1"),
        "warmup ratio above one": ({"sft.warmup_ratio": 1.5}, r"^sft\.warmup_ratio=1\.5: must be < 1"),
        "zero max_steps": ({"cpt.max_steps": 0}, r"^cpt\.max_steps=0: use -1"),
        "unknown scheduler": ({"cpt.lr_scheduler": "fast"}, r"^cpt\.lr_scheduler='fast': use one of linear, cosine"),
        "unknown dtype": ({"model.dtype": "int8"}, r"^model\.dtype='int8': use one of auto"),
        "unknown headline metric": ({"eval.headline_metric": "bleu"}, r"^eval\.headline_metric='bleu': use one of"),
        "wrong type": ({"cpt.r": "many"}, r"^config key cpt\.r: Value 'many'"),
        "stages out of order": ({"stages": "[sft,cpt]"}, r"^stages=\['sft', 'cpt'\]: stages run in the order"),
        "sequence longer than the model": ({"model.max_seq_length": 4096},
                                           r"^model\.max_seq_length=4096: longer than the model's 512 positions"),
        "invalid format regex": ({"eval.expected_format": "'[0-9'"},
                                 r"^eval\.expected_format='\[0-9': not a valid regex"),
        # the model directory
        "mistyped model.path": ({"model.path": tmp / "llm-jp-3-3.7bb"}, r"^model\.path=.*llm-jp-3-3\.7bb: no such dir"),
        "mistyped model.path, demo config": ({"model.path": tmp / "typo", "model.build_demo_if_missing": "true"},
                                             r"^model\.path=.*typo: model=demo \(the default model config\) is the "
                                             r"embedded demo, built only at outputs/demo_base_model"),
        "no config.json": ({"model.path": _model_dir(tmp, "no_config")}, r"no config\.json in this directory"),
        "config.json not JSON": ({"model.path": _model_dir(tmp, "bad_json", "{not json")},
                                 r"config\.json is not valid JSON"),
        "not a model's config": ({"model.path": _model_dir(tmp, "tokenizer_only", {"vocab": 3})},
                                 r"config\.json has no model_type; not a transformers model checkpoint"),
        "not a causal LM": ({"model.path": _model_dir(tmp, "bert", {"model_type": "bert",
                                                                     "architectures": ["BertForMaskedLM"]})},
                            r"a BertForMaskedLM checkpoint, not a causal language model"),
        "pickle weights only": ({"model.path": _model_dir(tmp, "bin_only", llama, files=("pytorch_model.bin",))},
                                r"no \.safetensors weights \(found pytorch_model\.bin: weights are only ever read "
                                r"as safetensors"),
        "wrong family": ({"model.tied_embeddings": "true"}, r"^model\.tied_embeddings=true but the checkpoint"),
        "unknown target module": ({"sft.target_modules": "[c_attn]"},
                                  r"^sft\.target_modules: module 'c_attn' does not exist in this llama model"),
        # corpora, SFT sets, QA sets: opened and parsed in full before any training
        "corpus missing": ({"data.cpt.path": tmp / "nowhere"}, r"^data\.cpt\.path=.*nowhere: no such file"),
        "corpus empty": ({"data.cpt.path": empty}, r"^data\.cpt\.path=.*empty_corpus: the corpus is empty"),
        "corpus not UTF-8": ({"data.cpt.path": _write(tmp / "sjis" / "doc.txt", "設備台帳".encode("shift_jis"))},
                             r"doc\.txt: not valid UTF-8 \(byte 0\)"),
        "corpus jsonl without text": ({"data.cpt.path": write_jsonl(tmp / "docs.jsonl", [{"body": "x"}])},
                                      r"docs\.jsonl:1: missing string field 'text' \(data\.cpt\.text_field"),
        "SFT malformed line": ({"data.sft.path": _write(tmp / "broken.jsonl", '{"prompt": "a", "completion": "b"}\n'
                                                                                '{"prompt": "a" "completion": "b"}\n')},
                               r"broken\.jsonl:2: malformed JSON"),
        "SFT unknown role": ({"data.sft.path": write_jsonl(tmp / "roles.jsonl", [
            {"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]}])},
                             r"roles\.jsonl:1: messages\[0\]\.role='human' \(system, user or assistant\)"),
        "SFT ends with the user": ({"data.sft.path": write_jsonl(tmp / "last.jsonl", [
            {"messages": [{"role": "user", "content": "q"}]}])}, r"last\.jsonl:1: the last message must be the "),
        "SFT empty file": ({"data.sft.path": _write(tmp / "nothing.jsonl", "\n")},
                           r"^data\.sft\.path=.*nothing\.jsonl: no SFT records"),
        "SFT unknown format": ({"data.sft.path": write_jsonl(tmp / "fmt.jsonl", [{"q": "a", "a": "b"}])},
                               r"fmt\.jsonl:1: expected 'messages', 'conversations', 'prompt'\+'completion'"),
        "QA without answer": ({"data.qa.path": write_jsonl(tmp / "noanswer.jsonl", [{"id": "x", "question": "q?"}])},
                              r"noanswer\.jsonl:1: QA record without a non-empty string 'answer'"),
        "QA duplicate id": ({"data.qa.path": qa_dup}, r"qa_dup\.jsonl:2: duplicate id 'q1' \(first at .*:1\)"),
        "QA aliases not a list": ({"data.qa.path": write_jsonl(tmp / "alias.jsonl", [{**QA[0], "aliases": "880t"}])},
                                  r"alias\.jsonl:1: 'aliases' must be a list of strings"),
        "QA not an object": ({"data.qa.path": _write(tmp / "list.jsonl", '["q", "a"]\n')},
                             r"list\.jsonl:1: expected a JSON object, got list"),
        # the same promise in every format (pipeline/core/data.py): file, row, field
        "parquet row with a null text": ({"data.cpt.path": _parquet(tmp / "docs.parquet", {"text": ["本文", None]})},
                                         r"docs\.parquet: row 2: missing string field 'text' \(data\.cpt\.text_field"),
        "CSV without the answer column": ({"data.qa.path": _write(tmp / "qa.csv", "id,question\nq1,P-101は?\n")},
                                          r"qa\.csv: row 1: QA record without a non-empty string 'answer'"),
        "sharegpt turn of an unknown role": ({"data.sft.path": _write(tmp / "chat.json", json.dumps([{"conversations": [
            {"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}]))},
            r"chat\.json: row 1: conversations\[1\]\.from='bot' \(human, gpt or system\)"),
        "Hub id not in the local cache": ({"model.path": "no-org/no-model"},
                                          r"^model\.path=no-org/no-model: no such directory, and no-org/no-model is "
                                          r"not in the local Hugging Face cache "
                                          r"\(searched .*models--no-org--no-model\)"),
        # outputs and earlier stages' outputs
        "cache dir not writable": ({"cache.dir": _write(tmp / "a_file", "x") / "cache"},
                                   r"^cache\.dir=.*a_file/cache: not writable"),
        "half-built input": ({"stages": "[sft,eval]", "inputs.cpt_model": model},
                             r"^inputs\.cpt_model=.*: not a completed stage output \(no \.complete marker\)"),
        "judge model missing": ({"eval.judge_path": tmp / "judge"}, r"^eval\.judge_path=.*judge: no such directory"),
    }


def _compose(overrides: list):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def _published(cache: Path) -> list:
    return sorted(str(p) for p in cache.rglob(".complete")) if cache.exists() else []


@pytest.fixture
def no_model_loading(monkeypatch):
    """Validation must finish before any weights are read: loading a checkpoint fails the test."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before validation finished")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


CASE_NAMES = [
    "negative lora_alpha", "rank zero", "dropout of one", "zero learning rate", "zero batch", "warmup ratio above one",
    "zero max_steps", "unknown scheduler", "unknown dtype", "unknown headline metric", "wrong type",
    "stages out of order", "sequence longer than the model", "invalid format regex", "mistyped model.path",
    "mistyped model.path, demo config", "no config.json", "config.json not JSON", "not a model's config",
    "not a causal LM", "pickle weights only", "wrong family", "unknown target module", "corpus missing",
    "corpus empty", "corpus not UTF-8", "corpus jsonl without text", "SFT malformed line", "SFT unknown role",
    "SFT ends with the user", "SFT empty file", "SFT unknown format", "QA without answer", "QA duplicate id",
    "QA aliases not a list", "QA not an object", "parquet row with a null text", "CSV without the answer column",
    "sharegpt turn of an unknown role", "Hub id not in the local cache", "cache dir not writable", "half-built input", "judge model missing",
]


def test_the_case_list_is_complete(tmp_path, tiny_model):
    assert sorted(CASE_NAMES) == sorted(cases(tmp_path, tiny_model)) and len(CASE_NAMES) >= 25


def assert_refused_up_front(overrides: dict, pattern: str, tiny_model, data_files, tmp_path, capsys):
    """The run with `overrides` exits 2 with one line `error: <pattern>` and publishes nothing."""
    cache = tmp_path / "cache"
    cfg = _compose(tiny_overrides(tiny_model, data_files, **{"cache.dir": cache, **overrides}))
    run_dir = tmp_path / "run"
    status = run_and_report(cfg, run_dir)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(pattern, err[0][len("error: "):]), err[0]
    assert _published(cache) == [] and not any((run_dir / d).exists() for d in
                                               ("cpt_adapter", "cpt_model", "sft_adapter", "metrics.json"))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_is_refused_up_front(case, tiny_model, data_files, tmp_path, capsys, no_model_loading):
    assert_refused_up_front(*cases(tmp_path, tiny_model)[case], tiny_model, data_files, tmp_path, capsys)


def test_disk_full_during_a_save_publishes_nothing(tiny_model, data_files, tmp_path, capsys, monkeypatch):
    """ENOSPC while the adapter is written: one line naming the stage, exit 2, no cache entry, no leftover output."""
    import errno

    import peft.peft_model

    def full(tensors, filename, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full)
    cache = tmp_path / "cache"
    cfg = _compose(tiny_overrides(tiny_model, data_files, **{"cache.dir": cache, "stages": "[cpt]"}))
    status = run_and_report(cfg, tmp_path / "run")
    # progress bars redraw with \r: the error line is the last segment of its line
    err = [line.split("\r")[-1] for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert status == 2 and len(err) == 1, err
    assert re.match(r"error: stage cpt: disk full while writing .*adapter_model\.safetensors; nothing was published",
                    err[0]), err[0]
    assert _published(cache) == []
