"""The README and the example configs stay in step with the config tree."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import REPO

from utp_dist.config import Config, load_config
from utp_dist.sweep.grid import load_grid
from utp_dist.sweep.resources import Resources, load_resources


def test_readme_documents_every_config_key():
    readme = (REPO / "README.md").read_text()
    for section in dataclasses.fields(Config):
        for field in dataclasses.fields(section.type if isinstance(section.type, type) else type(getattr(Config(), section.name))):
            assert f"`{section.name}.{field.name}`" in readme, f"README lacks {section.name}.{field.name}"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    load_config(path)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_example_grids_and_profiles_are_valid(path):
    grid = load_grid(path)
    assert grid.tasks
    for profile in (REPO / "slurm" / "profiles").glob("*.yaml"):
        load_resources(profile, grid.resources, str(path))


def test_readme_documents_every_profile_key():
    readme = (REPO / "README.md").read_text()
    for field in dataclasses.fields(Resources):
        assert f"`{field.name}`" in readme, f"README lacks the profile key {field.name}"


def test_readme_commands_exist():
    readme = (REPO / "README.md").read_text()
    assert 'pip install -e ".[test]" && python -m utp_dist.train configs/quickstart.yaml' in readme
    assert "bash tests/run.sh" in readme and "bash tests/run.sh" in (REPO / ".ci" / "run").read_text()
    for name in ("1gpu.yaml", "1node_multi_gpu.yaml", "multi_node.yaml"):
        assert (REPO / "launch" / name).is_file() and f"launch/{name}" in readme
