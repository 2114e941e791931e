"""The training loop: Accelerate set-up, fit(), the train step and evaluation."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import gather_object, set_seed

from utp_dist import rank_failure
from utp_dist.callbacks import Callbacks
from utp_dist.config import Config
from utp_dist.data.batch_transforms import build_batch_transform
from utp_dist.data.device_input import DeviceInput, ModelInput
from utp_dist.data.loaders import IGNORE_LABEL, build_loaders
from utp_dist.data.user_datasets import build_splits
from utp_dist.errors import UserError, first_line
from utp_dist.flops import peak_tflops, train_flops_per_image
from utp_dist.losses import build_loss, checked_loss
from utp_dist.metrics import EvalMetrics
from utp_dist.model import exported_processor, input_spec, is_convolutional
from utp_dist.optim import build_optimizer, build_scheduler, optimizer_steps
from utp_dist.preemption import StopRequest
from utp_dist.registry import MODELS
from utp_dist.reporting import Reporter
from utp_dist.store.checkpoint import BestModel, Checkpointer, NullBestModel, rng_state, set_rng_state
from utp_dist.store.resume import open_run
from utp_dist.tracking import NullTracker, TensorBoardTracker

log = logging.getLogger(__name__)


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state, so another run in this process (debug executor, tests) configures its own."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def compiled(model: torch.nn.Module, model_input: ModelInput, spec, batch_size: int) -> torch.nn.Module:
    """torch.compile the model and try a training forward + backward at the real batch size, so the graphs training
    uses are the ones compiled; a model that fails to compile runs eager after one warning."""
    fast = torch.compile(model)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    rng = rng_state()
    try:
        probe = torch.zeros(batch_size, 3, *spec.size, dtype=torch.uint8, device=model_input.mean.device)
        fast(pixel_values=model_input(probe)).logits.float().sum().backward()
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
    rank_failure.watch()  # from here on, a failure on one rank ends every rank (nothing to watch in a single process)
    if accelerator.num_processes > 1:
        # every rank must train the same run: compare config hashes before any rank touches data or files
        hashes = gather_object([cfg.fingerprint()])
        if len(set(hashes)) > 1:
            odd = next(rank for rank, h in enumerate(hashes) if h != hashes[0])
            raise UserError(f"rank {odd} was given a different config than rank 0; launch every rank with the same file and overrides")
    return accelerator


class Trainer:
    """Builds every component of a run from its config; fit() trains, evaluates, checkpoints and reports.

    With `dry_run`, nothing is claimed or written: the components are built for describe() only.
    """

    def __init__(self, cfg: Config, dry_run: bool = False):
        self.cfg = cfg
        self.accelerator = acc = build_accelerator(cfg)
        set_seed(cfg.train.seed)
        self.splits = build_splits(cfg.data, cfg.train.seed)
        self.classes = self.splits.classes
        if max(cfg.train.eval_topk) > len(self.classes):
            k, n = max(cfg.train.eval_topk), len(self.classes)
            raise UserError(f"train.eval_topk: acc@{k} needs at least {k} classes and {self.splits.root} has {n}; use values up to {n}")
        self.model, self.processor = MODELS.get(cfg.model.builder)(cfg.model, self.classes, cfg.data.image_size)
        self.loss, self.progress = build_loss(cfg.train), Progress()  # progress keys the batch transform (bench steps too)
        self.batch_transform = build_batch_transform(cfg.data, len(self.classes), cfg.train.seed, acc.process_index)
        self.spec = input_spec(self.processor, cfg.data.image_size)
        self.processor = exported_processor(self.processor, self.spec)  # the export describes this very input
        pin = cfg.data.pin_memory if cfg.data.pin_memory is not None else acc.device.type == "cuda"
        split_loaders = build_loaders(self.splits, self.spec, cfg.data, cfg.train.seed, acc.num_processes, pin)
        self.samplers = {split: s.sampler for split, s in split_loaders.items()}
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
        default_cl = acc.device.type == "cuda" and is_convolutional(self.model)
        channels_last = cfg.model.channels_last if cfg.model.channels_last is not None else default_cl
        self.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.inputs = DeviceInput(cfg.data, self.spec, split_loaders, cfg.train.seed, acc.device, channels_last)
        if cfg.train.sync_batchnorm and acc.num_processes > 1:
            if acc.device.type != "cuda":
                raise UserError("train.sync_batchnorm: torch's SyncBatchNorm works on GPUs only; set it to false on CPU")
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model, self.optimizer, *loaders = acc.prepare(self.model, self.optimizer, *(s.loader for s in split_loaders.values()))
        self.loaders = dict(zip(split_loaders, loaders, strict=True))
        if cfg.train.compile:
            self.model = compiled(self.model, self.inputs.model_input, self.spec, cfg.data.batch_size)
        metrics = (len(self.classes), cfg.train.eval_topk, acc.device, cfg.train.metrics)
        self.metrics = {split: EvalMetrics(*metrics) for split in self.loaders if split != "train"}
        if not dry_run:
            self._build_run()

    def _build_run(self) -> None:
        """Claim or continue the run folder, then this rank's writers (do-nothing ones off the main process)."""
        cfg, acc, main = self.cfg, self.accelerator, self.accelerator.is_main_process
        self.callbacks = Callbacks(cfg.train.callbacks, main)  # before the claim: a bad name leaves no run folder behind
        opened = open_run(cfg, acc, self.splits, self.total_steps)
        self.run, self.lock, self.resumed = opened.run, opened.lock, opened.state is not None
        self.stop = StopRequest()
        self.best = (BestModel if main else NullBestModel)(
            self.run, cfg.train.monitor_metric, cfg.train.monitor_mode, cfg.output.save_per_epoch_checkpoint
        )
        # only the main process reports MFU: the other ranks skip the count (about 1 s for ViT-B/16)
        flops = train_flops_per_image(self.model, self.spec.size) if main else None
        peak = peak_tflops(cfg.train.peak_tflops, acc.device, acc.mixed_precision)
        self.reporter = Reporter(acc, NullTracker(), flops, peak, cfg.optim, cfg.train.loss)
        ck = (self.run, acc, cfg.checkpoint, self.stop, cfg.train.log_every_n_steps, self.callbacks, self.reporter.check_finite)
        self.checkpointer = Checkpointer(*ck)
        shared = {"optimizer": self.optimizer, "scheduler": self.scheduler, "progress": self.progress, "best": self.best}
        if acc.scaler is not None:
            shared["scaler"] = acc.scaler
        self.checkpointer.track(acc.unwrap_model(self.model), self.progress, shared, {"meter": self.reporter.meter}, opened.identity)
        if opened.state is not None:
            self._resume(opened.state)
        resume_step = self.progress.step if opened.state is not None else None
        bar_start = self.reporter.meter.logged_step  # the bar advances by logged steps: it starts at the last one logged
        self.tracker = TensorBoardTracker(self.run, self.total_steps, resume_step, bar_start) if main else NullTracker()
        self.reporter.tracker = self.tracker
        self.tracker.write_config(cfg.to_yaml())
        self.tracker.log_text("config", "```yaml\n" + cfg.to_yaml() + "\n```", self.progress.step)
        self.tracker.log_text("run", self.describe().replace("\n", "  \n"), self.progress.step)
        log.info("run %s: logs in %s, checkpoints in %s", self.run.name, self.run.logs, self.run.checkpoints)

    def _resume(self, state) -> None:
        p = self.progress
        self.checkpointer.load(state)
        p.restarts += 1
        self.accelerator.step = 0  # states are saved right after an optimizer step: accumulation restarts from zero
        log.info("resuming %s from %s (step %d, epoch %d, restart %d)", self.run.name, state, p.step, p.epoch, p.restarts)

    def describe(self) -> str:
        """What --dry-run prints: classes, images per split after caps, parameters, steps, batches."""
        model, acc = self.accelerator.unwrap_model(self.model), self.accelerator
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        counts = ", ".join(f"{s} {len(v)}" for s, v in self.splits.samples.items())
        return "\n".join([
            f"data: {self.splits.root} ({len(self.classes)} classes: {', '.join(self.classes)})",
            f"images after caps: {counts}",
            f"model: {type(model).__name__} ({model.config.model_type}), {total:,} parameters, {trainable:,} trainable",
            f"input: {self.spec.size[0]}x{self.spec.size[1]}, mean {self.spec.mean}, std {self.spec.std}",
            f"world size {acc.num_processes} ({acc.distributed_type.value}), device {acc.device}, precision {acc.mixed_precision}",
            f"global batch {self.global_batch} = {self.cfg.data.batch_size} per device x "
            f"{acc.num_processes} processes x {self.cfg.optim.grad_accum_steps} accumulation",
            f"optimizer steps: {self.total_steps} over {self.cfg.train.epochs} epochs",
        ])  # fmt: skip

    def fit(self) -> dict:
        """Train (or continue) the run: evaluate every epoch, save states, test the best weights; return the summary."""
        self.stop.install()
        failed = True
        try:
            summary = self._fit()
            failed = False
            return summary
        finally:
            self.stop.uninstall()
            self.tracker.close()  # flushes TensorBoard and ends the progress bar line, also on errors
            if failed and not self.resumed and self.accelerator.is_main_process:
                self.run.discard_if_unused()  # a start that failed before writing anything leaves no folder (nor a -v1 next)
            if self.lock is not None:
                self.lock.release()

    def _fit(self) -> dict:
        cfg, acc, p, meter = self.cfg, self.accelerator, self.progress, self.reporter.meter
        micro_batch = cfg.data.batch_size * acc.num_processes
        self.callbacks.on_fit_start(p.step)
        while p.epoch < cfg.train.epochs and p.step < self.total_steps:
            self.loaders["train"].set_epoch(p.epoch)  # accelerate's loader passes it to the sampler on every iteration
            self.samplers["train"].skip_once(p.position * micro_batch)
            self.model.train()
            meter.resume()
            for images, labels in meter.timed(self.loaders["train"]):
                with acc.accumulate(self.model):
                    meter.add(self.train_step(images, labels), p.step + 1)
                p.position += 1
                if not acc.sync_gradients:
                    continue
                p.step += 1
                self.callbacks.on_step_end(p.step)
                if p.step % cfg.train.log_every_n_steps == 0 or p.step == self.total_steps:
                    self.reporter.log_train(p.step, p.epoch, self.scheduler.get_last_lr()[0])
                if p.step >= self.total_steps:
                    break
                if not acc.gradient_state.end_of_dataloader:  # the epoch end saves after its evaluation instead
                    self.checkpointer.maybe_save()
            self.reporter.log_train(p.step, p.epoch, self.scheduler.get_last_lr()[0], end_of_epoch=True)
            p.last_val = self.evaluate("val", p.epoch, p.step)
            self.best.update(acc.unwrap_model(self.model), self.processor, p.last_val, p.epoch, p.step)
            self.reporter.epoch_line(p.epoch, cfg.train.epochs, p.last_val, self.best.best)
            p.epoch, p.position = p.epoch + 1, 0
            self.checkpointer.maybe_save(epoch_end=True, save_epoch=cfg.checkpoint.every_epoch and p.step < self.total_steps)
            if p.epoch == cfg.train.stop_at_epoch and p.epoch < cfg.train.epochs and p.step < self.total_steps:
                self.checkpointer.pause(f"paused at epoch {p.epoch} (train.stop_at_epoch)")  # every rank: the same config
        self.checkpointer.save_final()  # so a finished run can be continued exactly when train.epochs grows
        acc.wait_for_everyone()  # the best weights are on disk before any rank reads them
        test = {}
        if "test" in self.loaders and self.best.best is not None:  # no finite monitored value: nothing was exported
            self.best.load_best(acc.unwrap_model(self.model))
            test = self.evaluate("test", p.epoch - 1, p.step)
        summary = self.reporter.summary(self.run, cfg, p, self.best.best, test, self.global_batch, self.inputs.cpu_fallbacks)
        self.tracker.write_summary(summary)
        self.checkpointer.mark_finished()
        self.callbacks.on_fit_end(summary)
        return summary

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward, backward, clip and step (accelerate skips the step while accumulating); returns [loss sum, correct, n, skipped]."""
        pixels, labels = self.inputs("train", images, labels)
        pixels, targets = self.batch_transform(pixels, labels, (self.progress.epoch, self.progress.position))  # MixUp, CutMix, ...
        logits = self.model(pixel_values=pixels).logits
        loss = checked_loss(self.loss(logits.float(), targets), self.cfg.train.loss)
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
        metrics = self.metrics[split]
        metrics.reset()
        for images, labels in self.loaders[split]:
            pixels, labels = self.inputs(split, images, labels)
            logits = self.model(pixel_values=pixels).logits
            metrics.update(*self.accelerator.gather_for_metrics((logits, labels)))
        values, confusion, roc = metrics.compute(split)
        # training throughput so far rides along, so `submit status` reads progress and speed from one file
        meter = self.reporter.meter
        speed = {"train_img_per_s": round(meter.img_per_s(), 1)} if split == "val" and meter.train_time else {}
        self.tracker.log_eval(split, values, epoch, step, confusion, roc, self.classes, speed)
        self.callbacks.on_evaluate(split, values, step)
        self.model.train()
        return values


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

    def __post_init__(self) -> None:
        self._segment_start = time.time()  # not a field: each process segment starts its own clock

    def elapsed(self) -> float:
        """Seconds of this run over all its segments (restarts included)."""
        return self.wall_time + time.time() - self._segment_start

    def state_dict(self) -> dict:
        """All fields, as plain values; wall_time includes this segment up to now."""
        return {**asdict(self), "wall_time": self.elapsed()}

    def load_state_dict(self, state: dict) -> None:
        """Restore all fields; this segment's clock starts now."""
        self.__dict__.update(state)
        self._segment_start = time.time()
