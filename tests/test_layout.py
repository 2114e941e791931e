"""The package's shape: no import cycle between its files or its wings, one `utp` command over the `python -m` entry points,
and only the store names the files inside a run folder."""

from __future__ import annotations

import ast
import importlib
import os
import re
import runpy
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from utp_dist import cli
from utp_dist.store import run_dir

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "utp_dist"
WINGS = ("dashboard", "sweep", "agent", "data", "store")
# `utp X` -> the module `python -m` runs for X (a package runs its __main__)
DASH_M = {name: f"utp_dist.{name}" for name in cli.COMMANDS}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the utp_dist modules it imports, at module level or inside functions (not under `if TYPE_CHECKING:`,
    which never runs); `from pkg import name` points at pkg.name when that is a module, else at pkg."""
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        type_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
            for statement in block.body
            for node in ast.walk(statement)
        }
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package this file is in, `level - 1` packages up
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # an attribute of a module: the module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _describe(cycles: list[list[str]], graph: dict[str, set[str]]) -> str:
    """Each cycle with the imports that close it, so the failure says which lines to move."""
    lines = []
    for members in cycles:
        inside = set(members)
        arrows = [f"{a} -> {b}" for a in members for b in sorted(graph[a]) if b in inside]
        lines.append(f"cycle {members}: " + "; ".join(arrows))
    return "\n".join(lines)


def _wing(module: str) -> str:
    """A wing's modules are one node; a top-level file is its own node: the top level holds both the core every wing
    uses (config, errors, registry) and the loop and entry points that use the wings, so lumping it would be a cycle
    by construction, not by any import worth moving."""
    parts = module.split(".")
    return f"utp_dist.{parts[1]}/" if len(parts) > 1 and parts[1] in WINGS else module


def test_no_import_cycle_between_modules_or_packages():
    graph = _import_graph()
    assert len(graph) > 50 and "utp_dist.store.run_dir" in graph["utp_dist.trainer"] | graph["utp_dist.store.checkpoint"]
    file_cycles = _cycles(graph)
    assert not file_cycles, "import cycles between files:\n" + _describe(file_cycles, graph)

    wings: dict[str, set[str]] = {}
    for module, targets in graph.items():
        wings.setdefault(_wing(module), set()).update(_wing(t) for t in targets if _wing(t) != _wing(module))
    assert {f"utp_dist.{wing}/" for wing in WINGS} <= set(wings)
    wing_cycles = _cycles(wings)
    assert not wing_cycles, "import cycles between packages (a wing is one node):\n" + _describe(wing_cycles, wings)
    # `from utp_dist import train` is the function only while nothing imports the module utp_dist.train, which exists
    # for `python -m utp_dist.train` alone (importing it sets the package attribute `train` to the module)
    assert not [module for module, targets in graph.items() if "utp_dist.train" in targets]


def test_utp_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert list(listed) == ["train", "submit", "dashboard", "agent", "predict", "evaluate", "bench", "data"]
    assert all(len(line.split()) > 3 for line in listed.values())  # each with its one line

    assert cli.main(["trian", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'trian'" in err
    assert "train, submit, dashboard, agent, predict, evaluate, bench, data" in err
    assert cli.main([]) == 2 and "commands:" in capsys.readouterr().err

    # the console script itself, from the installed entry point: pyproject declares it, `pip install -e .` writes it
    assert 'utp = "utp_dist.cli:main"' in (REPO / "pyproject.toml").read_text()
    script = shutil.which("utp", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if script is None:
        pytest.skip("no `utp` script on PATH: `pip install -e .` installs it")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run([script, "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == cli.usage()
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "utp_dist.cli" in imported and not {m for m in imported if m.split(".")[0] == "torch"}  # --help stays fast


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_command_runs_the_same_main_as_its_python_m_form(name, capsys, monkeypatch):
    home = importlib.import_module(cli.COMMANDS[name][0])
    helps = [[name, "--help"]] if name != "data" else [["data", "--help"], ["data", "check", "--help"]]
    for argv in helps:
        with pytest.raises(SystemExit) as done:
            cli.main(argv)
        assert done.value.code == 0 and "usage: python -m " + DASH_M[name] in capsys.readouterr().out

    assert "utp_dist.train" not in sys.modules  # so running it below as __main__ cannot warn about a second copy
    monkeypatch.setattr(sys, "argv", [DASH_M[name], *helps[-1][1:]])
    with warnings.catch_warnings():
        warnings.simplefilter("error" if name == "train" else "ignore", RuntimeWarning)
        with pytest.raises(SystemExit) as done:
            runpy.run_module(DASH_M[name], run_name="__main__")
        assert done.value.code == 0 and "usage: python -m " + DASH_M[name] in capsys.readouterr().out
        if home.__name__ not in (DASH_M[name], DASH_M[name] + ".__main__"):  # a -m module that hands over to `home`
            calls = []
            monkeypatch.setattr(home, "main", lambda argv=None: calls.append(argv) or 0)
            with pytest.raises(SystemExit):
                runpy.run_module(DASH_M[name], run_name="__main__")
            assert calls == [None]  # home.main itself, reading the same sys.argv

    import utp_dist
    from utp_dist.api import train

    assert utp_dist.train is train  # still the function, not the module, after `python -m utp_dist.train`


# the files inside a run folder, and its folders where they are joined into a path: RunDir's own names
RUN_FILES = (run_dir.CONFIG, run_dir.METRICS, run_dir.SUMMARY, run_dir.PROGRESS, run_dir.FINISHED, run_dir.COMPLETE, run_dir.LOCK)
RUN_FOLDERS = (run_dir.LOGS, run_dir.CHECKPOINTS, run_dir.STATE_DIR, run_dir.FIGURES, run_dir.EVALUATIONS, run_dir.BEST)
PATH_LIKE = re.compile(r"[\w.*/=-]*")
STATE_NAMES = re.compile(r"^(damaged-)?step-|^events\.out\.tfevents|^best-step")


def _names_run_file(text: str) -> bool:
    """A string literal that is (part of) a path into a run folder: a run file's name, a state or event file pattern,
    or one of the run's folders with a slash."""
    if not PATH_LIKE.fullmatch(text):
        return False  # prose (an error message, a help text) may mention a file; only a path literal builds one
    parts = [p for p in text.split("/") if p]
    # "best/val_acc@1" is a TensorBoard tag: the export's folder counts only where a path is joined with it (below)
    return any(p in RUN_FILES or STATE_NAMES.match(p) for p in parts) or (len(parts) > 1 and any(p in RUN_FOLDERS[:-1] for p in parts))


