"""python -m pipeline.draft_qa: chunks that follow the documents, a tolerant reply parser, each filter with a case that
only it catches, the review files, and the accept step. A fake generator stands in for the model (mechanics only)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from pipeline.core.config import DataConfig, DataPath, DraftQAConfig, ModelConfig
from pipeline.draft_qa import (Chunk, accept, chunk_corpus, draft, filter_candidates, next_ids, parse_reply,
                               quote_from_chunk)

ROOT = Path(__file__).resolve().parents[1]

DOC = """# 設備台帳

P-101の定格能力は880トンです。P-101の担当者は佐藤健一です。

## 炉

炉-3の設定温度は1150度である。
炉-3の点検は毎週月曜日に行う。
"""


class FakeGenerator:
    """Replies from a table: the first key found in the prompt's passage picks the reply (else `default`)."""

    def __init__(self, replies: dict, default: str = "わかりません"):
        self.replies, self.default, self.prompts = replies, default, []

    def count_tokens(self, texts):
        return sum(len(t) for t in texts)

    def generate(self, prompts, first_index=0):
        self.prompts += list(prompts)
        return [next((r for k, r in self.replies.items() if k in p.split("文章:")[-1]), self.default)
                for p in prompts]


def one(chunks, **cand):
    """One parsed reply about chunk 0."""
    return [{"chunk": 0, "reply": "", "parsed": {"aliases": [], "quote": "", **cand}}]


# --- chunks and parsing --------------------------------------------------------------------------------------------

def test_chunks_follow_headings_paragraphs_and_jsonl_records(tmp_path):
    (tmp_path / "台帳.md").write_text(DOC, encoding="utf-8")
    write_jsonl(tmp_path / "faq.jsonl", [{"text": "質問: P-101の担当者は？\n答え: 佐藤健一"},
                                         {"text": "炉-3は1150度。"}])
    chunks = chunk_corpus(str(tmp_path), "text", len, 1000)
    md = [c for c in chunks if c.file.suffix == ".md"]
    assert [(c.line, c.heading) for c in md] == [(3, "設備台帳"), (7, "炉")]  # a paragraph each, under its heading
    assert md[1].text == "炉-3の設定温度は1150度である。\n炉-3の点検は毎週月曜日に行う。"
    assert [(c.file.name, c.line) for c in chunks if c.file.suffix == ".jsonl"] == [("faq.jsonl", 1), ("faq.jsonl", 2)]
    # chunk_tokens=1: one sentence a chunk, each with its own line
    small = [(c.line, c.text) for c in chunk_corpus(str(tmp_path / "台帳.md"), "text", len, 1)]
    assert small == [(3, "P-101の定格能力は880トンです。"), (3, "P-101の担当者は佐藤健一です。"),
                     (7, "炉-3の設定温度は1150度である。"), (8, "炉-3の点検は毎週月曜日に行う。")]


@pytest.mark.parametrize("reply", [
    '{"question": "P-101の定格能力は?", "answer": "880トン", "aliases": ["880t"], "quote": "定格能力は880トンです。"}',
    'はい、作りました。\n```json\n{"question": "P-101の定格能力は?", "answer": "880トン", "aliases": ["880t"], '
    '"quote": "定格能力は880トンです。"}\n```\n以上です。',
    'Q: P-101の定格能力は?\nA: 880トン\nQuote: 「定格能力は880トンです。」',
    '質問：P-101の定格能力は?\n答え：880トン\n引用：定格能力は880トンです。\n質問: 二つ目は無視される\n答え: x',
])
def test_parser_reads_json_anywhere_or_labelled_lines(reply):
    cand = parse_reply(reply)
    assert (cand["question"], cand["answer"], cand["quote"]) == \
        ("P-101の定格能力は?", "880トン", "定格能力は880トンです。")


@pytest.mark.parametrize("reply", ["", "わかりません", '{"question": "P-101は?"}', "質問: P-101の定格能力は?",
                                   '{"question": "x", "answer": 880'])
def test_parser_fails_on_replies_without_a_question_and_answer(reply):
    assert parse_reply(reply) is None


def test_a_missing_quote_is_the_chunks_sentence_that_holds_the_answer():
    chunk = "P-101の定格能力は880トンです。担当者は佐藤健一です。"
    assert quote_from_chunk(chunk, "佐藤健一") == "担当者は佐藤健一です。"


