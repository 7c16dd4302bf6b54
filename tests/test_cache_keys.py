"""Cache keys follow exactly what a stage's output depends on, so a cached result is never stale.

Generated from the config schema rather than listed by hand: every key of every config section is changed once, and
every input file (data, models, templates) once; the stages whose keys change must be the stages that read it and
every stage after them, no more and no fewer. A key a stage does not read (logging, the eval batch size, output
paths) must change no key. A config key that someone adds without deciding which keys it enters fails here.

The keys come from run.stage_materials, the function run_pipeline builds its stages' keys with; nothing is trained.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import QA, SFT, tiny_overrides, write_jsonl
from pipeline.cache import stage_key
from pipeline.core.config import SECTIONS
from pipeline.run import stage_materials

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["augment", "cpt", "merge", "chat_vector", "sft", "eval", "export"]


def after(*readers: str) -> set:
    """The stages a change read by `readers` must rebuild: each reader and every stage after it (keys chain)."""
    return {s for r in readers for s in STAGES[STAGES.index(r):]}


# Which stages read each model.* key (the base model itself is identified by its files, changed below). A new
# ModelConfig key fails test_every_config_key_moves_exactly_its_stages until it is declared here.
MODEL_READERS = {
    "path": after("cpt"),  # another directory is another model (its files are not read for the key)
    "dtype": after("augment"),  # the generator runs in the resolved dtype too
    "max_seq_length": after("cpt"),
    "trust_remote_code": after("augment"),
    "prompt_template": after("chat_vector"),  # the chat-vector model records the prompt format SFT and eval use
    "chat_template": after("chat_vector"),
    "modules": after("cpt"),
    "load_in_4bit": after("cpt"),
    "add_special_tokens": after("cpt"),
    "instruct_path": after("augment"),  # augment.generator_path's default; the chat vector's instruct model
    "tied_embeddings": set(),  # only checked against the checkpoint before anything runs
    "build_demo_if_missing": set(),  # the demo model, once built, is identified by its files like any other
    "demo": set(),
}
# data.<part>.path is changed through its files' contents (test_every_input_file_moves_exactly_its_stages).
DATA_READERS = {"cpt": after("augment"), "cpt_qa": after("cpt"), "sft": after("sft"), "replay": after("sft"),
                "dev_qa": after("sft"), "qa": after("augment"), "general_qa": after("eval"), "heldout": after("eval")}
# data.<part>.*_field name where a table keeps what the pipeline reads. They enter no key themselves: the records
# they select do (test_field_keys_key_the_records_they_select). A new one must be declared here.
FIELD_KEYS = {"text_field", "question_field", "answer_field", "id_field", "messages_field"}
# Top-level keys. `backend` is keyed as resolved (test_resolved_backend_and_dtype_are_keyed), `stages` and `inputs`
# have their own tests; the others say how and where a run happens, not what it computes.
TOP_LEVEL = {"seed": after("augment"), "device": set(), "cache": set(), "debug": set(), "log_examples": set(),
             "backend": None, "stages": None, "inputs": None}
# Values to change to where the generic rule (flip, +1, append) would not give a valid config.
SPECIAL = {"cpt.target_modules": "attn", "sft.target_modules": "attn", "cpt.layers": [0], "sft.layers": [0],
           "model.modules": {"attn": ["q_proj"]}, "model.chat_template": "{{ messages[0]['content'] }}",
           "model.dtype": "float32", "eval.models": ["cpt", "sft"], "export.gguf": ["q8_0"],
           "augment.strategies": {"qa": 1}}


@pytest.fixture
def setup(tiny_model, tmp_path):
    """Every input a full run can read, each its own file, with every lever that reads a file switched on."""
    d = tmp_path / "in"
    (d / "cpt").mkdir(parents=True)
    for i, text in enumerate(["北斗精機のP-101は880トン。", "炉-3は1150度。"]):
        (d / "cpt" / f"doc{i}.md").write_text(text, encoding="utf-8")
    files = {"cpt": d / "cpt", "sft": write_jsonl(d / "sft.jsonl", SFT), "qa": write_jsonl(d / "qa.jsonl", QA),
             "general_qa": write_jsonl(d / "general.jsonl", [{"id": "g1", "question": "一週間は?", "answer": "7日"}]),
             "heldout": write_jsonl(d / "heldout.jsonl", [{"body": "未学習の文書。"}]),
             "replay": write_jsonl(d / "replay.jsonl", [{"body": "再生する文書。"}]),
             "cpt_qa": write_jsonl(d / "cpt_qa.jsonl", [{"id": "c1", "question": "炉-3は?", "answer": "1150度"}]),
             "dev_qa": write_jsonl(d / "dev_qa.jsonl", [{"id": "d1", "question": "P-101は?", "answer": "880トン"}])}
    models = {name: shutil.copytree(tiny_model, tmp_path / name) for name in ("base", "instruct", "judge")}
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}", encoding="utf-8")
    prompts = shutil.copytree(ROOT / "conf" / "augment" / "prompts", tmp_path / "prompts")  # edited below
    overrides = tiny_overrides(models["base"], files, **{
        "augment.prompts_dir": prompts, "augment.generator_path": "null",  # the generator: model.instruct_path
        **{f"data.{k}.path": v for k, v in files.items()},
        "data.heldout.text_field": "body", "data.replay.text_field": "body",
        "model.instruct_path": models["instruct"], "eval.judge_path": models["judge"],
        "model.chat_template": template, "cpt.qa_mix": 0.5, "sft.replay_ratio": 0.2,
        "sft.early_stopping_patience": 2, "stages": "[" + ",".join(STAGES) + "]"})
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return cfg, files, models, template


def pretend_gpu(monkeypatch):
    """Keys as a CUDA machine computes them (dtype=auto resolves to bfloat16 there); nothing touches CUDA."""
    import torch

    import pipeline.run

    monkeypatch.setattr(pipeline.run, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.fixture
def gpu(monkeypatch):
    pretend_gpu(monkeypatch)


def keys(cfg, backend: str = "hf", stages=STAGES) -> dict:
    return {s: stage_key(s, m) for s, m in stage_materials(cfg, list(stages), backend).items()}


def changed(before: dict, after_: dict) -> set:
    return {s for s in before if before[s] != after_[s]}


def leaves(section: str):
    """(dotted key, dataclass field) of every leaf of a section's schema, nested dataclasses included."""
    def walk(prefix, schema):
        for f in fields(schema):
            t = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
            if is_dataclass(t):
                yield from walk(f"{prefix}.{f.name}", type(t))
            else:
                yield f"{prefix}.{f.name}", f
    yield from walk(section, SECTIONS[section])


