"""The README, the docs/ pages and the example configs stay in step with the code: their commands run as written,
their links resolve, and the configuration reference is what the config classes say."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, make_image_folder, run_here

from utp_dist.config import load_config
from utp_dist.sweep.grid import load_grid
from utp_dist.sweep.resources import Resources, load_resources

# the front page first, then the pages in name order: the order their marked commands run in
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def page(name: str) -> str:
    return (REPO / name).read_text()


def test_configuration_reference_is_generated_from_the_config_classes():
    """docs/configuration.md's key table is written by scripts/gen_config_docs.py from the field docstrings of config.py."""
    generator = runpy.run_path(str(REPO / "scripts" / "gen_config_docs.py"))
    current = page("docs/configuration.md")
    assert generator["render"](current) == current, (
        f"docs/configuration.md is out of date with utp_dist/config.py; run: {generator['COMMAND']}"
    )


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    load_config(path)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_example_grids_and_profiles_are_valid(path):
    grid = load_grid(path)
    assert grid.tasks
    for profile in (REPO / "slurm" / "profiles").glob("*.yaml"):
        load_resources(profile, grid.resources, str(path))


def test_docs_document_every_profile_key():
    sweeps = page("docs/sweeps.md")
    for field in dataclasses.fields(Resources):
        assert f"`{field.name}`" in sweeps, f"docs/sweeps.md lacks the profile key {field.name}"


def test_readme_commands_exist():
    readme = page("README.md")
    assert 'pip install -e ".[test]" && python -m utp_dist.train configs/quickstart.yaml' in readme
    assert "bash tests/run.sh" in readme and "bash tests/run.sh" in (REPO / ".ci" / "run").read_text()
    assert 'pip install "utp_dist[dashboard]"' in readme
    distributed = page("docs/distributed.md")
    for name in ("1gpu.yaml", "1node_multi_gpu.yaml", "multi_node.yaml"):
        assert (REPO / "launch" / name).is_file() and f"launch/{name}" in distributed


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    prose = re.sub(r"```.*?```", "", text, flags=re.S)  # a "# comment" in a code block is no heading
    return {_slug(m.group(1).replace("`", "")) for m in re.finditer(r"^#+ (.+)$", prose, re.M)}


def test_docs_links_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists, and a heading there when it has #anchor."""
    broken = []
    for source in PAGES:
        prose = re.sub(r"```.*?```", "", source.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (source.parent / path).resolve() if path else source
            name = f"{source.relative_to(REPO)}: ({target})"
            if not file.exists():
                broken.append(f"{name}: no file {path}")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
                broken.append(f"{name}: no heading #{anchor} in {file.relative_to(REPO)}")
    assert not broken, "\n".join(broken)


def test_worked_example_runs(tmp_path):
    """docs/extending.md's worked example: its two files and its command, as written, on a my_data/ listed by labels.csv."""
    section = page("docs/extending.md").split("## Worked example")[1].split("\n## ")[0]
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


def marked_commands() -> list[str]:
    """Every command in the code blocks of README.md and docs/*.md marked `<!-- run by tests/test_docs.py ... -->`."""
    blocks = [block for p in PAGES for block in re.findall(r"<!-- run by tests/test_docs\.py[^>]*-->\n```\n(.*?)```", p.read_text(), re.S)]
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_marked_commands_run(tmp_path, monkeypatch):
    from utp_dist.data.loaders import resolve_root

    commands = marked_commands()
    assert [c.split()[2] if c.split()[1] == "-m" else c.split()[1] for c in commands] == [
        "benchmarks/index_1m.py", "utp_dist.data", "utp_dist.submit", "utp_dist.submit", "utp_dist.predict", "utp_dist.evaluate",
    ]  # fmt: skip
    for folder in ("configs", "benchmarks"):  # the commands name repository paths, relative to a working folder of their own
        (tmp_path / folder).symlink_to(REPO / folder)
    # what the predict and evaluate commands follow: the quickstart, cut short, and a few images
    monkeypatch.chdir(tmp_path)
    quickstart = run_here("configs/quickstart.yaml", "train.epochs=1", "train.max_steps=3")
    assert quickstart.returncode == 0, quickstart.stderr[-3000:]
    (tmp_path / "photos").mkdir()
    for folder in sorted((resolve_root("builtin:fashion-mnist-mini") / "test").iterdir())[:3]:
        shutil.copy(min(folder.iterdir()), tmp_path / "photos" / f"{folder.name}.png")
    for command in commands:
        argv = shlex.split(command)
        if argv[1] == "-m":  # `python -m MODULE ARGS`: MODULE's entry point with ARGS, in this process (no torch import each)
            result = run_here(*argv[3:], module="utp_dist.data.__main__" if argv[2] == "utp_dist.data" else argv[2])
        else:  # a script: a process of its own; a million files is for the record, not for every test run
            argv += ["--classes", "4", "--per-class", "50", "--repeat", "1"] if argv[1] == "benchmarks/index_1m.py" else []
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            result = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert len((tmp_path / "preds.csv").read_text().splitlines()) == 4
    assert next(tmp_path.glob("experiments/logs/fashion-mnist-mini/*/evaluations/*/report.json")).is_file()


def test_example_experiments_file_is_valid():
    grid = load_grid(REPO / "configs" / "sweeps" / "experiments.py")
    assert [t.name for t in grid.tasks] == [
        "resnet__cross_entropy__scratch__lr=0.001",
        "resnet__cross_entropy__scratch__lr=0.003",
        "vit__cross_entropy__scratch__lr=0.003",
    ]