# --- filters: each case passes every other filter, so only its own filter can drop it ------------------------------

CHUNKS = [Chunk(Path("台帳.md"), 3, "設備台帳", "P-101の定格能力は880トンです。P-101の担当者は佐藤健一です。", DOC)]
GOOD = dict(question="P-101の定格能力は何トンですか？", answer="880トン", quote="P-101の定格能力は880トンです。")


def run_filters(items, scored=(), training=()):
    return filter_candidates(items, CHUNKS, list(scored), list(training), 90, 90)


def test_a_grounded_candidate_is_kept_with_its_source():
    kept, rejected, counts = run_filters(one(CHUNKS, **GOOD))
    assert [(k["question"], k["source"]) for k in kept] == [(GOOD["question"], "台帳.md:3")]
    assert counts["kept"] == 1 and not rejected


def test_a_quote_not_in_the_source_is_dropped():
    invented = "P-101の定格能力は880トンで、最新鋭の機械です。"
    _, rejected, counts = run_filters(one(CHUNKS, **{**GOOD, "quote": invented}))
    assert counts["quote_not_in_source"] == 1 and rejected[0]["reason"] == "quote_not_in_source"


def test_a_quote_with_other_widths_and_punctuation_is_found():
    kept, _, _ = run_filters(one(CHUNKS, **{**GOOD, "quote": "Ｐ－１０１の定格能力は８８０トンです"}))
    assert len(kept) == 1


def test_an_answer_not_in_its_quote_is_dropped():
    # a true sentence of the source, but the answer (a number the model made up) is not in it; 88 is not in 880
    _, _, counts = run_filters(one(CHUNKS, **{**GOOD, "answer": "88トン"}))
    assert counts["answer_not_in_quote"] == 1


def test_a_question_already_in_the_qa_set_is_dropped():
    _, _, counts = run_filters(one(CHUNKS, **GOOD), scored=["P-101の定格能力は何トンですか?"])
    assert counts["in_qa"] == 1


def test_a_question_asked_in_training_data_is_dropped():
    _, _, counts = run_filters(one(CHUNKS, **GOOD), training=["P-101の定格能力は何トンですか"])
    assert counts["training_overlap"] == 1


def test_one_fact_asked_twice_is_kept_once():
    items = one(CHUNKS, **GOOD) + one(CHUNKS, **{**GOOD, "question": "P-101は何トンまで加圧できますか？"}) \
        + one(CHUNKS, **{**GOOD, "question": "P-101の定格能力は何トンですか"})
    kept, _, counts = run_filters(items)
    assert len(kept) == 1 and counts["duplicate"] == 2  # the same answer from the same line; the same question


def test_an_unparsed_reply_is_counted():
    _, rejected, counts = run_filters([{"chunk": 0, "reply": "わかりません", "parsed": None}])
    assert counts["unparsed"] == 1 and rejected[0]["reply"] == "わかりません"


# --- the command end to end with a fake generator, and the accept step ----------------------------------------------

@pytest.fixture
def drafted(tmp_path):
    (tmp_path / "cpt").mkdir()
    (tmp_path / "cpt" / "台帳.md").write_text(DOC, encoding="utf-8")
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"id": "q001", "question": "炉-3の設定温度は何度ですか？",
                                              "answer": "1150度"}])
    cpt_qa = write_jsonl(tmp_path / "cpt_qa.jsonl", [{"id": "c1", "question": "炉-3の点検は何曜日ですか？",
                                                      "answer": "月曜日"}])
    gen = FakeGenerator({
        "880トン": '{"question": "P-101の定格能力は何トンですか？", "answer": "880トン", "aliases": ["880t"], '
                  '"quote": "P-101の定格能力は880トンです。"}',
        "佐藤健一": "Q: P-101の担当者は誰ですか？\nA: 佐藤健一",
        "1150度": "Q: 炉-3の設定温度は何度ですか?\nA: 1150度",  # already in data.qa
        "月曜日": "Q: 炉-3の点検は何曜日ですか？\nA: 月曜日"})  # asked in data.cpt_qa
    data = DataConfig(cpt=DataPath(str(tmp_path / "cpt")), qa=DataPath(str(qa)), cpt_qa=DataPath(str(cpt_qa)))
    cfg = DraftQAConfig(prompts_dir=str(ROOT / "conf" / "draft_qa" / "prompts"), chunk_tokens=1)
    stats = draft(cfg, data, ModelConfig(), "fake", 0, tmp_path / "out", generator=gen)
    return tmp_path / "out", stats, gen


def test_draft_writes_candidates_stats_and_review(drafted):
    out, stats, gen = drafted
    assert "炉-3の設定温度は何度ですか？" in gen.prompts[0]  # data.qa's questions show the style to ask in
    rows = [json.loads(x) for x in (out / "candidates.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["answer"], r["source"].rsplit("/", 1)[-1], r["group"]) for r in rows] == [
        ("draft-0001", "880トン", "台帳.md:3", "台帳"), ("draft-0002", "佐藤健一", "台帳.md:3", "台帳")]
    assert rows[1]["quote"] == "P-101の担当者は佐藤健一です。"
    saved = json.loads((out / "draft_stats.json").read_text(encoding="utf-8"))
    assert {k: saved[k] for k in ("chunks", "replies", "kept", "in_qa", "training_overlap", "quote_from_chunk")} == \
        {"chunks": 4, "replies": 4, "kept": 2, "in_qa": 1, "training_overlap": 1, "quote_from_chunk": 3}
    html = (out / "review.html").read_text(encoding="utf-8")
    assert "<mark>P-101の定格能力は880トンです。</mark>" in html and "<script" not in html
    with (out / "review.csv").open(encoding="utf-8-sig") as f:
        assert [r["id"] for r in csv.DictReader(f)] == ["draft-0001", "draft-0002"]


def review(path: Path, marks: dict, edits: dict = {}) -> Path:
    with path.open(encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if r["id"] in marks:
            r[marks[r["id"]]] = "x"
        r.update(edits.get(r["id"], {}))
    out = path.with_name("reviewed.csv")
    with out.open("w", encoding="utf-8-sig", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def test_accept_appends_with_new_ids_and_round_trips(drafted, tmp_path):
    from pipeline.core.data import load_qa

    out, _, _ = drafted
    qa = tmp_path / "qa.jsonl"
    before = qa.read_text(encoding="utf-8")
    reviewed = review(out / "review.csv", {"draft-0001": "accept", "draft-0002": "edit"},
                      {"draft-0002": {"answer": "佐藤 健一", "aliases": "佐藤健一 | 佐藤"}})
    assert accept(reviewed, qa) == (2, 0)
    text = qa.read_text(encoding="utf-8")
    assert text.startswith(before)  # the existing set is kept byte for byte, never renumbered
    items = load_qa(str(qa))  # data.qa format: the pipeline reads it back
    assert [(q.id, q.answer, q.aliases) for q in items] == [
        ("q001", "1150度", []), ("q002", "880トン", ["880t"]), ("q003", "佐藤 健一", ["佐藤健一", "佐藤"])]
    assert accept(reviewed, qa) == (0, 2)  # a second run adds nothing
    assert qa.read_text(encoding="utf-8") == text


def test_rejected_and_unmarked_rows_are_not_added(drafted, tmp_path):
    out, _, _ = drafted
    into = tmp_path / "new.jsonl"
    assert accept(review(out / "review.csv", {"draft-0001": "reject"}), into) == (0, 0)
    assert into.read_text(encoding="utf-8") == ""


def test_a_row_marked_twice_names_its_line(drafted, tmp_path):
    from pipeline.core.outputs import PipelineError

    out, _, _ = drafted
    bad = review(out / "review.csv", {"draft-0002": "accept"}, {"draft-0002": {"reject": "x"}})
    with pytest.raises(PipelineError, match=r"reviewed.csv:3: marked accept and reject"):
        accept(bad, tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_new_ids_continue_the_existing_numbering():
    assert next_ids(["q001", "q126", "q007"], 2) == ["q127", "q128"]
    assert next_ids([], 2) == ["d001", "d002"]
    assert next_ids(["intro", "d001"], 1) == ["d002"]


def test_accept_command_line(drafted, tmp_path):
    out, _, _ = drafted
    reviewed = review(out / "review.csv", {"draft-0001": "accept"})
    into = tmp_path / "grown.jsonl"
    done = subprocess.run([sys.executable, "-m", "pipeline.draft_qa", "accept", str(reviewed), "--into", str(into)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "1 questions added" in done.stdout
    assert json.loads(into.read_text(encoding="utf-8"))["id"] == "d001"
    bad = subprocess.run([sys.executable, "-m", "pipeline.draft_qa", "accept", str(tmp_path / "none.csv")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: {tmp_path / 'none.csv'}: no such file"


def test_closed_book_moves_what_the_base_model_answers_to_general_qa(tmp_path, monkeypatch):
    import pipeline.draft_qa as dq

    (tmp_path / "cpt").mkdir()
    (tmp_path / "cpt" / "台帳.md").write_text(DOC, encoding="utf-8")
    gen = FakeGenerator({"880トン": "Q: P-101の定格能力は何トンですか？\nA: 880トン",
                         "佐藤健一": "Q: P-101の担当者は誰ですか？\nA: 佐藤健一"})
    # the base model knows the capacity (a public catalogue number, say), not who is in charge
    monkeypatch.setattr(dq, "closed_book_answers", lambda path, questions, *a, **k: [
        "880トンです" if "定格能力" in q else "田中" for q in questions])
    cfg = DraftQAConfig(prompts_dir=str(ROOT / "conf" / "draft_qa" / "prompts"), chunk_tokens=1, closed_book=True)
    stats = draft(cfg, DataConfig(cpt=DataPath(str(tmp_path / "cpt"))), ModelConfig(), "fake", 0, tmp_path / "out",
                  generator=gen)
    assert (stats["kept"], stats["closed_book"]) == (1, 1)
    kept = [json.loads(x) for x in (tmp_path / "out" / "candidates.jsonl").read_text(encoding="utf-8").splitlines()]
    general = [json.loads(x) for x in
               (tmp_path / "out" / "general_qa_candidates.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [k["answer"] for k in kept] == ["佐藤健一"] and [g["answer"] for g in general] == ["880トン"]


def test_draft_qa_config_composes_and_restates_the_dataclass_defaults():
    from dataclasses import asdict

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        own = compose("draft_qa", overrides=["model=llama3", "model.path=/m", "data.cpt.path=/d"])
        demo = compose("draft_qa")
    assert OmegaConf.to_container(own.draft_qa) == asdict(DraftQAConfig())
    assert (demo.draft_qa.prompt, demo.draft_qa.chunk_tokens, demo.data.cpt.path) == ("demo", 1, "data/cpt")


def test_the_command_runs_a_real_generator_and_refuses_bad_input(tiny_model, tmp_path):
    """The Hydra command end to end on the tiny random model (its replies are noise: all unparsed, counted)."""
    (tmp_path / "cpt").mkdir()
    (tmp_path / "cpt" / "台帳.md").write_text(DOC, encoding="utf-8")
    args = [sys.executable, "-m", "pipeline.draft_qa", "model=llama3", f"model.path={tiny_model}",
            f"data.cpt.path={tmp_path / 'cpt'}", "draft_qa.max_chunks=2", "draft_qa.max_new_tokens=4",
            "device=cpu", f"hydra.run.dir={tmp_path / 'out'}"]
    done = subprocess.run(args + [f"draft_qa.generator_path={tiny_model}"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    stats = json.loads((tmp_path / "out" / "draft_stats.json").read_text(encoding="utf-8"))
    assert (stats["chunks"], stats["replies"], stats["unparsed"] + stats["kept"]) == (2, 2, 2)
    bad = subprocess.run(args + [f"draft_qa.generator_path={tmp_path / 'nope'}"], capture_output=True, text=True,
                         cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.strip().startswith(f"error: draft_qa.generator_path={tmp_path / 'nope'}")


def test_a_question_about_something_its_quote_does_not_name_is_dropped():
    # the answer is in the quote, but the question asks about another machine (a number the quote never states) or
    # another person (no name shared): its gold answer would be wrong
    text = "CNC-5については14日ごとの点検が決められている。製造二課の一人が東雲葵だ。"
    chunks = [Chunk(Path("台帳.md"), 1, "", text, "")]
    chunks[0].document = chunks[0].text
    items = [{"chunk": 0, "reply": "", "parsed": {"aliases": [], "quote": "", **c}} for c in (
        dict(question="P-24の点検周期は何日ですか？", answer="14日"),
        dict(question="如月麻衣の所属部署はどこですか？", answer="製造二課"),
        dict(question="CNC-5の点検周期は何日ですか？", answer="14日"))]
    kept, _, counts = filter_candidates(items, chunks, [], [], 90, 90)
    assert counts["question_not_in_quote"] == 2 and [k["question"] for k in kept] == ["CNC-5の点検周期は何日ですか？"]


def test_questions_about_two_machines_or_two_people_are_not_duplicates():
    items = one(CHUNKS, **GOOD) + one(CHUNKS, **{**GOOD, "question": "P-101の定格能力は何トンでしょうか"})
    assert run_filters(items)[2]["duplicate"] == 1  # only a particle and an ending differ: the same question
    chunks = [Chunk(Path("台帳.md"), 1, "", "P-102の定格能力は1230トン。天野雅人の所属は保全課。", "")]
    chunks[0].document = chunks[0].text
    items = [{"chunk": 0, "reply": "", "parsed": {"aliases": [], "quote": "", **c}} for c in (
        dict(question="P-102の定格能力は何トンですか？", answer="1230トン"),
        dict(question="天野雅人の所属部署はどこですか？", answer="保全課"))]
    scored = ["P-101の定格能力は何トンですか？", "天野雅史の所属部署はどこですか？"]
    kept, _, counts = filter_candidates(items, chunks, scored, [], 90, 90)
    assert len(kept) == 2 and counts["in_qa"] == 0


def test_a_question_about_another_person_in_the_quotes_words_is_dropped():
    chunks = [Chunk(Path("台帳.md"), 1, "", "天野雅史の役職は主任です。", "天野雅史の役職は主任です。")]
    items = [{"chunk": 0, "reply": "", "parsed": {"aliases": [], "quote": "", **c}} for c in (
        dict(question="久遠正樹はどの役職に就いていますか？", answer="主任"),
        dict(question="天野雅史はどの役職に就いていますか？", answer="主任"))]
    kept, _, counts = filter_candidates(items, chunks, [], [], 90, 90)
    assert counts["question_not_in_quote"] == 1 and [k["question"][:4] for k in kept] == ["天野雅史"]


def test_another_wording_of_a_question_in_the_qa_set_is_in_qa():
    from pipeline.core.data import QAItem

    scored = [QAItem("q1", "P-101の定格能力は何トンですか？", "880トン")]
    items = one(CHUNKS, **{**GOOD, "question": "P-101は最大何トンまで加圧できますか？"})
    assert run_filters(items, scored=scored)[2]["in_qa"] == 1


def test_a_question_about_another_machine_with_the_same_number_is_dropped():
    chunks = [Chunk(Path("台帳.md"), 1, "", "炉-3の設置場所はB棟2階です。", "炉-3の設置場所はB棟2階です。")]
    items = [{"chunk": 0, "reply": "", "parsed": {"aliases": [], "quote": "", **c}} for c in (
        dict(question="CNC-3の設置場所はどこですか？", answer="B棟2階"),
        dict(question="炉-3の設置場所はどこですか？", answer="B棟2階"))]
    kept, _, counts = filter_candidates(items, chunks, [], [], 90, 90)
    assert counts["question_not_in_quote"] == 1 and [k["question"][:3] for k in kept] == ["炉-3"]


@pytest.mark.parametrize("setting, message", [
    ({"prompt": "nope"}, r"draft_qa.prompt=nope: no prompt template .*nope.txt"),
    ({"augmented": "/no/such/run"}, r"draft_qa.augmented=/no/such/run: no augmented.jsonl there"),
])
def test_bad_settings_stop_with_one_line_before_any_model(tmp_path, setting, message):
    from pipeline.core.outputs import PipelineError

    (tmp_path / "cpt").mkdir()
    (tmp_path / "cpt" / "台帳.md").write_text(DOC, encoding="utf-8")
    cfg = DraftQAConfig(prompts_dir=str(ROOT / "conf" / "draft_qa" / "prompts"), **setting)
    with pytest.raises(PipelineError, match=message):
        draft(cfg, DataConfig(cpt=DataPath(str(tmp_path / "cpt"))), ModelConfig(), "fake", 0, tmp_path / "out",
              generator=FakeGenerator({}))
    assert not (tmp_path / "out").exists()


def test_a_review_without_its_columns_is_refused(tmp_path):
    from pipeline.core.outputs import PipelineError

    bad = tmp_path / "review.csv"
    bad.write_text("id,question,answer\nd1,P-101は?,880トン\n", encoding="utf-8")
    with pytest.raises(PipelineError, match=r"review.csv: missing column 'accept'"):
        accept(bad, tmp_path / "qa.jsonl")
