"""`python -m utp_dist.bench CONFIG.yaml [key=value ...]`: is my data path the bottleneck? Steady-state img/s of
(1) the model step alone on synthetic batches, (2) the data path alone, (3) utp_dist end to end, and the same model
and data in a plain PyTorch loop (torchvision ImageFolder + PIL transforms): (4) its data path and (5) end to end."""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator

from utp_dist.errors import run_command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """A config, dotted overrides, and how many batches to warm up and to time."""
    parser = argparse.ArgumentParser(prog="python -m utp_dist.bench", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config (its data, model, precision and loader settings are benchmarked)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as data.num_workers=8")
    parser.add_argument("--steps", type=int, default=60, help="timed batches per measurement (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches first: workers start, kernels compile (default 10)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all five measurements; the best of each is kept (default 2)")
    return parser.parse_intermixed_args(argv)


def steady(batches: Iterator, work: Callable, warmup: int, steps: int, sync: Callable) -> float:
    """img/s over `steps` batches after `warmup` untimed ones; `work(batch)` returns the batch's image count."""
    for _ in range(warmup):
        work(next(batches))
    sync()
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += work(next(batches))
    sync()
    return images / (time.perf_counter() - start)


def endless(loader, sampler=None) -> Iterator:
    """Batches of `loader`, epoch after epoch."""
    for epoch in itertools.count():
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader


def measure(cfg, warmup: int, steps: int, repeats: int) -> dict[str, float]:
    """The five img/s figures for this config on this machine, each the best of `repeats` interleaved rounds."""
    import torch

    from utp_dist.trainer import Components

    trainer = Components(cfg)  # no run folder is claimed
    acc, model = trainer.accelerator, trainer.model
    sync = torch.cuda.synchronize if acc.device.type == "cuda" else (lambda: None)
    batch = cfg.data.batch_size

    def train(item) -> int:
        images, labels = item
        with acc.accumulate(model):
            trainer.train_step(images, labels)
        return len(labels)

    model.train()
    synthetic = (
        torch.randint(0, 256, (batch, 3, *trainer.spec.size), dtype=torch.uint8, device=acc.device),
        torch.randint(0, len(trainer.classes), (batch,), device=acc.device),
    )
    plain = PlainLoop(cfg, trainer)
    ours, theirs = endless(trainer.loaders["train"]), endless(plain.loader)  # workers persist across measurements
    runs = {
        "model step (synthetic batches)": (itertools.repeat(synthetic), train),
        # with data.decode: gpu the decoding happens after the loader: it belongs to the data path
        "data path (loader -> device)": (ours, lambda b: len(trainer.inputs.decoders["train"](*b)[1])),
        "utp_dist end to end": (ours, train),
        "plain data path (ImageFolder + PIL)": (theirs, plain.to_device),
        "plain loop end to end": (theirs, plain.step),
    }
    results = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):  # interleaved rounds: a noisy moment on the machine does not hit one side only
        for name, (batches, work) in runs.items():
            results[name] = max(results[name], steady(batches, work, warmup, steps, sync))
    return results


def plain_loader(data, spec, split: str, device, generator=None):
    """What a user writes without utp_dist: torchvision ImageFolder + PIL transforms (float, normalised in the workers)
    and a DataLoader with the config's loader settings; the train split is shuffled, augmented and drops its last batch."""
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    from utp_dist.data.loaders import resolve_root

    train = split == "train"
    norm = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    resize = [T.Resize(spec.resize), T.CenterCrop(spec.size)]
    augment = [T.RandomResizedCrop(spec.size), T.RandomHorizontalFlip()] if train and data.augment == "standard" else resize
    dataset = datasets.ImageFolder(str(resolve_root(data.root) / split), transform=T.Compose([*augment, *norm]))
    pin = device.type == "cuda" if data.pin_memory is None else data.pin_memory
    batch = data.batch_size if train else (data.eval_batch_size or 2 * data.batch_size)
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=train,
        drop_last=train,
        num_workers=data.num_workers,
        pin_memory=pin,
        persistent_workers=data.persistent_workers and data.num_workers > 0,
        generator=generator,
        prefetch_factor=data.prefetch_factor if data.num_workers else None,
    )


class PlainLoop:
    """What a user writes without utp_dist: torchvision ImageFolder + PIL transforms, DataLoader, autocast, AdamW."""

    def __init__(self, cfg, trainer):
        import torch

        from utp_dist.model import build_model

        self.device = trainer.accelerator.device
        self.bf16 = trainer.accelerator.mixed_precision == "bf16"
        self.loader = plain_loader(cfg.data, trainer.spec, "train", self.device)
        self.model = build_model(cfg.model, trainer.classes, cfg.data.image_size)[0].to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr, fused=self.device.type == "cuda")
        self.max_grad_norm = cfg.optim.max_grad_norm

    def to_device(self, item) -> int:
        """The plain data path: the batch copied to the device."""
        images, labels = item
        images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        return len(labels)

    def step(self, item) -> int:
        """One plain training step."""
        import torch
        import torch.nn.functional as F

        images, labels = (t.to(self.device, non_blocking=True) for t in item)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(pixel_values=images).logits
        F.cross_entropy(logits.float(), labels).backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return len(labels)


def table(results: dict[str, float]) -> str:
    """Markdown table: img/s and the ratio that answers each question."""
    model, data, e2e = results["model step (synthetic batches)"], results["data path (loader -> device)"], results["utp_dist end to end"]
    plain_data, plain = results["plain data path (ImageFolder + PIL)"], results["plain loop end to end"]
    ratios = {
        "model step (synthetic batches)": "the ceiling",
        "data path (loader -> device)": f"{data / plain_data:.2f}x plain data path",
        "utp_dist end to end": f"{e2e / plain:.2f}x plain loop, {e2e / model:.0%} of the model step",
        "plain data path (ImageFolder + PIL)": "",
        "plain loop end to end": f"{plain / model:.0%} of the model step",
    }
    lines = ["| measurement | img/s | ratio |", "|---|---:|---|"]
    lines += [f"| {name} | {value:,.0f} | {ratios[name]} |" for name, value in results.items()]
    verdict = "the data path is the bottleneck" if data < model else "the model step is the bottleneck"
    return "\n".join(lines) + f"\n\n{verdict} (data path {data:,.0f} img/s vs model step {model:,.0f} img/s)"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; user errors are one line and exit 2."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*image decoding and encoding.*")
    return run_command(lambda: _bench(args))


def _bench(args: argparse.Namespace) -> int:
    import torch

    from utp_dist.config import load_config

    with tempfile.TemporaryDirectory(prefix="utp-bench-") as out:
        cfg = load_config(args.config, [*args.overrides, f"output.root={out}"])
        results = measure(cfg, args.warmup, args.steps, args.repeats)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(
        f"{args.config} {' '.join(args.overrides)} on {device}: batch {cfg.data.batch_size}, {cfg.data.num_workers} workers, "
        f"precision {cfg.train.precision}, best of {args.repeats} rounds of {args.warmup} warm-up + {args.steps} timed batches"
    )
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
