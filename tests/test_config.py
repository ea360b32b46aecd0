"""Config composition: helpful errors, one resolved config whichever way overrides arrive, and
every shipped experiment, model and dataset composing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from snakemake.cli import parse_config

from gradspec.config import ConfigError, compose, config_dir, overrides_from_mapping, to_yaml

BIN = Path(sys.executable).parent


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as error:
        compose(["data.limmit=2"])
    message = str(error.value)
    assert "data.limmit" in message
    for key in ("path", "file", "limit", "offset"):
        assert key in message


def test_unknown_top_level_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="results_dir"):
        compose(["resultsdir=x"])


def test_unknown_group_option_lists_options():
    with pytest.raises(ConfigError) as error:
        compose(["model=no_such_model"])
    message = str(error.value)
    assert "no_such_model" in message
    assert "smollm2_135m_instruct" in message and "gemma3_270m" in message


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (["data={limit: 2}"], ["data.limit=2"]),
        (["data={limit: 2, offset: 1}", "seed=3"], ["data.limit=2", "data.offset=1", "seed=3"]),
        (["prompt={template: base}"], ["prompt.template=base"]),
        (["extract={modules: [q_proj, v_proj]}"], ["extract.modules=[q_proj,v_proj]"]),
        (["output="], ["output=null"]),
    ],
)
def test_snakemake_config_becomes_hydra_overrides(entries, expected):
    assert overrides_from_mapping(parse_config(entries)) == expected


def test_command_line_and_snakemake_config_resolve_alike():
    cli = subprocess.run(
        [
            str(BIN / "gradspec"),
            "extract",
            "--print-config",
            "data.limit=2",
            "prompt.template=base",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    mapping = parse_config(["experiment=quickstart", "data={limit: 2}", "prompt={template: base}"])
    experiment = mapping.pop("experiment")
    workflow = compose([f"experiment={experiment}", *overrides_from_mapping(mapping)])
    assert OmegaConf.create(cli) == OmegaConf.create(to_yaml(workflow))
    assert workflow.data.limit == 2 and workflow.prompt.template == "base"


def test_later_override_wins():
    # Each job puts its own keys after the user's, so a rule's value is the one that holds.
    assert compose(["data.file=a", "data.file=b"]).data.file == "b"


@pytest.mark.parametrize(
    ("group", "name"),
    sorted(
        (path.parent.name, path.stem)
        for path in config_dir().glob("*/*.yaml")
        if path.parent.name in ("experiment", "model", "dataset")
    ),
)
def test_every_group_option_composes(group, name):
    cfg = compose([f"{group}={name}"])
    assert cfg[group].name == name
    if group == "experiment":
        for model in cfg.experiment.models:
            assert compose([f"model={model}"]).model.name == model
        for dataset in cfg.experiment.datasets:
            assert compose([f"dataset={dataset}"]).dataset.files
