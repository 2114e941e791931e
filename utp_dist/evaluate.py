"""`python -m utp_dist.evaluate MODEL DATA_ROOT_OR_SPLIT [--out DIR]`: training's metric suite on one ImageFolder split,
written as report.json with the confusion matrix and ROC figures."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utp_dist.errors import UserError, run_command
from utp_dist.store import atomic

REPORT = "report.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """MODEL, the data and the output options."""
    parser = argparse.ArgumentParser(prog="python -m utp_dist.evaluate", description="Evaluate a trained model on an ImageFolder split.")
    parser.add_argument("model", help="an export folder, a run's checkpoint folder (its best model) or a run name")
    parser.add_argument("data", help="an ImageFolder root or builtin:NAME (its test/ split is used), or a split folder of class folders")
    parser.add_argument("--out", help="report folder (default: the run's logs/.../evaluations/DATA_SPLIT, else ./evaluation_DATA_SPLIT)")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: the run's evaluation batch size, else 64)")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes (default 2; 0 = in this process)")
    parser.add_argument("--root", default="experiments", help="output root to find a run name in (default: experiments)")
    return parser.parse_args(argv)


def split_folder(data: str) -> Path:
    """DATA itself when it holds class folders, DATA/test when DATA is a root with a test split (builtin:NAME too)."""
    from utp_dist.data.builtin import BUILTIN_PREFIX
    from utp_dist.data.loaders import resolve_root

    path = resolve_root(data) if data.startswith(BUILTIN_PREFIX) else Path(data).expanduser()
    if not path.is_dir():
        raise UserError(f"{data}: no such folder; give an ImageFolder root with test/ or a split folder of class folders")
    return path / "test" if (path / "test").is_dir() else path


def samples_of(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) of every image of the split, labelled by the model's class names; a class the model lacks is an error."""
    from utp_dist.data.folder_index import list_split

    listing = list_split(folder)
    unknown = [c for c in listing.classes if c not in classes]
    if unknown or not listing.classes:
        raise UserError(
            f"{folder}: class folder(s) {', '.join(unknown) or '(none)'} do not match the model's classes {', '.join(classes)}; "
            "give a split whose class folders are among them"
        )
    return [(str(folder / name / rel), classes.index(name)) for name in listing.classes for rel in listing.files[name]]


def evaluate(args: argparse.Namespace) -> int:
    """Evaluate and write the report; print the metrics."""
    from utp_dist.inference import batches, load_model
    from utp_dist.metrics import EvalMetrics

    folder = split_folder(args.data)
    loaded = load_model(args.model, args.root)
    samples = samples_of(folder, loaded.classes)
    if not samples:
        raise UserError(f"{folder}: no images in its class folders")
    data_cfg = loaded.config.data
    batch = args.batch_size or (data_cfg.eval_batch_size or 2 * data_cfg.batch_size if loaded.run is not None else 64)
    metrics = EvalMetrics(len(loaded.classes), loaded.config.train.eval_topk, loaded.device)
    for _, logits, labels in batches(loaded, samples, batch, args.workers):
        metrics.update(logits, labels)  # unreadable files carry label -100: counted as skipped, as in training
    if metrics.count == 0:  # nothing to measure: torchmetrics would fail on an empty split
        raise UserError(f"{folder}: none of its {len(samples)} images can be read (the lines above name each); fix or replace them")
    values, confusion, roc = metrics.compute("eval")
    values = {k.removeprefix("eval_"): v for k, v in values.items()}
    out = _out_dir(args.out, loaded.run, folder)
    _write(out, values, confusion, roc, loaded, folder)
    for key, value in values.items():
        print(f"{key:>16}  {value:.4f}" if isinstance(value, float) else f"{key:>16}  {value}")
    print(f"report: {out / REPORT}")
    return 0


def _out_dir(out: str | None, run, folder: Path) -> Path:
    name = f"{folder.resolve().parent.name}_{folder.name}"
    path = Path(out) if out else (run.evaluations / name if run is not None else Path(f"evaluation_{name}"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write(out: Path, values: dict, confusion, roc, loaded, folder: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from utp_dist.metrics import confusion_figure, roc_figure

    figures = {"confusion_matrix.png": confusion_figure(confusion, loaded.classes, f"{folder.name}")}
    figures["roc_micro.png"] = roc_figure(*roc, values.get("auroc_macro"), f"{folder.name} ROC (micro)")
    for name, figure in figures.items():
        FigureCanvasAgg(figure).print_png(str(out / name))
    report = {
        "model": str(loaded.folder),
        "run": str(loaded.run.logs) if loaded.run is not None else None,
        "data": str(folder.resolve()),
        "classes": loaded.classes,
        "metrics": values,
        "confusion_matrix": confusion.tolist(),
        "figures": sorted(figures),
    }
    atomic.write_json(out / REPORT, report)


def main(argv: list[str] | None = None) -> int:
    """Run the command; user errors become one line on stderr and exit code 2."""
    args = parse_args(argv)
    return run_command(lambda: evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
