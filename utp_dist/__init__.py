"""utp_dist: one training loop for Hugging Face image classifiers, from a laptop CPU to Slurm arrays.

From Python: `from utp_dist import Config, train; summary = train(Config(data={...}, optim={"lr": 3e-4}))`.
"""

from utp_dist.api import train  # noqa: E402
from utp_dist.config import Config, ConfigError  # noqa: E402
from utp_dist.registry import (  # noqa: E402
    register_batch_transform,
    register_callback,
    register_dataset,
    register_loss,
    register_metric,
    register_model,
)
from utp_dist.version import __version__  # noqa: E402

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
