"""The augment stage: its filters on hand-built replies, passages, the generator, resumption after a kill, the cache
and how CPT reads the generated text.

The filter tests feed `filter_replies` replies written by hand, one per case (a number changed, an answer absent
from the source, a duplicate, a scored question), so each shows what its filter drops and what it keeps."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import tiny_overrides, write_jsonl
from pipeline.core.config import AugmentConfig, DataPath
from pipeline.core.outputs import PipelineError
from pipeline.stages.augment import (augment_corpus, filter_replies, load_augmented, load_templates, numbers,
                                     parse_qa, scored_question_set, split_passages)

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "P-101の定格能力は880トンです。P-101のメーカーは雲雀精工である。始業点検は15分かかる。"


def run_filters(replies, cfg=None, scored=(), docs=(SOURCE,)):
    """(kept, rejected, counts) for `replies`, given as (strategy, reply) pairs about document 0."""
    jobs = [{"doc": 0, "passage": 0, "strategy": s} for s, _ in replies]
    return filter_replies(jobs, [r for _, r in replies], list(docs), [[d] for d in docs], cfg or AugmentConfig(),
                          set(scored))


def reasons(rejected):
    return [r["reason"] for r in rejected]


# --- the filters ----------------------------------------------------------------------------------------------------

def test_a_changed_number_is_dropped_and_another_notation_of_the_same_number_is_kept():
    kept, rejected, counts = run_filters([
        ("rewrite", "P-101は最大890トンまで加圧できる。"),          # 880 -> 890: not in the source
        ("rewrite", "始業点検には5分かかる。"),                     # 15 -> 5: numbers compare whole
        ("rewrite", "雲雀精工製のP-101は八百八十トン級のプレスだ。"),  # 880 in kanji: the same number
        ("rewrite", "P-101の能力は880tに達する。")])                # 880t = 880トン
    assert reasons(rejected) == ["unfaithful", "unfaithful"]
    assert [k["text"] for k in kept] == ["雲雀精工製のP-101は八百八十トン級のプレスだ。", "P-101の能力は880tに達する。"]
    assert counts["rewrite"]["unfaithful"] == 2 and counts["rewrite"]["kept"] == 2


def test_the_faithfulness_filter_can_be_switched_off():
    kept, rejected, _ = run_filters([("rewrite", "P-101は最大890トンまで加圧できる。")],
                                    AugmentConfig(faithfulness=False))
    assert len(kept) == 1 and not rejected


def test_an_answer_absent_from_the_source_is_dropped():
    kept, rejected, counts = run_filters([
        ("qa", "質問: P-101のメーカーはどこですか？\n答え: 白鷺重工"),    # the source says 雲雀精工
        ("qa", "質問: P-101を作った会社は？\n答え: 雲雀精工です。")])   # copula dropped by the normalisation
    assert reasons(rejected) == ["ungrounded"]
    assert [(k["question"], k["answer"]) for k in kept] == [("P-101を作った会社は？", "雲雀精工です。")]
    assert counts["qa"] == {**counts["qa"], "generated": 2, "kept": 1, "ungrounded": 1}


def test_a_question_about_something_the_passage_does_not_name_is_dropped():
    # The demo generator's failure: a pair about its own training world, with a value the passage happens to hold.
    kept, rejected, counts = run_filters([
        ("qa", "質問: CNC-14の定格能力は何トンですか？\n答え: 880トン"),   # another machine
        ("qa", "質問: 柊健吾の点検時間は？\n答え: 15分"),                 # another topic
        ("qa", "質問: P-101の定格能力は何トンですか？\n答え: 880トン")])
    assert reasons(rejected) == ["off_topic", "off_topic"] and counts["qa"]["off_topic"] == 2
    assert [k["question"] for k in kept] == ["P-101の定格能力は何トンですか？"]


def test_a_reply_without_a_question_and_answer_is_unparsed():
    _, rejected, counts = run_filters([("qa", "P-101は880トンのプレス機です。")])
    assert reasons(rejected) == ["unparsed"] and counts["qa"]["generated"] == 0


def test_near_duplicates_and_copies_of_the_passage_are_dropped():
    kept, rejected, _ = run_filters([
        ("rewrite", "P-101は雲雀精工が作った、880トンのプレスである。"),
        ("rewrite", "P-101は雲雀精工が作った880トンのプレスである"),     # the same text up to punctuation
        ("rewrite", SOURCE.replace("です。", "だ。")),                 # its own passage, barely changed
        ("qa", "質問: P-101の定格能力は？\n答え: 880トン"),
        ("qa", "質問: P-101の定格能力は?\n答え: 880トン")])            # the same pair again
    assert reasons(rejected) == ["duplicate", "duplicate", "duplicate"]
    assert len(kept) == 2
    kept, rejected, _ = run_filters([("rewrite", "P-101は雲雀精工が作った、880トンのプレスである。")] * 2,
                                    AugmentConfig(dedup_similarity=None))
    assert len(kept) == 2, "dedup_similarity=null switches the filter off"


def test_a_looping_reply_is_dropped():
    kept, rejected, _ = run_filters([
        ("relations", "P-101は雲雀精工製。\nP-101は雲雀精工製。\nP-101は雲雀精工製。"),   # one line three times
        ("summary", "P-101はプレスプレスプレスです。"),                                  # eval's repetition rule
        ("summary", "P-101は雲雀精工製の880トンのプレスで、始業点検は15分。")])
    assert reasons(rejected) == ["repetitive", "repetitive"] and len(kept) == 1


def test_a_scored_question_is_dropped_after_normalisation(tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"id": "q1", "question": "P-101の定格能力は何トンですか？",
                                               "answer": "880トン"}])
    scored = scored_question_set(DataPath(str(qa)))  # data.qa with its default field keys
    kept, rejected, counts = run_filters([
        ("qa", "質問: Ｐ－１０１の定格能力は何トンですか?\n答え: 880トン"),   # full width, ASCII question mark
        ("qa", "質問: P-101は最大何トンまで加圧できますか？\n答え: 880トン")], scored=scored)
    assert reasons(rejected) == ["test_question"] and counts["qa"]["test_question"] == 1
    assert kept[0]["question"] == "P-101は最大何トンまで加圧できますか？"


def test_numbers_go_through_the_scorers_normalisation():
    assert numbers("八百八十トン、８８０t、1,200回転、-5度") == {"880", "1200", "-5"}
    assert numbers("CNC-3は2022年に導入") == {"3", "2022"}


def test_question_answer_pairs_are_parsed_in_both_languages():
    assert parse_qa("質問: P-101の能力は？\n答え: 880トン\n質問：炉-3は？\n回答：1150度") == [
        ("P-101の能力は？", "880トン"), ("炉-3は？", "1150度")]
    assert parse_qa("Question: Who runs P-101?\nAnswer: Sato") == [("Who runs P-101?", "Sato")]
    assert parse_qa("答え: 880トン") == []


# --- passages and templates ------------------------------------------------------------------------------------------

def test_passages_are_cut_at_sentence_ends_within_the_token_budget():
    doc = "# 設備台帳\n\nP-101は880トン。炉-3は1150度！CNC-3は7500回転。"
    assert split_passages(doc, len, 1) == ["# 設備台帳", "P-101は880トン。", "炉-3は1150度！", "CNC-3は7500回転。"]
    assert split_passages(doc, len, 30) == ["# 設備台帳\n\nP-101は880トン。炉-3は1150度！", "CNC-3は7500回転。"]
    assert split_passages("One. Two.", len, 1) == ["One.", "Two."]


def test_every_strategy_has_a_japanese_and_an_english_template():
    for language in ("ja", "en"):
        cfg = AugmentConfig(language=language, prompts_dir=str(ROOT / "conf/augment/prompts"),
                            strategies={"qa": 1, "rewrite": 1, "relations": 1, "summary": 1})
        assert set(load_templates(cfg)) == {"qa", "rewrite", "relations", "summary"}


@pytest.mark.parametrize("strategies, files, message", [
    ({"quiz": 1}, {}, r"augment\.strategies\.quiz: no prompt template .*quiz\.txt"),
    ({"qa": 1}, {"qa": "no field"}, r"qa\.txt: the template has no \{passage\} field"),
    ({"qa": 1}, {"qa": "{passage} {other}"}, r"qa\.txt: use the field \{passage\} only"),
    ({"qa": 0}, {}, r"every count is 0")])
def test_bad_templates_are_refused_with_one_line(tmp_path, strategies, files, message):
    (tmp_path / "ja").mkdir()
    for name, text in files.items():
        (tmp_path / "ja" / f"{name}.txt").write_text(text, encoding="utf-8")
    with pytest.raises(PipelineError, match=message):
        load_templates(AugmentConfig(prompts_dir=str(tmp_path), strategies=strategies))


# --- the stage on a tiny model ----------------------------------------------------------------------------------------

def stage_cfg(**kw):
    return AugmentConfig(prompts_dir=str(ROOT / "conf/augment/prompts"), max_new_tokens=8, batch_size=3,
                         strategies={"qa": 1, "rewrite": 1}, passage_tokens=1, **kw)


def model_cfg(tiny_model):
    from pipeline.core.config import ModelConfig

    return ModelConfig(path=str(tiny_model), instruct_path=str(tiny_model))


def data_cfg(data_files):
    from pipeline.core.config import DataConfig, DataPath

    return DataConfig(cpt=DataPath(str(data_files["cpt"])), qa=DataPath(str(data_files["qa"])))


def test_the_stage_writes_kept_texts_and_counts_per_strategy(tiny_model, data_files, tmp_path):
    out = augment_corpus(stage_cfg(), model_cfg(tiny_model), data_cfg(data_files), 0, tmp_path / "aug", "cpu")
    stats = json.loads((out / "augment_stats.json").read_text(encoding="utf-8"))
    assert stats["documents"] == 4 and stats["prompts"] == 2 * stats["passages"]
    for name in ("qa", "rewrite"):
        c = stats["strategies"][name]
        assert c["prompts"] == stats["passages"]
        dropped = sum(c[r] for r in ("test_question", "ungrounded", "off_topic", "unfaithful", "duplicate"))
        assert c["kept"] + dropped == c["generated"] and c["generated_tokens"] > 0
    kept = [json.loads(x) for x in (out / "augmented.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(kept) == stats["kept"]
    assert (out / ".complete").is_file() and not (tmp_path / "aug.build").exists()


def test_a_killed_generation_resumes_after_its_last_finished_batch(tiny_model, data_files, tmp_path, monkeypatch):
    from pipeline.core.generate import Generator

    whole = augment_corpus(stage_cfg(), model_cfg(tiny_model), data_cfg(data_files), 0, tmp_path / "a", "cpu")
    real, calls = Generator.generate, []

    def dies_at_the_third_batch(self, prompts, first_index=0):
        calls.append(first_index)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill: nothing after the second batch's replies was written
        return real(self, prompts, first_index)

    monkeypatch.setattr(Generator, "generate", dies_at_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        augment_corpus(stage_cfg(), model_cfg(tiny_model), data_cfg(data_files), 0, tmp_path / "b", "cpu")
    assert not (tmp_path / "b").exists()
    calls.clear()
    monkeypatch.setattr(Generator, "generate", lambda self, prompts, first_index=0: (
        calls.append(first_index), real(self, prompts, first_index))[1])
    resumed = augment_corpus(stage_cfg(), model_cfg(tiny_model), data_cfg(data_files), 0, tmp_path / "b", "cpu")
    assert calls[0] == 2 * 3, "the two finished batches (3 prompts each) are not generated again"
    stats = json.loads((resumed / "augment_stats.json").read_text(encoding="utf-8"))
    assert stats["resumed_batches"] == 2
    for name in ("augmented.jsonl", "rejected.jsonl"):
        assert (resumed / name).read_text(encoding="utf-8") == (whole / name).read_text(encoding="utf-8")


def test_a_generator_without_a_chat_template_is_refused(tmp_path):
    from conftest import make_tiny_model
    from pipeline.core.generate import Generator

    base = make_tiny_model(tmp_path / "base", chat_template=False)
    with pytest.raises(PipelineError, match=r"augment\.generator_path=.*no chat template"):
        Generator(str(base), device="cpu")


def test_engine_vllm_is_refused_with_one_line_where_it_is_missing(monkeypatch):
    import importlib.util

    from pipeline.core.generate import check_engine

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(PipelineError, match=r"augment\.engine=vllm: vLLM is not installed"):
        check_engine("vllm", "auto")


# --- in the pipeline: cached, keyed, read by CPT ----------------------------------------------------------------------

def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_the_whole_chain_runs_with_augment_and_cpt_reads_the_generated_text(tiny_model, data_files, tmp_path):
    from pipeline.run import run_pipeline

    overrides = tiny_overrides(tiny_model, data_files, **{
        "stages": "[augment,cpt,merge,sft,eval]", "cache.dir": tmp_path / "cache", "augment.generator_path": tiny_model,
        "augment.prompts_dir": ROOT / "conf/augment/prompts", "augment.max_new_tokens": 8,
        "augment.passage_tokens": 1, "augment.dedup_similarity": "null", "augment.faithfulness": "false",
        "augment.strategies": "{qa:1,rewrite:1}"})  # a random model's rewrites pass the filters left on
    first = run_pipeline(compose_cfg(overrides), tmp_path / "a")
    assert first["stage/augment"] == "built" and first["augment/kept"] > 0
    kept = len(load_augmented(tmp_path / "a" / "augmented", "質問: {question}\n答え: {answer}"))
    cpt_stats = json.loads((tmp_path / "a" / "cpt_adapter" / "cpt_stats.json").read_text(encoding="utf-8"))
    assert cpt_stats["documents"] == 4 + kept  # the originals plus every kept text
    assert "sft/contains" in first and first["augment/qa/prompts"] == first["augment/rewrite/prompts"] > 0
    again = run_pipeline(compose_cfg(overrides), tmp_path / "b")
    assert {again[f"stage/{s}"] for s in ("augment", "cpt", "merge", "sft", "eval")} == {"reused"}
    plain = run_pipeline(compose_cfg([o for o in overrides if not o.startswith("stages=")] + ["stages=[cpt]"]),
                         tmp_path / "c")
    assert plain["key/cpt"] != first["key/cpt"], "the augment output is part of CPT's key"
