"""utp_dist's training loop against a plain PyTorch loop: same model, same data, same machine.

Run:
    python benchmarks/plain_vs_utp.py [CONFIG] [--repeats N] [key=value overrides]
    python benchmarks/plain_vs_utp.py configs/quickstart.yaml --repeats 2 train.epochs=3

What it measures, alternating utp, plain, utp, plain ... so machine noise hits both:
  * utp_dist: Trainer(load_config(CONFIG, overrides)).fit() with output in a temp dir. Setup (Trainer.__init__)
    and fit() are timed apart; fit() includes per-epoch evaluation with the full metric suite, figures,
    TensorBoard, checkpoints and the final test evaluation. Timing wrappers installed at runtime on
    Trainer/BestModel/Checkpointer/TensorBoardTracker methods split fit() into training, evaluation, checkpointing and the rest.
  * plain: what a user writes without utp_dist: torchvision ImageFolder + PIL transforms, torch DataLoader with
    the same loader settings, the same HF model (build_model), param groups (build_optimizer), schedule
    (build_scheduler), grad clipping, label smoothing, seed and epochs; top-1 val accuracy after each epoch.
train img/s = images trained / time in the training loops (evaluation excluded), for both. "CPU s" counts this
process and its DataLoader workers; "outside CPU" is what other processes used meanwhile (noise: re-run if high).
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
from torchvision import datasets  # noqa: E402

from utp_dist.bench import plain_loader  # noqa: E402
from utp_dist.config import load_config  # noqa: E402
from utp_dist.data.loaders import resolve_root  # noqa: E402
from utp_dist.model import build_model, input_spec  # noqa: E402
from utp_dist.optim import build_optimizer, build_scheduler, optimizer_steps  # noqa: E402
from utp_dist.store.checkpoint import BestModel, Checkpointer  # noqa: E402
from utp_dist.tracking import TensorBoardTracker  # noqa: E402
from utp_dist.trainer import Trainer  # noqa: E402

TIMES: dict[str, float] = defaultdict(float)  # seconds per instrumented method in the current utp_dist run
VAL_ACC: list[float] = []  # val acc@1 of each epoch of the current utp_dist run
NESTED = "  of "  # breakdown rows inside another row: shown, not summed


def _instrument(cls: type, name: str, key=lambda args, name: name) -> None:
    """Replace cls.name by a wrapper adding its duration to TIMES[key(args, name)] (skipped if there is no such method)."""
    fn = getattr(cls, name, None)
    if fn is None:
        return

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            result = fn(self, *args, **kwargs)
        finally:
            TIMES[key(args, name)] += time.perf_counter() - start
        if name == "evaluate" and args[0] == "val":
            VAL_ACC.append(result["val_acc@1"])
        return result

    setattr(cls, name, wrapper)


_instrument(Trainer, "evaluate", key=lambda args, _: f"eval_{args[0]}")
_instrument(TensorBoardTracker, "log_eval", key=lambda args, _: f"{NESTED}eval_{args[0]}: Tracker.log_eval (figures, TensorBoard)")
_instrument(Trainer, "train_step", key=lambda *_: f"{NESTED}train loop: in train_step (not waiting for data)")
_instrument(BestModel, "update", key=lambda *_: "best-model export (BestModel.update)")
_instrument(BestModel, "load_best")
_instrument(Trainer, "_build_run")
_instrument(Checkpointer, "save")  # resumable training state
_instrument(TensorBoardTracker, "close", key=lambda *_: "Tracker.close (waits for background figures)")


def cpu_s() -> float:
    """CPU seconds of this process and its reaped children (DataLoader workers count once shut down)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def busy_s() -> float:
    """CPU seconds the whole machine has been busy (Linux /proc/stat; 0 elsewhere)."""
    try:
        with open("/proc/stat") as fh:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fh.readline().split()[1:9])
    except (OSError, ValueError):
        return 0.0
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def measured(fn):
    """Add CPU seconds (own + workers) and the outside CPU share during the run to fn's result."""

    @functools.wraps(fn)
    def wrapper(*args):
        cpu, busy, start = cpu_s(), busy_s(), time.perf_counter()
        result = fn(*args)
        gc.collect()  # the persistent workers are shut down and reaped before the next run
        cpu, busy, wall = cpu_s() - cpu, busy_s() - busy, time.perf_counter() - start
        return {**result, "cpu": cpu, "outside": max(busy - cpu, 0.0) / (wall * os.cpu_count())}

    return wrapper


@measured
def run_utp(cfg_path: str, overrides: list[str]) -> dict:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    TIMES.clear()
    VAL_ACC.clear()
    with tempfile.TemporaryDirectory(prefix="utp-bench-") as out:
        start = time.perf_counter()
        trainer = Trainer(load_config(cfg_path, [*overrides, f"output.root={out}"]))
        setup = time.perf_counter() - start
        start = time.perf_counter()
        summary = trainer.fit()
        wall = time.perf_counter() - start
        del trainer
    parts = {"train loop (Meter.train_time)": summary["train_images"] / summary["train_img_per_s"]}
    parts.update({k: v for k, v in TIMES.items() if not k.startswith(NESTED)})
    parts["other (fit() minus the above)"] = wall - sum(parts.values())
    parts.update({k: v for k, v in TIMES.items() if k.startswith(NESTED)})
    return {"setup": setup, "wall": wall, "img_s": summary["train_img_per_s"], "final": VAL_ACC[-1], "best": max(VAL_ACC), "parts": parts}


