"""The training loop: Accelerate set-up, fit(), the train step and evaluation."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import broadcast_object_list, gather_object, set_seed

from utp_dist import __version__
from utp_dist.checkpoint import Checkpointer, NullCheckpointer, TrainingStates, rng_state, set_rng_state
from utp_dist.config import Config
from utp_dist.data import IGNORE_LABEL, ImageFolderSplit, build_loader, build_transforms, index_splits
from utp_dist.errors import UserError, first_line
from utp_dist.flops import peak_tflops, train_flops_per_image
from utp_dist.gpu_augment import build_gpu_augment
from utp_dist.gpu_decode import build_decoder
from utp_dist.metrics import EvalMetrics
from utp_dist.model import DeviceInput, build_model, input_spec, is_convolutional
from utp_dist.optim import build_optimizer, build_scheduler, optimizer_steps
from utp_dist.preemption import Stopped, StopRequest
from utp_dist.resume import check, find_state, identity, read_identity
from utp_dist.runs import RunDir, base_name
from utp_dist.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state, so another run in this process (debug executor, tests) configures its own."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def compiled(model: torch.nn.Module, device_input: DeviceInput, spec, batch_size: int) -> torch.nn.Module:
    """torch.compile the model and try a training forward + backward at the real batch size, so the graphs training
    uses are the ones compiled; a model that fails to compile runs eager after one warning."""
    fast = torch.compile(model)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    rng = rng_state()
    try:
        probe = torch.zeros(batch_size, 3, *spec.size, dtype=torch.uint8, device=device_input.mean.device)
        fast(pixel_values=device_input(probe)).logits.float().sum().backward()
        return fast
    except Exception as err:  # compilers fail in many ways (no C compiler, unsupported op): eager always works
        log.warning("train.compile: torch.compile failed (%s: %s); training eager", type(err).__name__, first_line(err))
        return model
    finally:  # the probe leaves no trace: no gradients, batch-norm statistics and random streams as they were
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
        set_rng_state(rng)


def build_accelerator(cfg: Config) -> Accelerator:
    """An Accelerator that is really distributed on CPU too (gloo), with the configured precision."""
    cuda = torch.cuda.is_available()
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    # without cpu=True, accelerate ignores WORLD_SIZE on a machine without GPUs and runs N independent jobs
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision="no" if precision == "fp32" else precision,
        gradient_accumulation_steps=cfg.optim.grad_accum_steps,
        # Accelerate's loader already fetches one batch ahead; non-blocking copies from pinned memory then overlap
        # the next batch's transfer with this step's compute (the CUDA prefetch), without a loader of our own
        dataloader_config=DataLoaderConfiguration(non_blocking=cuda),
    )
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise UserError(
            f"the launcher started {expected} processes but the process group has {accelerator.num_processes}; "
            "launch with torchrun or accelerate launch --multi_gpu/--multi_cpu"
        )
    if accelerator.num_processes > 1:
        # every rank must train the same run: compare config hashes before any rank touches data or files
        hashes = gather_object([cfg.fingerprint()])
        if len(set(hashes)) > 1:
            odd = next(rank for rank, h in enumerate(hashes) if h != hashes[0])
            raise UserError(f"rank {odd} was given a different config than rank 0; launch every rank with the same file and overrides")
    return accelerator


class Trainer:
    """Builds every component of a run from its config; fit() trains, evaluates, checkpoints and reports."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.test_step_sleep = float(os.environ.get("UTP_DIST_TEST_STEP_SLEEP", "0"))
        self.accelerator = acc = build_accelerator(cfg)
        set_seed(cfg.train.seed)
        self.splits = index_splits(cfg.data, cfg.train.seed)
        self.classes = self.splits.classes
        self.model, self.processor = build_model(cfg.model, self.classes, cfg.data.image_size)
        self.spec = input_spec(self.processor, cfg.data.image_size)
        train_tf, eval_tf = build_transforms(self.spec, cfg.data.augment)
        pin = cfg.data.pin_memory if cfg.data.pin_memory is not None else acc.device.type == "cuda"
        self.loaders, self.samplers = {}, {}
        if cfg.data.decode == "gpu" and acc.device.type != "cuda":
            raise UserError(f"data.decode: gpu decodes JPEGs with nvjpeg and needs CUDA; this run is on {acc.device}: set data.decode: cpu")
        self.decoders = {}
        for split, samples in self.splits.samples.items():
            train = split == "train"
            random = train and cfg.data.augment != "none"
            transform = train_tf if random else eval_tf
            dataset = ImageFolderSplit(samples, transform, cfg.train.seed, cfg.data.on_bad_image, random, cfg.data.decode == "gpu")
            self.loaders[split], self.samplers[split] = build_loader(dataset, cfg.data, cfg.train.seed, train, acc.num_processes, pin)
            self.decoders[split] = build_decoder(cfg.data.decode, acc.device, transform, cfg.train.seed, random, cfg.data.on_bad_image)
        self.global_batch = cfg.data.batch_size * acc.num_processes * cfg.optim.grad_accum_steps
        per_rank_batches = len(self.samplers["train"]) // (cfg.data.batch_size * acc.num_processes)
        if per_rank_batches == 0:
            raise UserError(
                f"data.batch_size: {cfg.data.batch_size} x {acc.num_processes} processes is more than the "
                f"{len(self.splits.samples['train'])} training images; lower it"
            )
        self.total_steps = optimizer_steps(per_rank_batches, cfg.train.epochs, cfg.optim.grad_accum_steps, cfg.train.max_steps)
        self.optimizer = build_optimizer(self.model, cfg.optim, fused=acc.device.type == "cuda")
        # the scheduler is not prepared: accelerate would step it num_processes times per optimizer step
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        channels_last = (
            cfg.model.channels_last if cfg.model.channels_last is not None else (acc.device.type == "cuda" and is_convolutional(self.model))
        )
        self.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        augment = build_gpu_augment(cfg.data.gpu_augment, self.spec.size)
        self.device_input = DeviceInput(self.spec, augment, channels_last).to(acc.device)
        # only the main process reports MFU: the other ranks skip the count (about 1 s for ViT-B/16)
        self.flops_per_image = train_flops_per_image(self.model, self.spec.size) if acc.is_main_process else None
        self.peak_tflops = peak_tflops(cfg.train.peak_tflops, acc.device, acc.mixed_precision)
        self.metrics: dict[str, EvalMetrics] = {}  # one suite per split, reset before each evaluation
        if cfg.train.sync_batchnorm and acc.num_processes > 1:
            if acc.device.type != "cuda":
                raise UserError("train.sync_batchnorm: torch's SyncBatchNorm works on GPUs only; set it to false on CPU")
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model, self.optimizer, *loaders = acc.prepare(self.model, self.optimizer, *self.loaders.values())
        self.loaders = dict(zip(self.loaders, loaders, strict=True))
        if cfg.train.compile:
            self.model = compiled(self.model, self.device_input, self.spec, cfg.data.batch_size)

    def describe(self) -> str:
        """What --dry-run prints: classes, images per split after caps, parameters, steps, batches."""
        model = self.accelerator.unwrap_model(self.model)
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        counts = ", ".join(f"{s} {len(v)}" for s, v in self.splits.samples.items())
        return "\n".join(
            [
                f"data: {self.splits.root} ({len(self.classes)} classes: {', '.join(self.classes)})",
                f"images after caps: {counts}",
                f"model: {type(model).__name__} ({model.config.model_type}), {total:,} parameters, {trainable:,} trainable",
                f"input: {self.spec.size[0]}x{self.spec.size[1]}, mean {self.spec.mean}, std {self.spec.std}",
                f"world size {self.accelerator.num_processes} ({self.accelerator.distributed_type.value}), "
                f"device {self.accelerator.device}, precision {self.accelerator.mixed_precision}",
                f"global batch {self.global_batch} = {self.cfg.data.batch_size} per device x "
                f"{self.accelerator.num_processes} processes x {self.cfg.optim.grad_accum_steps} accumulation",
                f"optimizer steps: {self.total_steps} over {self.cfg.train.epochs} epochs",
            ]
        )

    def fit(self) -> dict:
        """Train (or continue) the run: evaluate every epoch, save states, test the best weights; return the summary."""
        self._open_run()
        stop = StopRequest().install()
        try:
            return self._fit(stop)
        finally:
            stop.uninstall()
            self.tracker.close()  # flushes TensorBoard and ends the progress bar line, also on errors

    def _fit(self, stop: StopRequest) -> dict:
        cfg, acc, p = self.cfg, self.accelerator, self.progress
        micro_batch = cfg.data.batch_size * acc.num_processes
        while p.epoch < cfg.train.epochs and p.step < self.total_steps:
            self.loaders["train"].set_epoch(p.epoch)  # accelerate's loader passes it to the sampler on every iteration
            self.samplers["train"].skip_once(p.position * micro_batch)
            self.model.train()
            self.meter.resume()
            for images, labels in self.meter.timed(self.loaders["train"]):
                with acc.accumulate(self.model):
                    self.meter.add(self.train_step(images, labels))
                p.position += 1
                if not acc.sync_gradients:
                    continue
                p.step += 1
                if p.step % cfg.train.log_every_n_steps == 0 or p.step == self.total_steps:
                    self._log_train(p.step, p.epoch)
                if p.step >= self.total_steps:
                    break
                if not acc.gradient_state.end_of_dataloader:  # the epoch end saves after its evaluation instead
                    self._maybe_save(stop, every_epoch=False)
            self._log_train(p.step, p.epoch, end_of_epoch=True)
            p.last_val = self.evaluate("val", p.epoch, p.step)
            self.checkpointer.update(acc.unwrap_model(self.model), self.processor, p.last_val, p.epoch, p.step)
            p.epoch, p.position = p.epoch + 1, 0
            self._maybe_save(stop, every_epoch=cfg.checkpoint.every_epoch and p.step < self.total_steps)
        acc.wait_for_everyone()  # the best weights are on disk before any rank reads them
        test = {}
        if "test" in self.loaders:
            self.checkpointer.load_best(acc.unwrap_model(self.model))
            test = self.evaluate("test", p.epoch - 1, p.step)
        summary = self._summary(test)
        self.tracker.write_summary(summary)
        self.states.mark_finished()
        return summary

    def _maybe_save(self, stop: StopRequest, every_epoch: bool) -> None:
        """Save the training state when due (steps, minutes, epoch end) or asked by a signal; all ranks agree first."""
        cfg, p = self.cfg.checkpoint, self.progress
        due_by_steps = bool(cfg.every_n_steps) and p.step % cfg.every_n_steps == 0
        due_by_time = bool(cfg.every_n_minutes) and time.time() - self.last_save >= 60 * cfg.every_n_minutes
        flags = [stop.requested, due_by_time]  # plain bools: a single process never waits for the device here
        if self.accelerator.num_processes > 1:
            # one rank's signal or clock decides for all: no rank may block alone in a collective
            flags = self.accelerator.reduce(torch.tensor(flags, device=self.accelerator.device).int(), "max").tolist()
        stopping, due_by_time = bool(flags[0]), bool(flags[1])
        if every_epoch or due_by_steps or due_by_time or stopping:
            self.save_state()
        if stopping:
            raise Stopped(f"stopped by signal at step {p.step}; the saved state continues the run", stop.signum)

    def save_state(self) -> Path:
        """Save everything resumable (model, optimizer, scheduler, scaler, progress, meter, best, RNG) atomically."""
        self.progress.wall_time = self._wall_time()
        self.segment_start = time.time()  # wall_time now holds everything up to here
        where = {"step": self.progress.step, "epoch": self.progress.epoch, "position": self.progress.position}
        path = self.states.save(
            self.progress.step, self.accelerator.unwrap_model(self.model), *self._resumable(), {**self.identity, **where}
        )
        self.last_save = time.time()
        log.info("saved training state %s", path)
        return path

    def _resumable(self) -> tuple[dict, dict]:
        """(objects shared by all ranks, objects each rank keeps for itself), each with state_dict/load_state_dict."""
        shared = {"optimizer": self.optimizer, "scheduler": self.scheduler, "progress": self.progress, "best": self.checkpointer}
        if self.accelerator.scaler is not None:
            shared["scaler"] = self.accelerator.scaler
        return shared, {"meter": self.meter}

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward, backward, clip and step (accelerate skips the step while accumulating); returns [loss sum, correct, n, skipped]."""
        if self.test_step_sleep:  # test hook (UTP_DIST_TEST_STEP_SLEEP): lets Slurm's timers catch a tiny run mid-training
            time.sleep(self.test_step_sleep)
        images, labels = self.decoders["train"](images, labels)  # data.decode: gpu; a no-op otherwise
        logits = self.model(pixel_values=self.device_input(images, augment=True)).logits
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.train.label_smoothing, ignore_index=IGNORE_LABEL)
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients and self.cfg.optim.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        if self.accelerator.sync_gradients and not self.accelerator.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        valid = labels != IGNORE_LABEL
        with torch.no_grad():
            n = valid.sum()
            correct = ((logits.argmax(-1) == labels) & valid).sum()
            return torch.stack([loss.detach().double() * n, correct.double(), n.double(), (~valid).sum().double()])

    @torch.no_grad()
    def evaluate(self, split: str, epoch: int, step: int) -> dict[str, float]:
        """Every metric over exactly the whole split (gather_for_metrics drops the sampler's padding)."""
        self.model.eval()
        if split not in self.metrics:
            self.metrics[split] = EvalMetrics(len(self.classes), self.cfg.train.eval_topk, self.accelerator.device)
        metrics = self.metrics[split]
        metrics.reset()
        for images, labels in self.loaders[split]:
            images, labels = self.decoders[split](images, labels)
            logits = self.model(pixel_values=self.device_input(images)).logits
            metrics.update(*self.accelerator.gather_for_metrics((logits, labels)))
        values, confusion, roc = metrics.compute(split)
        # training throughput so far rides along, so `submit status` reads progress and speed from one file
        speed = {"train_img_per_s": round(self.meter.images / self.meter.train_time, 1)} if split == "val" and self.meter.train_time else {}
        self.tracker.log_eval(split, values, epoch, step, confusion, roc, self.classes, speed)
        self.model.train()
        return values

    def _open_run(self) -> None:
        """Continue a saved state or claim a new run folder (main process decides), then build this rank's writers."""
        acc, cfg = self.accelerator, self.cfg
        base = base_name(cfg)
        found = [find_state(cfg, self.splits.name, base) if acc.is_main_process else None]
        found = broadcast_object_list(found, from_process=0)[0]
        micro_batch = cfg.data.batch_size * acc.num_processes
        images = sum(len(v) for v in self.splits.samples.values())
        data_hash = hashlib.sha256(json.dumps(self.splits.fingerprint()).encode()).hexdigest()[:16]
        if found is not None:
            saved = read_identity(found)
            current = identity(cfg, data_hash, images, __version__, micro_batch, saved["paths"])
            check(found, saved, current, cfg.checkpoint.allow_changes, mid_epoch=saved["position"] > 0)
            self.paths = RunDir.of_state(found)
        else:
            paths = [RunDir.create(cfg.output.root, self.splits.name, base) if acc.is_main_process else None]
            self.paths = broadcast_object_list(paths, from_process=0)[0]
        self.identity = identity(
            cfg,
            data_hash,
            images,
            __version__,
            micro_batch,
            {"name": self.paths.name, "logs": str(self.paths.logs), "checkpoints": str(self.paths.checkpoints)},
        )
        main = acc.is_main_process
        self.progress, self.meter = Progress(), Meter(acc)
        ckpt_cls = Checkpointer if main else NullCheckpointer
        self.checkpointer = ckpt_cls(
            self.paths.checkpoints, cfg.train.monitor_metric, cfg.train.monitor_mode, cfg.output.save_per_epoch_checkpoint
        )
        self.states = TrainingStates(self.paths.checkpoints, acc, cfg.checkpoint.keep_last)
        if found is not None:
            self.states.load(found, acc.unwrap_model(self.model), *self._resumable())
            self.progress.restarts += 1
            acc.step = 0  # states are saved right after an optimizer step: accumulation restarts from zero
            log.info(
                "resuming %s from %s (step %d, epoch %d, restart %d)",
                self.paths.name,
                found,
                self.progress.step,
                self.progress.epoch,
                self.progress.restarts,
            )
        resume_step = self.progress.step if found is not None else None
        self.tracker = Tracker(self.paths.logs, self.total_steps, resume_step) if main else NullTracker()
        self.segment_start = self.last_save = time.time()
        self.tracker.write_text("config.yaml", cfg.to_yaml())
        self.tracker.log_text("config", "```yaml\n" + cfg.to_yaml() + "\n```", self.progress.step)
        self.tracker.log_text("run", self.describe().replace("\n", "  \n"), self.progress.step)
        log.info("run %s: logs in %s, checkpoints in %s", self.paths.name, self.paths.logs, self.paths.checkpoints)

    def _wall_time(self) -> float:
        """Seconds of this run over all its segments (restarts included)."""
        return self.progress.wall_time + time.time() - self.segment_start

    def _log_train(self, step: int, epoch: int, end_of_epoch: bool = False) -> None:
        """Log mean training loss/acc over all ranks since the last point (or the epoch), the lr and img/s."""
        window = self.meter.flush(step, end_of_epoch)
        if window is None:
            return
        lr, values = self.scheduler.get_last_lr()[0], {}
        mfu = self._mfu(window["img_per_s"])
        if window["count"]:
            values = {
                "train/loss": window["loss"],
                "train/acc": window["acc"],
                "train/lr": lr,
                "train/img_per_s": window["img_per_s"],
                "train/data_wait": window["data_wait"],
                **({"train/mfu": mfu} if mfu is not None else {}),
            }
        if end_of_epoch:
            values.update({"epoch/train_loss": window["epoch_loss"], "epoch/train_acc": window["epoch_acc"]})
        self.tracker.log_scalars(values, step)
        if not window["count"]:
            return
        postfix = {
            "epoch": str(epoch),
            "loss": f"{window['loss']:.4f}",
            "lr": f"{lr:.2e}",
            "img/s": f"{window['img_per_s']:.0f}",
            "wait": f"{window['data_wait']:.0%}",
            **({"mfu": f"{mfu:.0%}"} if mfu is not None else {}),
        }
        self.tracker.progress(window["steps"], postfix)

    def _mfu(self, img_per_s: float) -> float | None:
        """Model FLOPs utilisation: achieved training FLOP/s over the peak of all devices; None without a peak or a count."""
        if self.flops_per_image is None or self.peak_tflops is None:
            return None
        return img_per_s * self.flops_per_image / (self.peak_tflops * 1e12 * self.accelerator.num_processes)

    def _summary(self, test: dict) -> dict:
        acc, best, p, meter = self.accelerator, self.checkpointer.best or {}, self.progress, self.meter
        last = p.last_val
        return {
            "run_name": self.paths.name,
            "version": __version__,
            "config_hash": self.cfg.fingerprint(),
            "best": {"metric": self.cfg.train.monitor_metric, "mode": self.cfg.train.monitor_mode, **best},
            "final_val": last,
            "test": test,
            "steps": p.step,
            "last_epoch": p.epoch - 1,
            "restarts": p.restarts,
            "train_images": meter.images,
            "skipped_images": {
                "train": meter.skipped,
                "val": last.get("val_skipped_images", 0),
                "test": test.get("test_skipped_images", 0),
            },
            "train_img_per_s": meter.images / max(meter.train_time, 1e-9),
            "data_wait_fraction": meter.wait_time / max(meter.train_time, 1e-9),
            "decode_cpu_fallbacks": sum(decoder.cpu_fallbacks for decoder in self.decoders.values()),  # this rank's
            "mfu": self._mfu(meter.images / max(meter.train_time, 1e-9)),
            "train_gflops_per_image": self.flops_per_image / 1e9 if self.flops_per_image else None,
            "peak_tflops_per_device": self.peak_tflops,
            "wall_time_s": self._wall_time(),
            "world_size": acc.num_processes,
            "distributed_type": acc.distributed_type.value,
            "backend": acc.state.backend or "none",
            "device": str(acc.device),
            "mixed_precision": acc.mixed_precision,
            "global_batch": self.global_batch,
            "paths": {
                "logs": str(self.paths.logs),
                "checkpoints": str(self.paths.checkpoints),
                "best_model": str(self.checkpointer.best_dir),
            },
        }


class Meter:
    """Training loss/acc/throughput on the device between log points; summed over ranks only when logged."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        device = accelerator.device
        self.window = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, correct, count, skipped
        self.epoch = torch.zeros(4, device=device, dtype=torch.float64)
        self.skipped = 0
        self.images, self.train_time, self.logged_step, self.tick = 0, 0.0, 0, time.perf_counter()
        self.wait, self.wait_time = 0.0, 0.0  # seconds the loop waited for batches: this window, all windows

    def state_dict(self) -> dict:
        """Unreported sums and totals, so a resumed run logs exactly what an uninterrupted one would."""
        return {
            "window": self.window.cpu(),
            "epoch": self.epoch.cpu(),
            "skipped": self.skipped,
            "images": self.images,
            "train_time": self.train_time,
            "logged_step": self.logged_step,
            "wait_time": self.wait_time,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""
        self.window.copy_(state["window"])
        self.epoch.copy_(state["epoch"])
        self.skipped, self.images, self.train_time, self.logged_step = (
            state["skipped"],
            state["images"],
            state["train_time"],
            state["logged_step"],
        )
        self.wait_time = state.get("wait_time", 0.0)

    def timed(self, loader):
        """Iterate `loader`, adding the time spent waiting for each batch to the data-wait clock."""
        batches = iter(loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.wait += time.perf_counter() - start
            yield batch

    def add(self, stats: torch.Tensor) -> None:
        """Add one micro-batch's [loss sum, correct, count] without a host sync."""
        self.window += stats
        self.epoch += stats

    def resume(self) -> None:
        """Restart the clock after evaluation, so img/s counts training only."""
        self.tick = time.perf_counter()

    def flush(self, step: int, end_of_epoch: bool) -> dict | None:
        """Reduce over ranks and reset; None when there is nothing new to report."""
        now = time.perf_counter()
        stats = self.accelerator.reduce(torch.cat([self.window, self.epoch]), "sum").tolist()
        loss, correct, count, _, e_loss, e_correct, e_count, e_skipped = stats
        self.window.zero_()
        if end_of_epoch:
            self.epoch.zero_()
            self.skipped = int(e_skipped)  # bad images are skipped every epoch: report one epoch's count
        if count == 0 and not end_of_epoch:
            return None
        elapsed, self.tick = now - self.tick, now
        self.train_time += elapsed
        self.images += int(count)
        wait, self.wait = self.wait, 0.0
        self.wait_time += wait
        steps, self.logged_step = step - self.logged_step, step
        return {
            "loss": loss / max(count, 1),
            "acc": correct / max(count, 1),
            "img_per_s": count / max(elapsed, 1e-9),
            "data_wait": min(1.0, wait / max(elapsed, 1e-9)),
            "epoch_loss": e_loss / max(e_count, 1),
            "epoch_acc": e_correct / max(e_count, 1),
            "steps": steps,
            "count": count,
        }


@dataclass
class Progress:
    """Where the run stands; part of every training state."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Epoch in progress (or the next one, at an epoch end)."""
    position: int = 0
    """Micro-batches of `epoch` this rank has trained."""
    restarts: int = 0
    """How many times the run was resumed."""
    wall_time: float = 0.0
    """Seconds spent in earlier segments."""
    last_val: dict = field(default_factory=dict)
    """Metrics of the latest validation."""

    def state_dict(self) -> dict:
        """All fields, as plain values."""
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore all fields."""
        self.__dict__.update(state)
