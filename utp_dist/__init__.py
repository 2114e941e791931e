"""utp_dist: one training loop for Hugging Face image classifiers, from a laptop CPU to Slurm arrays."""

__version__ = "0.2.0"

from utp_dist.registry import (  # noqa: E402
    register_batch_transform,
    register_callback,
    register_dataset,
    register_loss,
    register_metric,
    register_model,
)

__all__ = [
    "register_batch_transform",
    "register_callback",
    "register_dataset",
    "register_loss",
    "register_metric",
    "register_model",
]
