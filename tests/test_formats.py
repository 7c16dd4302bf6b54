"""Users' data and models as they have them: every data format and chat shape reads to the same records, the stage
keys follow the records (not the files), and a model given as a Hub id comes from the local Hugging Face cache.

The error for a bad row in each format is in tests/test_validation.py (one line, file, row and field)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import CORPUS, QA, SFT, tiny_overrides, write_jsonl
from pipeline.cache import fingerprint_model, stage_key
from pipeline.core.data import load_cpt_documents, load_qa, load_sft_records
from pipeline.core.outputs import PipelineError
from pipeline.run import resolve_models, run_pipeline, stage_materials

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["cpt", "merge", "sft", "eval"]
SHAREGPT = {"user": "human", "assistant": "gpt", "system": "system"}


# --- writing the same records in other formats ------------------------------------------------------------------

def rows_of(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def to_parquet(rows: list, path: Path) -> Path:
    from datasets import Dataset

    Dataset.from_list(rows).to_parquet(str(path))
    return path


def to_saved_dataset(rows: list, path: Path) -> Path:
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(path))
    return path


def to_csv(rows: list, path: Path) -> Path:
    """Lists (QA aliases) as `a|b`, the way a spreadsheet holds them."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows({k: "|".join(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    return path


def to_json_array(rows: list, path: Path) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def sharegpt(messages: list) -> dict:
    return {"conversations": [{"from": SHAREGPT[m["role"]], "value": m["content"]} for m in messages]}


def test_every_format_and_shape_reads_to_the_same_records(tmp_path):
    docs = [{"text": t} for t in CORPUS]
    for f in (to_parquet(docs, tmp_path / "c.parquet"), to_csv(docs, tmp_path / "c.csv"),
              to_json_array(docs, tmp_path / "c.json"), to_saved_dataset(docs, tmp_path / "saved"),
              write_jsonl(tmp_path / "c.jsonl", docs)):
        assert load_cpt_documents(str(f)) == CORPUS, f.name
    # a datasets .arrow file on its own, and a directory holding a saved dataset next to loose files
    assert load_cpt_documents(str(next((tmp_path / "saved").glob("*.arrow")))) == CORPUS
    (tmp_path / "dir").mkdir()
    shutil.copytree(tmp_path / "saved", tmp_path / "dir" / "a_saved")
    (tmp_path / "dir" / "b.md").write_text("追加の文書。", encoding="utf-8")
    assert load_cpt_documents(str(tmp_path / "dir")) == CORPUS + ["追加の文書。"]

    chats = load_sft_records(str(write_jsonl(tmp_path / "sft.jsonl", SFT)))
    assert chats[1] == [{"role": "user", "content": "一週間は何日ですか？"},
                        {"role": "assistant", "content": "一週間は七日です。"}]
    assert load_sft_records(str(to_json_array([sharegpt(m) for m in chats], tmp_path / "sharegpt.json"))) == chats
    assert load_sft_records(str(to_parquet([{"messages": m} for m in chats], tmp_path / "sft.parquet"))) == chats
    alpaca = [{"instruction": "次の文を丁寧語にしてください。", "input": "これはペンだ。",
               "output": "これはペンです。"}]
    assert load_sft_records(str(to_csv(alpaca, tmp_path / "alpaca.csv"))) == [chats[2]]

    def scored(items):  # what is scored, not where it was read
        return [(q.id, q.question, q.answer, q.aliases, q.group) for q in items]

    expected = scored(load_qa(str(write_jsonl(tmp_path / "qa.jsonl", QA))))
    assert expected[0][3] == ["880t"]
    for f in (to_csv(QA, tmp_path / "qa.csv"), to_parquet(QA, tmp_path / "qa.parquet"),
              to_json_array(QA, tmp_path / "qa.json")):
        assert scored(load_qa(str(f))) == expected, f.name
    # numbers stay strings in CSV: an answer "880" and an id "007" are not 880 and 7
    got = load_qa(str(to_csv([{"id": "007", "question": "何トン?", "answer": "880"}], tmp_path / "n.csv")))
    assert (got[0].id, got[0].answer) == ("007", "880")