@measured
def run_plain(cfg_path: str, overrides: list[str]) -> dict:
    cfg = load_config(cfg_path, overrides)
    d, o, t = cfg.data, cfg.optim, cfg.train
    if o.grad_accum_steps != 1 or t.precision == "fp16":
        sys.exit("the plain loop implements optim.grad_accum_steps=1 and fp32/bf16 only")
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    root = resolve_root(d.root)
    classes, _ = datasets.folder.find_classes(root / "train")
    torch.manual_seed(t.seed)
    model, processor = build_model(cfg.model, classes, d.image_size)
    model.to(device)
    spec = input_spec(processor, d.image_size)
    train_dl = plain_loader(d, spec, "train", device, generator=torch.Generator().manual_seed(t.seed))
    val_dl = plain_loader(d, spec, "val", device)
    val_ds = val_dl.dataset
    assert val_ds.classes == train_dl.dataset.classes == classes
    total_steps = optimizer_steps(len(train_dl), t.epochs, 1, t.max_steps)
    optimizer = build_optimizer(model, o, fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, o, total_steps)
    setup = time.perf_counter() - start

    start, train_time, step_time, images, step, accs = time.perf_counter(), 0.0, 0.0, 0, 0, []
    for _ in range(t.epochs):
        model.train()
        tick = time.perf_counter()
        for x, y in train_dl:
            got = time.perf_counter()
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
            images, step, step_time = images + len(y), step + 1, step_time + time.perf_counter() - got
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
    del train_dl, val_dl
    return {
        "setup": setup,
        "wall": wall,
        "img_s": images / train_time,
        "final": accs[-1],
        "best": max(accs),
        "train": train_time,
        "step": step_time,
        "eval": wall - train_time,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/quickstart.yaml")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, applied to both")
    args = parser.parse_intermixed_args()  # --repeats may come before or after the overrides, as the docstring shows
    if "=" in args.config:  # only overrides were given
        args.overrides, args.config = [args.config, *args.overrides], "configs/quickstart.yaml"
    results: dict[str, list[dict]] = {"utp": [], "plain": []}
    for i in range(args.repeats):
        for name, fn in (("utp", run_utp), ("plain", run_plain)):
            results[name].append(r := fn(args.config, args.overrides))
            print(
                f"[repeat {i + 1}] {name:5s} setup {r['setup']:5.2f}s  fit/loop {r['wall']:6.2f}s  CPU {r['cpu']:6.1f}s  "
                f"train {r['img_s']:6.1f} img/s  val acc@1 final {r['final']:.4f} best {r['best']:.4f}  "
                f"(outside CPU {r['outside']:.0%})",
                flush=True,
            )

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(
        f"\nhardware: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}"
    )
    outside = max(r["outside"] for rs in results.values() for r in rs)
    print(
        f"config: {args.config} {' '.join(args.overrides)}   repeats: {args.repeats}   worst outside CPU load: {outside:.0%}"
        + ("  << other processes competed: timings are unreliable" if outside > 0.1 else "")
        + "\n"
    )
    print(f"{'':30s}{'utp_dist':>10s}{'plain':>10s}{'utp/plain':>11s}   best-of-{args.repeats} utp/plain")
    for label, key, pick in (
        ("setup s", "setup", min),
        ("fit()/loop wall s", "wall", min),
        ("CPU s (setup+fit, +workers)", "cpu", min),
        ("train img/s", "img_s", max),
    ):
        u, p = med("utp", key), med("plain", key)
        best = pick(r[key] for r in results["utp"]) / pick(r[key] for r in results["plain"])
        print(f"{label:30s}{u:10.2f}{p:10.2f}{u / p:11.3f}   {best:.3f}")
    for label, key in (("val acc@1 final", "final"), ("val acc@1 best", "best")):
        print(f"{label:30s}{med('utp', key):10.4f}{med('plain', key):10.4f}{med('utp', key) - med('plain', key):+11.4f}")
    speed = med("utp", "img_s") / med("plain", "img_s")
    print(
        f"\ntrain speed within 5% of plain (medians): {'yes' if speed >= 0.95 else 'NO'} ({(speed - 1) * 100:+.1f}% img/s); "
        f"fit() wall time {(med('utp', 'wall') / med('plain', 'wall') - 1) * 100:+.1f}%"
    )
    print(
        f"\nutp_dist fit() breakdown (median s; plain loop: train {med('plain', 'train'):.2f}s of which in the step "
        f"{med('plain', 'step'):.2f}s, val eval {med('plain', 'eval'):.2f}s):"
    )
    for part in results["utp"][0]["parts"]:
        value = statistics.median(r["parts"].get(part, 0.0) for r in results["utp"])
        print(f"  {part:58s}{value:8.2f}  {value / med('utp', 'wall') * 100:5.1f}%")


if __name__ == "__main__":
    main()