def new_value(key: str, value, f):
    """A different value of the same kind: the next choice, a flipped bool, +1, a changed string or list."""
    if key in SPECIAL:
        return SPECIAL[key]
    choices = f.metadata.get("choices")
    if choices:
        return next(c for c in choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value[1:] if len(value) > 1 else value + ["<x>"]
    if value is None:
        return 3  # Optional[int] keys: seeds, max_length, max_questions
    raise AssertionError(f"{key}: no rule to change a {type(value).__name__}; add one to SPECIAL")


def with_value(cfg, key: str, value):
    out = copy.deepcopy(cfg)
    OmegaConf.update(out, key, value, merge=False)
    return out


def test_every_config_key_moves_exactly_its_stages(setup, gpu):
    cfg, _, models, _ = setup
    before = keys(cfg)
    assert set(before) == set(STAGES)
    checked = []
    for section in ("model", "data", "augment", "cpt", "merge", "chat_vector", "sft", "eval", "export", "tracking"):
        for key, f in leaves(section):
            part, name = key.split(".")[1], key.split(".")[-1]
            if section == "data" and name == "path":
                continue  # files: the next test
            if section == "data":
                assert name in FIELD_KEYS, f"{key} is a new data key: declare it in FIELD_KEYS and test it"
                continue  # the records it selects are keyed: test_field_keys_key_the_records_they_select
            if section == "model":
                assert part in MODEL_READERS, (f"{key} is a new model key: declare in MODEL_READERS which stages "
                                               f"read it, and add it to their cache keys (run.stage_materials)")
                expected = MODEL_READERS[part]
            elif section == "tracking" or f.metadata.get("runtime"):
                expected = set()  # declared runtime: how a stage runs or reports, not what it produces
            else:
                expected = after(section)
            value = OmegaConf.select(cfg, key)
            if OmegaConf.is_config(value):
                value = OmegaConf.to_container(value)
            new = shutil.copytree(models["base"], models["base"].parent / "moved") if key == "model.path" \
                else new_value(key, value, f)
            got = changed(before, keys(with_value(cfg, key, new)))
            assert got == expected, f"{key}: {value!r} -> {new!r} changed the keys of {sorted(got)}, expected " \
                                    f"{sorted(expected)}"
            checked.append(key)
    assert len(checked) >= 80  # every section's schema was walked


def test_top_level_keys(setup, monkeypatch):
    import torch

    import pipeline.run

    # which GPU a run uses is not keyed (only the dtype it resolves to): every device string resolves to the CPU here
    monkeypatch.setattr(pipeline.run, "resolve_device", lambda device: torch.device("cpu"))
    cfg, _, _, _ = setup
    before = keys(cfg)
    for key in cfg:
        if key in SECTIONS or key == "data":
            continue
        assert key in TOP_LEVEL, f"top-level key {key} is new: declare in TOP_LEVEL which stage keys it enters"
        expected = TOP_LEVEL[key]
        if expected is None:
            continue
        new = {"seed": 43, "device": "cuda:1", "cache": {"enabled": True, "dir": "/elsewhere"}, "debug": True,
               "log_examples": True}[key]
        got = changed(before, keys(with_value(cfg, key, new)))
        assert got == expected, f"{key} changed {sorted(got)}, expected {sorted(expected)}"


def test_resolved_backend_and_dtype_are_keyed(setup, monkeypatch):
    """The key holds what ran: unsloth's kernels give other numbers than the plain path, and dtype=auto is keyed as
    the dtype it resolves to: float32 on a CPU (where a bfloat16 request also trains in float32), bfloat16 on a GPU."""
    cfg, _, _, _ = setup
    before = keys(cfg)
    assert changed(before, keys(cfg, backend="unsloth")) == after("cpt")
    for dtype in ("float32", "bfloat16"):
        assert changed(before, keys(with_value(cfg, "model.dtype", dtype))) == set()
    pretend_gpu(monkeypatch)
    assert changed(before, keys(cfg)) == after("augment")
    assert keys(cfg) == keys(with_value(cfg, "model.dtype", "bfloat16"))
    assert changed(before, keys(with_value(cfg, "model.dtype", "float32"))) == set()


def same_size_edit(data: bytes) -> bytes:
    """The last digit changed (880 -> 881), else the last ASCII letter, else the last byte: the file keeps its name
    and size, so a fingerprint of names and sizes would not see the change."""
    for i in range(len(data) - 1, -1, -1):
        if data[i:i + 1].isdigit():
            return data[:i] + str((int(data[i:i + 1]) + 1) % 10).encode() + data[i + 1:]
    for i in range(len(data) - 1, -1, -1):
        if data[i:i + 1].isalpha():
            return data[:i] + (b"b" if data[i:i + 1] == b"a" else b"a") + data[i + 1:]
    return data[:-1] + bytes([(data[-1] + 1) % 256])


def test_every_input_file_moves_exactly_its_stages(setup):
    """Every file of every input (each corpus document, each file of each model directory, the template), edited
    in place: a model's files and the template without changing their size, a data file in one record's text."""
    cfg, files, models, template = setup
    edits = {f"data.{part}": (files[part], readers) for part, readers in DATA_READERS.items()}
    edits.update({"model.path files": (models["base"], after("cpt")),
                  "model.instruct_path files": (models["instruct"], after("augment")),
                  "augment prompt template": (Path(cfg.augment.prompts_dir) / "ja" / "qa.txt", after("augment")),
                  "eval.judge_path files": (models["judge"], after("eval")),
                  "model.chat_template file": (template, after("chat_vector"))})
    assert set(DATA_READERS) == {f.name for f in fields(SECTIONS["data"])}, "a new data part: declare its readers"
    edited = 0
    for what, (path, expected) in edits.items():
        for target in sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]:
            before = keys(cfg)  # a model is identified by its files' sizes and times: a restored file is a new file
            original = target.read_bytes()
            if what.startswith("data."):  # data is keyed by its records: one record's text changes, still valid
                target.write_bytes(original.replace(b'"}', b'x"}', 1) if target.suffix == ".jsonl"
                                   else original + b"x")
            else:
                target.write_bytes(same_size_edit(original))
                assert target.stat().st_size == len(original)
            try:
                got = changed(before, keys(cfg))
            finally:
                target.write_bytes(original)
            assert got == expected, f"editing {what} ({target.name}) changed {sorted(got)}, expected {sorted(expected)}"
            edited += 1
    assert edited >= len(edits) + 2 * 3  # each model directory has its weights, config and tokenizer files
    # a new document in the corpus is new data too
    before = keys(cfg)
    (files["cpt"] / "doc9.md").write_text("追加の文書。", encoding="utf-8")
    assert changed(before, keys(cfg)) == after("augment")


