"""Every shipped config composes and type-checks (lightning-hydra-template style)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.config import SECTIONS, typed

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "data", "cpt", "merge", "sft", "eval"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"{group}={option}"])
    if group == "model" and OmegaConf.is_missing(cfg.model, "path"):  # family configs: the path is the user's
        from pipeline.common import PipelineError

        with pytest.raises(PipelineError, match=r"config key model.path: Missing mandatory value"):
            typed(cfg, "model")
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[f"{group}={option}", "model.path=/models/x"])
    for section in SECTIONS:
        typed(cfg, section)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={experiment}"])
    for section in SECTIONS:
        typed(cfg, section)


def test_yaml_keys_match_dataclasses():
    """The YAML files document exactly the fields the code reads: no stale or undocumented keys."""
    from dataclasses import fields

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config")
    for section, schema in SECTIONS.items():
        assert set(cfg[section].keys()) == {f.name for f in fields(schema)}, section


def test_wrong_type_names_the_key():
    from pipeline.common import PipelineError

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["cpt.r=many"])
    with pytest.raises(PipelineError, match=r"config key cpt\.r: Value 'many'"):
        typed(cfg, "cpt")
