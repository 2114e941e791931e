"""utp_dist's training loop against a plain PyTorch loop: same model, same data, same machine.

Run:
    python benchmarks/plain_vs_utp.py [CONFIG] [--repeats N] [key=value overrides]
    python benchmarks/plain_vs_utp.py configs/quickstart.yaml --repeats 2 train.epochs=3

What it measures, alternating utp, plain, utp, plain ... so machine noise hits both:
  * utp_dist: Trainer(load_config(CONFIG, overrides)).fit() with output in a temp dir. Setup (Trainer.__init__)
    and fit() are timed apart; fit() includes per-epoch evaluation with the full metric suite, figures,
    TensorBoard, best-checkpoint export and the final test evaluation. Timing wrappers installed at runtime
    on Trainer/Checkpointer/Tracker methods split fit() into training, evaluation, checkpointing and the rest.
  * plain: what a user writes without utp_dist: torchvision ImageFolder + PIL transforms, torch DataLoader with
    the same loader settings, the same HF model (build_model), param groups (build_optimizer), schedule
    (build_scheduler), grad clipping, label smoothing, seed and epochs; top-1 val accuracy after each epoch.
train img/s is images trained / time spent in the training loops (evaluation excluded), for both.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict

warnings.filterwarnings("ignore", message=".*image decoding and encoding.*", category=DeprecationWarning)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from utp_dist.checkpoint import Checkpointer  # noqa: E402
from utp_dist.config import load_config  # noqa: E402
from utp_dist.data import resolve_root  # noqa: E402
from utp_dist.model import build_model, input_spec  # noqa: E402
from utp_dist.optim import build_optimizer, build_scheduler, optimizer_steps  # noqa: E402
from utp_dist.tracking import Tracker  # noqa: E402
from utp_dist.trainer import Trainer  # noqa: E402

TIMES: dict[str, float] = defaultdict(float)  # seconds per instrumented section of the current utp_dist run
VAL_ACC: list[float] = []  # val acc@1 of each epoch of the current utp_dist run


def _instrument(cls: type, name: str, key=None) -> None:
    """Replace cls.name by a wrapper adding its duration to TIMES[key(args) or name] (skipped if cls has no such method)."""
    fn = getattr(cls, name, None)
    if fn is None:
        return

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            result = fn(self, *args, **kwargs)
        finally:
            TIMES[key(args) if key else name] += time.perf_counter() - start
        if name == "evaluate" and args[0] == "val":
            VAL_ACC.append(result["val_acc@1"])
        return result

    setattr(cls, name, wrapper)


_instrument(Trainer, "evaluate", key=lambda args: f"eval_{args[0]}")
_instrument(Tracker, "log_eval", key=lambda args: f"log_eval_{args[0]}")  # figures + TensorBoard, inside evaluate
_instrument(Checkpointer, "update", key=lambda args: "checkpoint")
_instrument(Checkpointer, "load_best")
_instrument(Trainer, "_open_run")
_instrument(Trainer, "save_state")  # resumable training state (newer utp_dist versions)


def cpu_s() -> float:
    """CPU seconds of this process and its reaped children (DataLoader workers count once shut down)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_utp(cfg_path: str, overrides: list[str]) -> dict:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    TIMES.clear()
    VAL_ACC.clear()
    cpu = cpu_s()
    with tempfile.TemporaryDirectory(prefix="utp-bench-") as out:
        start = time.perf_counter()
        trainer = Trainer(load_config(cfg_path, [*overrides, f"output.root={out}"]))
        setup = time.perf_counter() - start
        start = time.perf_counter()
        summary = trainer.fit()
        wall = time.perf_counter() - start
        del trainer  # shuts down the persistent workers before the next run
        gc.collect()
    cpu = cpu_s() - cpu
    train = summary["train_images"] / summary["train_img_per_s"]
    parts = {"train loop (Meter.train_time)": train, **{k: v for k, v in TIMES.items() if not k.startswith("log_eval")}}
    parts["other (fit() minus the above)"] = wall - sum(parts.values())
    for split in ("val", "test"):  # nested inside eval_<split>: shown, not summed
        parts[f"  of eval_{split}: Tracker.log_eval (figures, TB, jsonl)"] = TIMES.get(f"log_eval_{split}", 0.0)
    return {"setup": setup, "wall": wall, "cpu": cpu, "img_s": summary["train_img_per_s"], "final": VAL_ACC[-1], "best": max(VAL_ACC), "parts": parts}


