"""Every shipped config composes and type-checks (lightning-hydra-template style), and the YAML defaults are the
dataclasses' defaults: one set of defaults, written twice only so that each config file can say why."""

from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.core.outputs import PipelineError
from pipeline.core.config import SECTIONS, CptConfig, SftConfig, check_ranges, typed

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "data", "augment", "cpt", "merge", "sft", "eval"]
# What a user of a real checkpoint must give (conf/data/own.yaml and the family configs say so with ???).
USER_KEYS = ["model.path=/models/x", "data.cpt.path=/d/docs", "data.sft.path=/d/sft.jsonl",
             "data.qa.path=/d/qa.jsonl"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    cfg = composed(f"{group}={option}")
    if group == "model" and OmegaConf.is_missing(cfg.model, "path"):  # family configs: the path is the user's
        with pytest.raises(PipelineError, match=r"config key model.path: Missing mandatory value"):
            typed(cfg, "model")
    if (group, option) not in (("model", "demo"),) and group in ("model", "data"):  # no recipe: the user's data
        cfg = composed(f"{group}={option}", *(USER_KEYS if OmegaConf.is_missing(cfg.model, "path") else USER_KEYS[1:]))
    for section in SECTIONS:
        check_ranges(typed(cfg, section), section)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    cfg = composed(f"+experiment={experiment}")
    for section in SECTIONS:
        check_ranges(typed(cfg, section), section)


def test_no_shipped_dev_set_asks_about_the_scored_facts():
    """Early stopping chooses its checkpoint on data.dev_qa: a shipped experiment or lever whose dev set asks about
    the demo's scored facts would select on the test answers (lever_search once read the qa_mix pairs, 63 faq facts
    with their gold answers). The fact-level check is the one runs report as leak/dev_qa_shared_facts."""
    from pipeline.core.data import load_qa
    from pipeline.core.mixing import shared_facts

    root, checked = CONF.parent, []
    for config in [f"+experiment={e}" for e in options("experiment")] + [f"+lever={x}" for x in options("lever")]:
        cfg = composed(config)
        if cfg.data.dev_qa.path:
            shared = shared_facts(load_qa(str(root / cfg.data.dev_qa.path)), load_qa(str(root / cfg.data.qa.path)))
            assert shared == [], f"{config}: {cfg.data.dev_qa.path} asks about {len(shared)} scored facts"
            checked.append(config)
    assert {"+experiment=lever_search", "+lever=early_stop"} <= set(checked)


@pytest.mark.parametrize("preset", options("hardware"))
def test_every_hardware_preset_composes(preset):
    cfg = composed("model=llm_jp_3", f"+hardware={preset}", *USER_KEYS)
    for section in SECTIONS:
        check_ranges(typed(cfg, section), section)


def test_yaml_keys_match_dataclasses():
    """The YAML files document exactly the fields the code reads: no stale or undocumented keys."""
    cfg = composed()
    for section, schema in SECTIONS.items():
        assert set(cfg[section].keys()) == {f.name for f in fields(schema)}, section


def _defaults(schema, node, prefix=""):
    """(key, dataclass default, YAML value) for every field whose default the YAML restates."""
    for f in fields(schema):
        value = node[f.name]
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            continue
        if is_dataclass(default):
            yield from _defaults(type(default), value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", default, OmegaConf.to_object(value) if OmegaConf.is_config(value) else value


def test_yaml_defaults_are_the_dataclass_defaults():
    """A real checkpoint's run (no recipe) composes exactly the dataclass defaults: they cannot drift apart."""
    cfg = composed("model=llm_jp_3", *USER_KEYS)
    for section in ("augment", "cpt", "sft", "merge", "eval"):
        for name, default, yaml_value in _defaults(SECTIONS[section], cfg[section]):
            assert yaml_value == default, f"{section}.{name}: YAML {yaml_value!r} vs dataclass {default!r}"


def test_real_checkpoint_defaults_are_not_the_demos():
    """model=demo gets the demo's aggressive recipe; every other model the defaults written for 1-13B checkpoints."""
    real, demo = composed("model=llm_jp_3", *USER_KEYS), composed()
    assert real.cpt.learning_rate <= 1e-4 and real.cpt.num_epochs <= 3 and real.sft.learning_rate <= 2e-4
    assert real.cpt.target_modules == "attn_mlp"  # embeddings in full cost 10 GB on llm-jp-3-3.7b: opt-in
    assert demo.cpt.learning_rate == 2e-3 and demo.cpt.num_epochs == 60 and demo.sft.learning_rate == 1e-3
    assert real.cpt.learning_rate == CptConfig().learning_rate and real.sft.learning_rate == SftConfig().learning_rate


def test_no_demo_file_in_a_user_run():
    """The demo's evaluation files belong to the demo recipe: a user's run composes none of them."""
    real = composed("model=llm_jp_3", *USER_KEYS)
    assert real.data.general_qa.path is None and real.data.heldout.path is None
    assert [real.data[k].path for k in ("cpt", "sft", "qa")] == ["/d/docs", "/d/sft.jsonl", "/d/qa.jsonl"]
    unset = typed(composed("model=llm_jp_3", "model.path=/m"), "data")  # needed only by the stages that read them
    assert unset.cpt.path is None and unset.qa.path is None
    from pipeline.core.data import load_qa

    with pytest.raises(PipelineError, match=r"^config key data.qa.path: Missing mandatory value; set it on the "
                                            r"command line \(data.qa.path=...\)"):
        load_qa(unset.qa.path)


def test_wrong_type_names_the_key():
    with pytest.raises(PipelineError, match=r"config key cpt\.r: Value 'many'"):
        typed(composed("cpt.r=many"), "cpt")