# --- stage keys: records, not files -----------------------------------------------------------------------------

def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def keys_for(model, data: dict, tmp_path: Path, **extra) -> dict:
    overrides = tiny_overrides(model, data, **{
        "cache.dir": tmp_path / "cache", **{f"data.{k}.path": v for k, v in data.items()}, **extra})
    cfg = compose_cfg(overrides)
    cfg = resolve_models(cfg, STAGES)
    return {s: stage_key(s, m) for s, m in stage_materials(cfg, STAGES, "hf").items()}


def test_the_demos_data_converted_to_each_format_has_the_jsonl_originals_keys(tiny_model, tmp_path):
    """The demo's files (data/cpt: .md files and an FAQ export in JSON lines; the SFT chats; the QA and held-out
    sets) as parquet, CSV, saved Arrow datasets and sharegpt JSON: every stage key equals the originals'."""
    original = {"cpt": ROOT / "data" / "cpt", "sft": ROOT / "data" / "sft" / "chat.jsonl",
                "qa": ROOT / "eval_sets" / "qa.jsonl",
                "heldout": ROOT / "data" / "heldout" / "domain_paraphrases.jsonl"}
    docs = [{"text": t} for t in load_cpt_documents(str(original["cpt"]))]
    chats = load_sft_records(str(original["sft"]))
    qa, heldout = rows_of(original["qa"]), rows_of(original["heldout"])
    assert {tuple(m["role"] for m in c) for c in chats} == {("user", "assistant")}  # so CSV can hold them as pairs
    pairs = [{"prompt": c[0]["content"], "completion": c[1]["content"]} for c in chats]
    d = tmp_path / "converted"
    d.mkdir()
    variants = {
        "parquet": {"cpt": to_parquet(docs, d / "cpt.parquet"), "sft": to_parquet([{"messages": c} for c in chats],
                                                                                d / "sft.parquet"),
                    "qa": to_parquet(qa, d / "qa.parquet"), "heldout": to_parquet(heldout, d / "heldout.parquet")},
        "csv": {"cpt": to_csv(docs, d / "cpt.csv"), "sft": to_csv(pairs, d / "sft.csv"), "qa": to_csv(qa, d / "qa.csv"),
                "heldout": to_csv(heldout, d / "heldout.csv")},
        "arrow": {"cpt": to_saved_dataset(docs, d / "cpt_arrow"), "sft": to_saved_dataset(pairs, d / "sft_arrow"),
                  "qa": to_saved_dataset(qa, d / "qa_arrow"),
                  "heldout": to_saved_dataset(heldout, d / "heldout_arrow")},
        "sharegpt json": {"cpt": to_json_array(docs, d / "cpt.json"),
                          "sft": to_json_array([sharegpt(c) for c in chats], d / "sft.json"),
                          "qa": to_json_array(qa, d / "qa.json"),
                          "heldout": to_json_array(heldout, d / "heldout.json")},
    }
    expected = keys_for(tiny_model, original, tmp_path)
    for name, files in variants.items():
        assert keys_for(tiny_model, files, tmp_path) == expected, name
    # and a key does follow the records: one changed answer is another eval, one more document another CPT
    qa[0]["answer"] += "x"
    other_answer = keys_for(tiny_model, {**original, "qa": to_csv(qa, d / "qa2.csv")}, tmp_path)
    assert {s for s in STAGES if other_answer[s] != expected[s]} == {"eval"}
    more = keys_for(tiny_model, {**original, "cpt": to_parquet(docs + [{"text": "追加。"}], d / "more.parquet")},
                    tmp_path)
    assert {s for s in STAGES if more[s] != expected[s]} == set(STAGES)


# --- models from the local Hugging Face cache -------------------------------------------------------------------

