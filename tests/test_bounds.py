"""Every range declared in pipeline/core/config.py is enforced: one case per declared bound, generated from the
dataclasses, just outside it (the boundary itself for > and <, one step beyond for >= and <=, a word that is not a
choice), run through run.validate, the function `python -m pipeline.run` checks a config with. Nothing is loaded:
the ranges are the first thing validate checks. A new key with a declared range gets its case by itself."""

from __future__ import annotations

import copy
import typing
from dataclasses import fields, is_dataclass

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import tiny_overrides
from test_cache_keys import ROOT
from pipeline.core.config import SECTIONS
from pipeline.core.outputs import PipelineError

WORDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _number_type(schema, f) -> type:
    hint = typing.get_type_hints(schema)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]  # Optional[int] -> int
    return args[0] if args else hint


def declared_bounds():
    """(dotted key, the value just outside one declared bound, the one line validate must print)."""
    def walk(prefix, schema):
        for f in fields(schema):
            default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
            name, m = f"{prefix}.{f.name}", f.metadata
            if is_dataclass(default):
                yield from walk(name, type(default))
                continue
            doc = f" ({m['doc']})" if m.get("doc") else ""
            kind = _number_type(schema, f)
            for bound, word in WORDS.items():
                if bound not in m:
                    continue
                b = m[bound]
                step = 1 if kind is int else 0.5
                value = kind(b - step if bound == "ge" else b + step if bound == "le" else b)
                yield name, value, f"{name}={value}: must be {word} {b:g}{doc}"
            if "choices" in m:
                yield name, "no_such_choice", f"{name}='no_such_choice': use one of {', '.join(map(str, m['choices']))}"
    for section, schema in SECTIONS.items():
        yield from walk(section, schema)


CASES = list(declared_bounds())


@pytest.fixture(scope="module")
def composed(tiny_model, data_files):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=tiny_overrides(tiny_model, data_files))


@pytest.mark.parametrize("key, value, line", CASES, ids=[f"{k}={v}" for k, v, _ in CASES])
def test_every_declared_bound_is_enforced(key, value, line, composed):
    from pipeline.run import validate

    cfg = copy.deepcopy(composed)
    OmegaConf.update(cfg, key, value, merge=False)
    with pytest.raises(PipelineError) as refused:
        validate(cfg, ["cpt", "merge", "sft", "eval"])
    assert str(refused.value) == line


def test_the_generated_cases_cover_the_sections():
    """The generator finds the declared ranges (a broken walk would generate nothing and pass)."""
    keys = {k for k, _, _ in CASES}
    assert {"cpt.qa_mix", "cpt.r", "sft.lora_dropout", "merge.save_dtype", "model.demo.vocab_size",
            "eval.min_logprob_gain", "tracking.backend", "chat_vector.ratio"} <= keys
    assert ("cpt.qa_mix", 1.5, "cpt.qa_mix=1.5: must be <= 1 (share of data.cpt_qa.path's pairs mixed into CPT)") \
        in CASES
    assert len(CASES) >= 60
