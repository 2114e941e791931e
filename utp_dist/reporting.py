"""What a run tells the user: training windows (loss, acc, lr, img/s, data wait, MFU), one console line per epoch and
the summary. Numbers are measured here on every rank; a Tracker writes them (a NullTracker on all but the main process)."""

from __future__ import annotations

import math
import time

import torch
from accelerate import Accelerator

from utp_dist.config import OptimConfig
from utp_dist.errors import UserError
from utp_dist.tracking import Tracker
from utp_dist.version import __version__


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite: the run stops before any state holds such weights."""


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
        self.first_bad = torch.full((), math.inf, device=device, dtype=torch.float64)  # first step with a non-finite loss

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

    def add(self, stats: torch.Tensor, step: int) -> None:
        """Add one micro-batch's [loss sum, correct, count, skipped] of optimizer step `step`, without a host sync."""
        self.window += stats
        self.epoch += stats
        # a device-side where, not an if: noticing a NaN must not cost a host sync per step
        self.first_bad = torch.where(torch.isfinite(stats[0]), self.first_bad, self.first_bad.clamp(max=step))

    def first_nonfinite_step(self) -> int | None:
        """The first optimizer step whose loss was NaN or infinite on any rank (a collective), None if there is none."""
        first = -self.accelerator.reduce(-self.first_bad, "max").item()  # accelerate reduces by max, not min
        return None if math.isinf(first) else int(first)

    def resume(self) -> None:
        """Restart the clock after evaluation, so img/s counts training only."""
        self.tick = time.perf_counter()

    def flush(self, step: int, end_of_epoch: bool, riders: list[float] = ()) -> tuple[dict | None, list[float]]:
        """Reduce over ranks and reset: (the window, None when there is nothing new to report; `riders` summed over
        ranks, values another part needs agreed at this point, in the same collective instead of one of its own)."""
        now = time.perf_counter()
        extra = torch.tensor(riders, device=self.window.device, dtype=torch.float64)
        stats = self.accelerator.reduce(torch.cat([self.window, self.epoch, extra]), "sum").tolist()
        (loss, correct, count, _, e_loss, e_correct, e_count, e_skipped), riders = stats[:8], stats[8:]
        self.window.zero_()
        if end_of_epoch:
            self.epoch.zero_()
            self.skipped = int(e_skipped)  # bad images are skipped every epoch: report one epoch's count
        if count == 0 and not end_of_epoch:
            return None, riders
        elapsed, self.tick = now - self.tick, now
        self.train_time += elapsed
        self.images += int(count)
        wait, self.wait = self.wait, 0.0
        self.wait_time += wait
        steps, self.logged_step = step - self.logged_step, step
        window = {
            "loss": loss / max(count, 1),
            "acc": correct / max(count, 1),
            "img_per_s": count / max(elapsed, 1e-9),
            "data_wait": min(1.0, wait / max(elapsed, 1e-9)),
            "epoch_loss": e_loss / max(e_count, 1),
            "epoch_acc": e_correct / max(e_count, 1),
            "steps": steps,
            "count": count,
        }
        return window, riders

    def img_per_s(self) -> float:
        """Training images per second over the whole run so far."""
        return self.images / max(self.train_time, 1e-9)


class Reporter:
    """Turns the meter's windows into logged scalars, the progress bar, the per-epoch line and the summary."""

    def __init__(
        self,
        accelerator: Accelerator,
        tracker: Tracker,
        flops_per_image: float | None,
        peak_tflops: float | None,
        optim: OptimConfig,
        loss: str = "cross_entropy",
    ):
        self.accelerator, self.tracker, self.optim, self.loss = accelerator, tracker, optim, loss
        self.flops_per_image, self.peak_tflops = flops_per_image, peak_tflops
        self.meter = Meter(accelerator)
        self.epoch_train_loss: float | None = None
        self.epoch_start = time.perf_counter()

    def check_finite(self) -> None:
        """Stop with a one-line error if any rank's loss was NaN or infinite (a collective: every rank calls it)."""
        step = self.meter.first_nonfinite_step()
        if step is not None:
            raise self._nonfinite(step)

    def _nonfinite(self, step: int) -> NonFiniteLoss:
        if step == 1:  # computed before any weight update: the loss itself, not the learning rate
            return NonFiniteLoss(
                f"the training loss is not finite (NaN or inf) at step 1, before any weight update: train.loss '{self.loss}' "
                "gives NaN or inf on the first batches; check the loss function and train.loss_options"
            )
        clip = f"lower optim.max_grad_norm (now {self.optim.max_grad_norm})" if self.optim.max_grad_norm else "set optim.max_grad_norm"
        return NonFiniteLoss(
            f"the training loss is not finite (NaN or inf) at step {step}: lower optim.lr (now {self.optim.lr:g}) or {clip} "
            f"to clip gradients, and start a new run (checkpoint.resume=never); the states saved before step {step} stay complete"
        )

    def log_train(self, step: int, epoch: int, lr: float, end_of_epoch: bool = False, riders: list[float] = ()) -> list[float]:
        """Log mean training loss/acc over all ranks since the last point (or the epoch), the lr, img/s and MFU; return
        `riders` summed over ranks in the same collective (Meter.flush)."""
        window, riders = self.meter.flush(step, end_of_epoch, riders)
        if window is None:
            return riders
        if not math.isfinite(window["loss"] + window["epoch_loss"]):
            raise self._nonfinite(self.meter.first_nonfinite_step())
        values, mfu = {}, self.mfu(window["img_per_s"])
        if window["count"]:
            values = {"train/loss": window["loss"], "train/acc": window["acc"], "train/lr": lr, "train/img_per_s": window["img_per_s"]}
            values.update({"train/data_wait": window["data_wait"], **({"train/mfu": mfu} if mfu is not None else {})})
        if end_of_epoch:
            values.update({"epoch/train_loss": window["epoch_loss"], "epoch/train_acc": window["epoch_acc"]})
            self.epoch_train_loss = window["epoch_loss"]
        self.tracker.log_scalars(values, step)
        self.tracker.write_position({"epoch": epoch, "step": step, "img_per_s": window["img_per_s"] if window["count"] else None})
        if window["count"]:
            # the bar counts epochs from 1, as the epoch lines do
            postfix = {"epoch": str(epoch + 1), "loss": f"{window['loss']:.4f}", "lr": f"{lr:.2e}", "img/s": f"{window['img_per_s']:.0f}"}
            postfix.update({"wait": f"{window['data_wait']:.0%}", **({"mfu": f"{mfu:.0%}"} if mfu is not None else {})})
            self.tracker.progress(window["steps"], postfix)
        return riders

    def epoch_line(self, epoch: int, epochs: int, val: dict, best: dict | None) -> None:
        """One console line after each evaluation: epoch, train loss, val loss, monitored metric, best so far, epoch time."""
        now = time.perf_counter()
        seconds, self.epoch_start = now - self.epoch_start, now  # from the previous evaluation's end: the epoch as a user waits for it
        metric = (best or {}).get("metric", "val_acc@1")
        parts = [f"epoch {epoch + 1}/{epochs}", f"train_loss {_fmt(self.epoch_train_loss)}", f"val_loss {_fmt(val.get('val_loss'))}"]
        parts += [f"{name} {_fmt(val.get(name))}" for name in dict.fromkeys(["val_acc@1", metric]) if name != "val_loss"]
        if best and "value" in best:
            parts.append(f"best {metric} {_fmt(best['value'])} (epoch {best['epoch'] + 1})")
        self.tracker.print(", ".join(parts) + f", {seconds:.1f} s")

    def mfu(self, img_per_s: float) -> float | None:
        """Model FLOPs utilisation: achieved training FLOP/s over the peak of all devices; None without a peak or a count."""
        if self.flops_per_image is None or self.peak_tflops is None:
            return None
        return img_per_s * self.flops_per_image / (self.peak_tflops * 1e12 * self.accelerator.num_processes)

    def summary(self, run, cfg, progress, best: dict | None, test: dict, global_batch: int, decode_cpu_fallbacks: int) -> dict:
        """summary.json: the best and final metrics, test metrics of the best weights, speed, and where things are."""
        acc, meter, last = self.accelerator, self.meter, progress.last_val
        return {
            "run_name": run.name,
            "version": __version__,
            "config_hash": cfg.fingerprint(),
            "best": {"metric": cfg.train.monitor_metric, "mode": cfg.train.monitor_mode, **(best or {})},
            "final_val": last,
            "test": test,
            "steps": progress.step,
            "last_epoch": progress.epoch - 1,
            "restarts": progress.restarts,
            "train_images": meter.images,
            "skipped_images": {
                "train": meter.skipped,
                "val": last.get("val_skipped_images", 0),
                "test": test.get("test_skipped_images", 0),
            },
            "train_img_per_s": meter.img_per_s(),
            "data_wait_fraction": meter.wait_time / max(meter.train_time, 1e-9),
            "decode_cpu_fallbacks": decode_cpu_fallbacks,  # this rank's
            "mfu": self.mfu(meter.img_per_s()),
            "train_gflops_per_image": self.flops_per_image / 1e9 if self.flops_per_image else None,
            "peak_tflops_per_device": self.peak_tflops,
            "wall_time_s": progress.elapsed(),
            "world_size": acc.num_processes,
            "distributed_type": acc.distributed_type.value,
            "backend": acc.state.backend or "none",
            "device": str(acc.device),
            "mixed_precision": acc.mixed_precision,
            "global_batch": global_batch,
            "paths": run.describe(),
        }


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"
