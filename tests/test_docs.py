"""The README and the example configs stay in step with the config tree."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, make_image_folder

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


def test_readme_worked_example_runs(tmp_path):
    """The Extension points example: its two files and its command, as written, on a my_data/ listed by labels.csv."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Worked example")[1].split("\n## ")[0]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, re.S)
    for _, text in blocks:
        name = text.splitlines()[0].removeprefix("# ")
        if name.endswith((".py", ".yaml")):
            (tmp_path / name).write_text(text)
    (command,) = [text.strip() for lang, text in blocks if not lang and "python -m utp_dist.train" in text]
    data = make_image_folder(tmp_path / "my_data")
    rows = [f"{p.parts[-3]},{p.relative_to(data)},{p.parent.name}" for p in sorted(data.rglob("*.*"))]
    (data / "labels.csv").write_text("split,file,label\n" + "\n".join(rows) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for cmd in (command, f"{sys.executable} run_experiment.py"):
        proc = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "experiments" / "logs" / "my_data").glob("*/summary.json"))]
    assert len(summaries) == 2 and all("test_precision_macro" in s["test"] for s in summaries)