def run_plain(cfg_path: str, overrides: list[str]) -> dict:
    cfg = load_config(cfg_path, overrides)
    d, o, t = cfg.data, cfg.optim, cfg.train
    if o.grad_accum_steps != 1 or t.precision == "fp16":
        sys.exit("the plain loop implements optim.grad_accum_steps=1 and fp32/bf16 only")
    start, cpu = time.perf_counter(), cpu_s()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    root = resolve_root(d.root)
    classes, _ = datasets.folder.find_classes(root / "train")
    torch.manual_seed(t.seed)
    model, processor = build_model(cfg.model, classes, d.image_size)
    model.to(device)
    spec = input_spec(processor, d.image_size)
    norm = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    eval_tf = T.Compose([T.Resize(spec.resize), T.CenterCrop(spec.size), *norm])
    train_tf = eval_tf if d.augment == "none" else T.Compose([T.RandomResizedCrop(spec.size), T.RandomHorizontalFlip(), *norm])
    train_ds = datasets.ImageFolder(str(root / "train"), transform=train_tf)
    val_ds = datasets.ImageFolder(str(root / "val"), transform=eval_tf)
    assert val_ds.classes == train_ds.classes == classes
    workers = d.num_workers
    common = {
        "num_workers": workers,
        "pin_memory": d.pin_memory if d.pin_memory is not None else device.type == "cuda",
        "persistent_workers": d.persistent_workers and workers > 0,
        "prefetch_factor": d.prefetch_factor if workers else None,
    }
    gen = torch.Generator().manual_seed(t.seed)
    train_dl = DataLoader(train_ds, batch_size=d.batch_size, shuffle=True, drop_last=True, generator=gen, **common)
    val_dl = DataLoader(val_ds, batch_size=d.eval_batch_size or 2 * d.batch_size, **common)
    total_steps = optimizer_steps(len(train_dl), t.epochs, 1, t.max_steps)
    optimizer = build_optimizer(model, o, fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, o, total_steps)
    setup = time.perf_counter() - start

    start, train_time, images, step, accs = time.perf_counter(), 0.0, 0, 0, []
    for _ in range(t.epochs):
        model.train()
        tick = time.perf_counter()
        for x, y in train_dl:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(pixel_values=x).logits
            loss = F.cross_entropy(logits.float(), y, label_smoothing=t.label_smoothing)
            loss.backward()
            if o.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            images, step = images + len(y), step + 1
            if step >= total_steps:
                break
        train_time += time.perf_counter() - tick
        model.eval()
        correct = 0
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for x, y in val_dl:
                correct += (model(pixel_values=x.to(device)).logits.argmax(-1).cpu() == y).sum().item()
        accs.append(correct / len(val_ds))
        if step >= total_steps:
            break
    wall = time.perf_counter() - start
    del train_dl, val_dl  # shuts down the persistent workers before the next run
    gc.collect()
    return {"setup": setup, "wall": wall, "cpu": cpu_s() - cpu, "img_s": images / train_time, "final": accs[-1], "best": max(accs), "eval": wall - train_time}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/quickstart.yaml")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, applied to both")
    args = parser.parse_args()
    if "=" in args.config:  # only overrides were given
        args.overrides, args.config = [args.config, *args.overrides], "configs/quickstart.yaml"
    results: dict[str, list[dict]] = {"utp": [], "plain": []}
    if os.getloadavg()[0] > 0.5:  # other jobs on the machine skew both arms, and not equally
        print(f"warning: load average {os.getloadavg()[0]:.1f} before starting; timings will be noisy", flush=True)
    for i in range(args.repeats):
        for name, fn in (("utp", run_utp), ("plain", run_plain)):
            results[name].append(r := fn(args.config, args.overrides))
            print(f"[repeat {i + 1}] {name:5s} setup {r['setup']:5.2f}s  fit/loop {r['wall']:6.2f}s  CPU {r['cpu']:6.1f}s  "
                  f"train {r['img_s']:6.1f} img/s  "
                  f"val acc@1 final {r['final']:.4f} best {r['best']:.4f}  (load avg {os.getloadavg()[0]:.1f})", flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(f"\nhardware: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    print(f"config: {args.config} {' '.join(args.overrides)}   repeats: {args.repeats} (medians)\n")
    print(f"{'':28s}{'utp_dist':>10s}{'plain':>10s}{'utp/plain':>11s}   best-of-{args.repeats} utp/plain (robust to outside load)")
    for label, key, pick in (("setup s", "setup", min), ("fit()/loop wall s", "wall", min),
                             ("CPU s (setup+fit, +workers)", "cpu", min), ("train img/s", "img_s", max)):
        u, p = med("utp", key), med("plain", key)
        best = pick(r[key] for r in results["utp"]) / pick(r[key] for r in results["plain"])
        print(f"{label:28s}{u:10.2f}{p:10.2f}{u / p:11.3f}   {best:.3f}")
    for label, key in (("val acc@1 final", "final"), ("val acc@1 best", "best")):
        print(f"{label:28s}{med('utp', key):10.4f}{med('plain', key):10.4f}{med('utp', key) - med('plain', key):+11.4f}")
    speed = med("utp", "img_s") / med("plain", "img_s")
    print(f"\ntrain speed within 5% of plain (medians): {'yes' if speed >= 0.95 else 'NO'} ({(speed - 1) * 100:+.1f}% img/s); "
          f"fit() wall time {(med('utp', 'wall') / med('plain', 'wall') - 1) * 100:+.1f}%")
    print(f"\nutp_dist fit() breakdown (median s over {args.repeats} runs; plain loop: train "
          f"{med('plain', 'wall') - med('plain', 'eval'):.2f}s, val eval {med('plain', 'eval'):.2f}s):")
    for part in results["utp"][0]["parts"]:
        value = statistics.median(r["parts"].get(part, 0.0) for r in results["utp"])
        print(f"  {part:48s}{value:8.2f}  {value / med('utp', 'wall') * 100:5.1f}%")


if __name__ == "__main__":
    main()