def _offenders(path) -> list[str]:
    """'LINE: literal' for each run-folder path the module at `path` names, in line order."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings and _names_run_file(node.value):
            found.append((node.lineno, repr(node.value)))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            right = node.right
            if isinstance(right, ast.Constant) and right.value in RUN_FOLDERS:
                found.append((right.lineno, f"/ {right.value!r}"))
    return [f"{line}: {text}" for line, text in sorted(found)]


def test_only_the_store_names_run_folder_files():
    """Which files a run folder holds is RunDir's knowledge: code outside utp_dist/store/ asks RunDir or runfiles."""
    store = PACKAGE / "store"
    modules = [path for path in sorted(PACKAGE.rglob("*.py")) if store not in path.parents]
    offenders = [f"{path.relative_to(REPO)}:{hit}" for path in modules for hit in _offenders(path)]
    assert not offenders, "run-folder paths named outside utp_dist/store/ (use RunDir or store.runfiles):\n" + "\n".join(offenders)


def test_the_layout_check_finds_what_it_looks_for(tmp_path):
    """The check above is only as good as its patterns: each way of naming a run file is caught, prose is not."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Reads metrics.jsonl."""\n'
        'a = root / "logs" / name\n'
        'b = folder / "progress.json"\n'
        'c = folder.glob("step-*")\n'
        'd = "checkpoints/shapes/run"\n'
        'e = "cannot read summary.json: it is damaged"\n'
        'f = {"logs": 1, "state": 2}\n'
    )
    assert _offenders(sample) == ["2: / 'logs'", "3: 'progress.json'", "4: 'step-*'", "5: 'checkpoints/shapes/run'"]