def test_data_is_keyed_by_content_not_location(setup, tmp_path):
    """The same files copied elsewhere (another checkout, another mount) reuse every cached stage."""
    cfg, files, _, _ = setup
    before = keys(cfg)
    moved = copy.deepcopy(cfg)
    for part, path in files.items():
        dest = tmp_path / "copy" / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, dest)
        else:
            shutil.copyfile(path, dest)
        OmegaConf.update(moved, f"data.{part}.path", str(dest))
    assert keys(moved) == before


def test_levers_off_do_not_key_their_files(setup):
    """With cpt.qa_mix / sft.replay_ratio / sft.early_stopping_patience at 0 their files are not read, so a change
    to them must not rebuild anything (and the key must not depend on a file the stage never opens)."""
    cfg, files, _, _ = setup
    off = with_value(with_value(with_value(cfg, "cpt.qa_mix", 0.0), "sft.replay_ratio", 0.0),
                     "sft.early_stopping_patience", 0)
    before = keys(off)
    for part in ("cpt_qa", "replay", "dev_qa"):
        original = files[part].read_text(encoding="utf-8")
        files[part].write_text(original + "\n", encoding="utf-8")
        assert keys(off) == before, part
        files[part].write_text(original, encoding="utf-8")


def test_a_stage_run_alone_from_cached_inputs_gets_the_chained_key(setup, tmp_path):
    """stages=[sft,eval] inputs.cpt_model=<a cached merge output> is the same SFT as the chained run's, so it is
    reused; a prefix of the chain has the same keys as the full chain."""
    cfg, _, _, _ = setup
    full = keys(cfg)
    assert keys(cfg, stages=["augment", "cpt", "merge"]) == {s: full[s] for s in ("augment", "cpt", "merge")}
    augmented = Path(cfg.cache.dir) / "augment" / full["augment"]  # CPT from an earlier run's augment output
    augmented.mkdir(parents=True)
    (augmented / ".complete").write_text("")
    cached = Path(cfg.cache.dir) / "merge" / full["merge"]  # what a run directory's cpt_model link points at
    cached.mkdir(parents=True)
    (cached / ".complete").write_text("")
    (Path(cfg.cache.dir) / ".pipeline-cache").write_text("")
    later = with_value(cfg, "inputs.cpt_model", str(cached))
    assert keys(with_value(cfg, "inputs.augmented", str(augmented)), stages=["cpt", "merge"]) == {
        s: full[s] for s in ("cpt", "merge")}
    no_cv = keys(cfg, stages=["augment", "cpt", "merge", "sft", "eval"])
    assert keys(later, stages=["sft", "eval"]) == {s: no_cv[s] for s in ("sft", "eval")}