def hub_cache(root: Path, repo: str, model_dir: Path, commit: str, refs=("main",)) -> Path:
    """`model_dir` laid out as huggingface_hub lays out a download: blobs named by their hash, a snapshot per
    commit whose files are relative links to them, and refs/<branch> holding the commit."""
    d = root / f"models--{repo.replace('/', '--')}"
    snapshot = d / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (d / "blobs").mkdir(exist_ok=True)
    for f in sorted(model_dir.iterdir()):
        blob = d / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (d / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (d / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    root = tmp_path / "hf_hub"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return root


def test_a_hub_id_resolves_from_the_local_cache_and_is_keyed_by_its_commit(tiny_model, hf_cache, data_files,
                                                                          tmp_path):
    from pipeline.core.checkpoints import resolve_model_path

    first, second = "a" * 40, "b" * 40
    snap = hub_cache(hf_cache, "kk-test/tiny", tiny_model, first)
    newer = hub_cache(hf_cache, "kk-test/tiny", tiny_model, second, refs=("v2",))
    assert resolve_model_path("kk-test/tiny") == str(snap)  # refs/main
    assert resolve_model_path(f"kk-test/tiny@{second}") == str(newer)  # a commit
    assert resolve_model_path("kk-test/tiny@v2") == str(newer)  # a tag or branch, through refs/
    assert resolve_model_path(str(tiny_model)) == str(tiny_model)  # a directory stays a directory
    with pytest.raises(PipelineError, match=r"^model\.path=kk-test/other: no such directory, and kk-test/other is "
                                            r"not in the local Hugging Face cache \(searched "
                                            r".*hf_hub/models--kk-test--other\)"):
        resolve_model_path("kk-test/other")
    with pytest.raises(PipelineError, match=r"revision 'v3' of kk-test/tiny is not in the local Hugging Face cache"):
        resolve_model_path("kk-test/tiny@v3")

    assert fingerprint_model(snap) == f"hf:kk-test/tiny@{first}"
    by_id = keys_for("kk-test/tiny", {"cpt": data_files["cpt"], "sft": data_files["sft"], "qa": data_files["qa"]},
                     tmp_path)
    assert by_id == keys_for(snap, {"cpt": data_files["cpt"], "sft": data_files["sft"], "qa": data_files["qa"]},
                             tmp_path)
    by_tag = keys_for("kk-test/tiny@v2", {"cpt": data_files["cpt"], "sft": data_files["sft"], "qa": data_files["qa"]},
                      tmp_path)
    assert by_tag["cpt"] != by_id["cpt"]  # another commit is another model, even with the same files


def test_cpt_to_eval_through_converted_formats_and_a_hub_id(tiny_model, hf_cache, data_files, tmp_path):
    """The fixture data as parquet (corpus), sharegpt JSON (SFT) and CSV (QA), the model as a Hub id from the local
    cache: the whole chain runs, and every stage has the key the JSON-lines originals and the directory give."""
    snap = hub_cache(hf_cache, "kk-test/tiny", tiny_model, "c" * 40)
    d = tmp_path / "converted"
    d.mkdir()
    converted = {"cpt": to_parquet([{"text": t} for t in CORPUS], d / "corpus.parquet"),
                 "sft": to_json_array([sharegpt(m) for m in load_sft_records(str(data_files["sft"]))], d / "sft.json"),
                 "qa": to_csv(QA, d / "qa.csv")}
    cfg = compose_cfg(tiny_overrides("kk-test/tiny", converted, **{
        "cache.dir": tmp_path / "cache", **{f"data.{k}.path": v for k, v in converted.items()}}))
    metrics = run_pipeline(cfg, tmp_path / "run")
    assert all(metrics[f"stage/{s}"] == "built" for s in STAGES)
    originals = keys_for(snap, {"cpt": data_files["cpt"], "sft": data_files["sft"], "qa": data_files["qa"]}, tmp_path)
    assert {s: metrics[f"key/{s}"] for s in STAGES} == originals
    assert [json.loads(x)["id"] for x in (tmp_path / "run" / "answers.jsonl").read_text().splitlines()] == \
        ["q1", "q2", "q3"]
