"""Refused before any training, in seconds, what used to be found out late: a tracking store that cannot be written
(found after all the training, as a warning) and, in a fresh clone, a demo setting that does not fit the demo model
(found after the 5-8 minute build of that model). Same harness as tests/test_validation.py: one line, exit 2, no
model loaded, nothing published."""

from __future__ import annotations

import re
import sqlite3

import pytest

from conftest import tiny_overrides
from test_validation import _compose, _published, _write
from pipeline.run import run_and_report


@pytest.fixture
def nothing_loads(monkeypatch):
    """Neither a checkpoint nor the demo model's build may start before the refusal."""
    import transformers

    import pipeline.demo_model

    def refuse(*a, **k):
        raise AssertionError("a model was loaded or built before validation finished")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(pipeline.demo_model, "ensure_demo_model", refuse)
    monkeypatch.setattr(pipeline.demo_model, "build_demo_model", refuse)


def _refused(overrides: dict, tiny_model, data_files, tmp_path, capsys) -> str:
    cache = tmp_path / "cache"
    cfg = _compose(tiny_overrides(tiny_model, data_files, **{"cache.dir": cache, **overrides}))
    status = run_and_report(cfg, tmp_path / "run")
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert _published(cache) == []
    return err[0][len("error: "):]


def tracking_cases(tmp):
    not_db = _write(tmp / "notes.db", "these are my notes, not a database\n")
    return {
        "store under a file": (f"sqlite:///{_write(tmp / 'a_file', 'x')}/mlflow.db",
                               r"^tracking\.uri=sqlite:///.*a_file/mlflow\.db: cannot write the store there \(.*a_file "
                               r"is a file\); set tracking\.uri to a writable location or tracking=none$"),
        "store is not a database": (f"sqlite:///{not_db}",
                                    r"^tracking\.uri=sqlite:///.*notes\.db: .*notes\.db is not an SQLite database "
                                    r"\(file is not a database\); point tracking\.uri at a new file or an MLflow "
                                    r"store$"),
        "store is a directory": (f"sqlite:///{(tmp / 'dir.db').mkdir() or tmp / 'dir.db'}",
                                 r"^tracking\.uri=sqlite:///.*dir\.db: .*dir\.db is not a file"),
        "directory store under a file": (f"{tmp / 'a_file'}/mlruns",
                                         r"^tracking\.uri=.*a_file/mlruns: cannot write the store there"),
    }


@pytest.mark.parametrize("case", ["store under a file", "store is not a database", "store is a directory",
                                  "directory store under a file"])
def test_an_unwritable_tracking_store_is_refused_before_training(case, tiny_model, data_files, tmp_path, capsys,
                                                                  nothing_loads):
    uri, pattern = tracking_cases(tmp_path)[case]
    line = _refused({"tracking": "mlflow", "tracking.uri": f"'{uri}'"}, tiny_model, data_files, tmp_path, capsys)
    assert re.search(pattern, line), line


def test_a_writable_store_passes(tmp_path):
    """A store that does not exist yet (its directories neither) and an existing MLflow-style SQLite file pass."""
    from pipeline.core.tracking import check_store

    check_store(f"sqlite:///{tmp_path}/new/dirs/mlflow.db")
    check_store(f"{tmp_path}/mlruns")
    with sqlite3.connect(tmp_path / "old.db") as con:
        con.execute("create table t (x)")
    check_store(f"sqlite:///{tmp_path}/old.db")
    _write(tmp_path / "empty.db", "")  # sqlite3 creates the file empty before the first table
    check_store(f"sqlite:///{tmp_path}/empty.db")


# the demo's model path, relative to the directory the command runs in (here a fresh one); the demo recipe's
# general-knowledge and held-out files are relative too, and not what this test is about
DEMO = {"model.path": "outputs/demo_base_model", "model.build_demo_if_missing": "true",
        "data.general_qa.path": "null", "data.heldout.path": "null"}


@pytest.mark.parametrize("overrides, pattern", [
    ({"cpt.target_modules": "[no_such_proj]"},
     r"^cpt\.target_modules: module 'no_such_proj' does not exist in this llama model; available: down_proj, "
     r"gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj, embed_tokens, lm_head$"),
    ({"sft.target_modules": "nonsense"}, r"^sft\.target_modules='nonsense': unknown preset"),
    ({"sft.layers": "[4]"}, r"^sft\.layers: layer index 4 is out of range; this model has num_hidden_layers=4 "),
    ({"model.demo.num_layers": 2, "cpt.layers": "2-3"}, r"^cpt\.layers: layer index 2 is out of range; this model "
                                                        r"has num_hidden_layers=2"),
    ({"model.demo.num_heads": 3}, r"^model\.demo\.hidden_size=256: not a multiple of model\.demo\.num_heads=3$"),
    ({"sft.max_length": 4096}, r"^sft\.max_length=4096: longer than the demo model's 2048 positions"),
], ids=["cpt module", "sft preset", "sft layer", "layers of a smaller demo", "heads", "sft length"])
def test_a_demo_typo_is_refused_before_the_demo_model_is_built(overrides, pattern, tiny_model, data_files, tmp_path,
                                                               capsys, monkeypatch, nothing_loads):
    """A fresh clone (no outputs/demo_base_model yet): the demo model's shapes come from model.demo."""
    monkeypatch.chdir(tmp_path)
    line = _refused({**DEMO, **overrides}, tiny_model, data_files, tmp_path, capsys)
    assert re.search(pattern, line), line
    assert not (tmp_path / "outputs" / "demo_base_model").exists()


def test_the_demo_config_is_the_built_model_config():
    """What validation checks against is what the build constructs (demo_config serves both)."""
    from pipeline.core.config import DemoBuildConfig
    from pipeline.core.modules import decoder_layers
    from pipeline.demo_model import demo_meta_model

    cfg = DemoBuildConfig()
    meta = demo_meta_model(cfg, 128)
    assert decoder_layers(meta) == ("layers", cfg.num_layers)
    assert meta.config.hidden_size == cfg.hidden_size and meta.config.intermediate_size == cfg.intermediate_size
    assert meta.model.layers[0].mlp.up_proj.weight.shape == (cfg.intermediate_size, cfg.hidden_size)
    assert not meta.config.tie_word_embeddings