def test_gguf_converter_is_keyed_by_content_not_location(setup, tmp_path):
    """export.gguf's files come from llama.cpp's converter: a changed converter rebuilds the export (only), the same
    converter elsewhere (export.llama_cpp is runtime) reuses it."""
    cfg, _, _, _ = setup
    converter = tmp_path / "llama.cpp"
    (converter / "gguf-py" / "gguf").mkdir(parents=True)
    (converter / "convert_hf_to_gguf.py").write_text("# v1\n")
    cfg = with_value(with_value(cfg, "export.gguf", ["f16"]), "export.llama_cpp", str(converter))
    before = keys(cfg)
    moved = shutil.copytree(converter, tmp_path / "elsewhere")
    assert keys(with_value(cfg, "export.llama_cpp", str(moved))) == before
    (converter / "convert_hf_to_gguf.py").write_text("# v2\n")
    assert changed(before, keys(cfg)) == {"export"}


def test_field_keys_key_the_records_they_select(setup, tmp_path):
    """Tables whose columns are named otherwise, with the data.<part>.*_field keys naming them, hold the same records:
    every key stays. A field key pointed at a column with other text is other data."""
    cfg, _, _, _ = setup
    before = keys(cfg)
    d = tmp_path / "renamed"
    d.mkdir()
    heldout = write_jsonl(d / "heldout.jsonl", [{"本文": "未学習の文書。", "body": "別の文書。"}])
    qa = write_jsonl(d / "qa.jsonl", [{"qid": q["id"], "q": q["question"], "a": q["answer"],
                                       **{k: v for k, v in q.items() if k == "aliases"}} for q in QA])
    sft = write_jsonl(d / "sft.jsonl", [{"dialog": r["messages"]} if "messages" in r else r for r in SFT])
    renamed = cfg
    for key, value in {"data.heldout.path": heldout, "data.heldout.text_field": "本文", "data.qa.path": qa,
                       "data.qa.question_field": "q", "data.qa.answer_field": "a", "data.qa.id_field": "qid",
                       "data.sft.path": sft, "data.sft.messages_field": "dialog"}.items():
        renamed = with_value(renamed, key, str(value))
    assert keys(renamed) == before
    assert changed(before, keys(with_value(renamed, "data.heldout.text_field", "body"))) == after("eval")
