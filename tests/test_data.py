"""Loading the user's files, and the one-line errors for bad ones."""

import pytest

from conftest import write_jsonl
from pipeline.core.outputs import PipelineError
from pipeline.core.data import load_cpt_documents, load_qa, load_sft_records


def test_cpt_documents_from_dir_file_glob_and_jsonl(tmp_path):
    (tmp_path / "a.md").write_text("# 見出し\n本文A", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("本文B\n", encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("x,y", encoding="utf-8")
    write_jsonl(tmp_path / "c.jsonl", [{"text": "本文C"}, {"text": "  "}])
    assert load_cpt_documents(str(tmp_path)) == ["# 見出し\n本文A", "本文C", "本文B"]
    assert load_cpt_documents(str(tmp_path / "sub" / "b.txt")) == ["本文B"]
    assert load_cpt_documents(str(tmp_path / "*.md")) == ["# 見出し\n本文A"]


def test_cpt_jsonl_custom_field_and_missing_field(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"body": "本文D"}])
    assert load_cpt_documents(str(f), text_field="body") == ["本文D"]
    f = write_jsonl(tmp_path / "d.jsonl", [{"body": "a"}, {"text": "x"}])
    with pytest.raises(PipelineError, match=r"d\.jsonl:2: missing string field 'body'"):
        load_cpt_documents(str(f), text_field="body")


def test_empty_corpus_and_missing_path(tmp_path):
    (tmp_path / "blank.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(PipelineError, match="corpus is empty"):
        load_cpt_documents(str(tmp_path))
    with pytest.raises(PipelineError, match="no such file or directory"):
        load_cpt_documents(str(tmp_path / "nope"))
    with pytest.raises(PipelineError, match="no .txt/.md/.jsonl/.json/.csv/.parquet/.arrow files or saved datasets found"):
        load_cpt_documents(str(tmp_path / "*.pdf"))


def test_not_utf8(tmp_path):
    (tmp_path / "sjis.txt").write_bytes("設備".encode("shift_jis"))
    with pytest.raises(PipelineError, match="sjis.txt: not valid UTF-8"):
        load_cpt_documents(str(tmp_path))


def test_sft_formats_normalise_to_messages(tmp_path):
    f = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a"}]},
        {"prompt": "p", "completion": "c"},
        {"instruction": "i", "input": "x", "output": "o"},
        {"instruction": "i", "output": "o"},
    ])
    recs = load_sft_records(str(f))
    assert recs[0][-1] == {"role": "assistant", "content": "a"}
    assert recs[1] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    assert recs[2][0] == {"role": "user", "content": "i\n\nx"}
    assert recs[3][0] == {"role": "user", "content": "i"}


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "sft.jsonl"
    f.write_text('{"prompt": "p", "completion": "c"}\n\n{"prompt": "p",\n', encoding="utf-8")
    with pytest.raises(PipelineError, match=r"sft\.jsonl:3: malformed JSON"):
        load_sft_records(str(f))


def test_sft_record_errors(tmp_path):
    f = write_jsonl(tmp_path / "s.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(PipelineError, match=r"s\.jsonl:1: expected 'messages'"):
        load_sft_records(str(f))
    f = write_jsonl(tmp_path / "s.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(PipelineError, match="last message must be the assistant"):
        load_sft_records(str(f))


def test_qa_records(tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", [{"id": 7, "question": " 何？ ", "answer": "880トン", "aliases": ["880t"]},
                                            {"question": "次は？", "answer": "x"}])
    items = load_qa(str(f))
    assert (items[0].id, items[0].question, items[0].aliases) == ("7", "何？", ["880t"])
    assert items[1].id == "qa:2"


@pytest.mark.parametrize("record, message", [
    ({"id": "a", "question": "q"}, r"qa\.jsonl:1: QA record without a non-empty string 'answer'"),
    ({"id": "a", "answer": "x"}, r"qa\.jsonl:1: QA record without a non-empty string 'question'"),
    ({"id": "a", "question": "q", "answer": "x", "aliases": "x"}, "'aliases' must be a list"),
])
def test_qa_errors(tmp_path, record, message):
    with pytest.raises(PipelineError, match=message):
        load_qa(str(write_jsonl(tmp_path / "qa.jsonl", [record])))


def test_qa_duplicate_id(tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", [{"id": "a", "question": "q", "answer": "x"}] * 2)
    with pytest.raises(PipelineError, match=r"qa\.jsonl:2: duplicate id 'a' \(first at .*qa\.jsonl:1\)"):
        load_qa(str(f))


def test_shipped_demo_data_loads():
    docs = load_cpt_documents("data/cpt")
    qa = load_qa("eval_sets/qa.jsonl")
    sft = load_sft_records("data/sft/chat.jsonl")
    assert len(qa) >= 100 and len(docs) >= 10 and len(sft) >= 100
    corpus = "\n".join(docs)
    assert all(q.answer in corpus for q in qa), "every gold answer is stated in the CPT corpus"
    sft_text = "\n".join(m["content"] for r in sft for m in r)
    entities = {q.question.split("の")[0] for q in qa}
    leaked = [e for e in entities if len(e) >= 3 and e in sft_text]
    assert not leaked, f"SFT data mentions domain entities: {leaked}"
