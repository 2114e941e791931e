"""The package's layout rules, read from its source."""

from __future__ import annotations

import ast
import re

from conftest import REPO

from utp_dist.store import run_dir

PACKAGE = REPO / "utp_dist"
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
