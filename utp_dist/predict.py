"""`python -m utp_dist.predict MODEL IMAGES... [--topk 5] [--batch-size N] [--out preds.csv|.jsonl]`."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
from pathlib import Path

from utp_dist.errors import UserError, run_command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """MODEL, IMAGES and the output options."""
    parser = argparse.ArgumentParser(prog="python -m utp_dist.predict", description="Classify images with a trained model.")
    parser.add_argument("model", help="an export folder, a run's checkpoint folder (its best model) or a run name")
    parser.add_argument("images", nargs="+", help="image files and folders (searched recursively)")
    parser.add_argument("--topk", type=int, default=5, help="classes per image, best first (default 5, at most the number of classes)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes (default 2; 0 = in this process)")
    parser.add_argument("--out", help="write predictions to a .csv or .jsonl file instead of printing them")
    parser.add_argument("--root", default="experiments", help="output root to find a run name in (default: experiments)")
    return parser.parse_args(argv)


def predict(args: argparse.Namespace) -> int:
    """Classify every image; unreadable ones are listed on stderr and left out (they do not stop the others)."""
    if args.topk < 1 or args.batch_size < 1 or args.workers < 0:
        raise UserError("--topk and --batch-size must be >= 1 and --workers >= 0")
    if args.out:
        check_out(args.out)  # before any image is read: a bad --out must not cost the whole run
    from utp_dist.inference import batches, image_files, is_bad, load_model

    files = image_files(args.images)
    loaded = load_model(args.model, args.root)
    k = min(args.topk, len(loaded.classes))
    rows, bad = [], []
    for start, logits, labels in batches(loaded, [(f, 0) for f in files], args.batch_size, args.workers):
        scores, indices = logits.softmax(-1).topk(k, dim=-1)
        for j, (row_scores, row_indices, unreadable) in enumerate(
            zip(scores.tolist(), indices.tolist(), is_bad(labels).tolist(), strict=True)
        ):
            if unreadable:
                bad.append(files[start + j])
                continue
            rows.append(
                {
                    "path": files[start + j],
                    "predictions": [{"label": loaded.classes[i], "score": s} for i, s in zip(row_indices, row_scores, strict=True)],
                }
            )
    _write(rows, args.out, k)
    if bad:
        print(f"utp_dist: skipped {len(bad)} unreadable file(s): {', '.join(bad)}", file=sys.stderr)
    return 0


def check_out(out: str) -> None:
    """--out names a .csv or .jsonl file that can be written: not a folder, not below a file, in a writable folder."""
    path = Path(out)
    if path.is_dir():
        raise UserError(f"--out {out}: is a folder; name a file in it, e.g. {path / 'preds.csv'}")
    if path.suffix not in (".csv", ".jsonl"):
        raise UserError(f"--out {out}: write a .csv or a .jsonl file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in reversed(path.parents) if p.exists() and not p.is_dir())
        raise UserError(f"--out {out}: {blocker} is a file, not a folder; choose another path") from None
    except OSError as err:
        raise UserError(f"--out {out}: cannot create the folder {path.parent}: {err.strerror}") from None
    try:  # the rename at the end needs the folder writable
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as err:
        raise UserError(f"--out {out}: cannot write in {path.parent}: {err.strerror}") from None
    try:  # an existing file that is read-only stays protected, as open(..., "w") would have it
        if path.exists():
            open(path, "a").close()
    except OSError as err:
        raise UserError(f"--out {out}: cannot write {path}: {err.strerror}") from None


def _write(rows: list[dict], out: str | None, k: int) -> None:
    if out is None:
        for row in rows:
            print(row["path"] + "\t" + ", ".join(f"{p['label']} {p['score']:.4f}" for p in row["predictions"]))
        return
    path = Path(out)
    text = io.StringIO(newline="")
    if path.suffix == ".jsonl":
        text.writelines(json.dumps(row) + "\n" for row in rows)
    else:
        writer = csv.writer(text)
        writer.writerow(["path", *(f"{name}_{i}" for i in range(1, k + 1) for name in ("label", "score"))])
        writer.writerows([row["path"], *(v for p in row["predictions"] for v in (p["label"], p["score"]))] for row in rows)
    # a temporary file renamed over the old one: a full disk leaves the old file as it was, never a partial one
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {err.strerror}; the file is as it was before this command") from None
    print(f"{len(rows)} prediction(s) written to {path}")


def main(argv: list[str] | None = None) -> int:
    """Run the command; user errors become one line on stderr and exit code 2."""
    args = parse_args(argv)
    return run_command(lambda: predict(args))


if __name__ == "__main__":
    sys.exit(main())
