"""utp_dist: one training loop for Hugging Face image classifiers, from a laptop CPU to Slurm arrays.

From Python: `from utp_dist import Config, train; summary = train(Config(data={...}, optim={"lr": 3e-4}))`.
"""

from utp_dist.api import train
from utp_dist.config import Config, ConfigError
from utp_dist.registry import (
    register_batch_transform,
    register_callback,
    register_dataset,
    register_loss,
    register_metric,
    register_model,
)
from utp_dist.version import __version__

__all__ = [
    "__version__",
    "Config",
    "ConfigError",
    "train",
    "register_batch_transform",
    "register_callback",
    "register_dataset",
    "register_loss",
    "register_metric",
    "register_model",
]
