"""The TorchMetrics evaluation suite and its figures (confusion matrix, micro-averaged ROC)."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure  # not pyplot: figures are drawn off the main thread, without a window
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassAveragePrecision,
    MulticlassCalibrationError,
    MulticlassCohenKappa,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MulticlassROC,
)

from utp_dist.config import ConfigError, metric_key
from utp_dist.registry import METRICS


class EvalMetrics:
    """Accumulates logits and labels of one split; compute() returns every scalar plus the figures' inputs."""

    def __init__(self, num_classes: int, topk: list[int], device: torch.device, extra: list[str] = ()):
        # inputs are already gathered across ranks (gather_for_metrics), so torchmetrics must not sync again
        kw = {"num_classes": num_classes, "sync_on_compute": False}
        scalars = {f"acc@{k}": MulticlassAccuracy(top_k=k, average="micro", **kw) for k in topk}
        scalars.update(
            f1_macro=MulticlassF1Score(average="macro", **kw),
            map_macro=MulticlassAveragePrecision(average="macro", **kw),
            auroc_macro=MulticlassAUROC(average="macro", **kw),
            kappa=MulticlassCohenKappa(**kw),
            recall_micro=MulticlassRecall(average="micro", **kw),
            recall_macro=MulticlassRecall(average="macro", **kw),
        )
        for spec in extra:  # train.metrics
            scalars[_unique(metric_key(spec), scalars)] = metric = METRICS.get(spec)(num_classes)
            if not isinstance(metric, Metric):
                raise ConfigError(
                    f"train.metrics: '{spec}' returned a value of type {type(metric).__name__}; a metric factory returns a torchmetrics Metric"
                )
            metric.sync_on_compute = False
        self.scalars = MetricCollection(scalars).to(device)
        self.confusion = MulticlassConfusionMatrix(**kw).to(device)
        self.roc = MulticlassROC(average="micro", **kw).to(device)
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.count = self.skipped = 0

    def reset(self) -> None:
        """Forget every update, to evaluate again (cheaper than building the suite anew)."""
        for metric in (self.scalars, self.confusion, self.roc):
            metric.reset()
        self.loss_sum.zero_()
        self.count = self.skipped = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one gathered batch; labels < 0 (skipped bad images) are ignored."""
        keep = labels >= 0
        self.skipped += int((~keep).sum())
        logits, labels = logits[keep].float(), labels[keep]
        if not len(labels):
            return
        self.loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
        self.count += len(labels)
        probs = logits.softmax(dim=-1)
        self.scalars.update(probs, labels)
        self.confusion.update(probs, labels)
        self.roc.update(probs, labels)

    def compute(self, prefix: str) -> tuple[dict[str, float], torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """({prefix_metric: value}, confusion matrix, (fpr, tpr) of the micro ROC)."""
        values = {f"{prefix}_loss": (self.loss_sum / max(self.count, 1)).item(), f"{prefix}_images": self.count}
        values[f"{prefix}_skipped_images"] = self.skipped
        values.update({f"{prefix}_{k}": v.item() for k, v in self.scalars.compute().items()})
        fpr, tpr, _ = self.roc.compute()
        return values, self.confusion.compute().cpu(), (fpr.cpu(), tpr.cpu())


def _unique(name: str, scalars: dict) -> str:
    if name in scalars:
        raise ConfigError(f"train.metrics: '{name}' is already computed; choose another name")
    return name


def precision_macro(num_classes: int) -> Metric:
    """Macro-averaged precision (train.metrics: precision_macro)."""
    return MulticlassPrecision(num_classes=num_classes, average="macro")


def calibration_error(num_classes: int) -> Metric:
    """Expected calibration error over 15 bins (train.metrics: calibration_error)."""
    return MulticlassCalibrationError(num_classes=num_classes, n_bins=15)


def confusion_markdown(matrix: torch.Tensor, classes: list[str]) -> str:
    """Rows = true class, columns = predicted class, as a Markdown table."""
    head = "| true \\ pred | " + " | ".join(classes) + " |\n|---|" + "---|" * len(classes) + "\n"
    rows = [f"| {name} | " + " | ".join(str(int(v)) for v in row) + " |" for name, row in zip(classes, matrix.tolist(), strict=True)]
    return head + "\n".join(rows)


def confusion_figure(matrix: torch.Tensor, classes: list[str], title: str) -> Figure:
    """Heat map of the confusion matrix with counts."""
    n = len(classes)
    fig = Figure(figsize=(1.2 + 0.55 * n, 1 + 0.5 * n), dpi=100)
    ax = fig.subplots()
    ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    peak = max(int(matrix.max()), 1)
    for i in range(n):
        for j in range(n):
            value = int(matrix[i, j])
            ax.text(j, i, value, ha="center", va="center", fontsize=8, color="white" if value > peak / 2 else "black")
    fig.tight_layout()
    return fig


def roc_figure(fpr: torch.Tensor, tpr: torch.Tensor, auc: float | None, title: str) -> Figure:
    """Micro-averaged ROC curve."""
    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    ax = fig.subplots()
    ax.plot(fpr.numpy(), tpr.numpy(), label="micro" + (f" (macro AUROC {auc:.3f})" if auc is not None else ""))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig
