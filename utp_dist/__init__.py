"""utp_dist: one training loop for Hugging Face image classifiers, from a laptop CPU to Slurm arrays.

From Python: `from utp_dist import Config, train; summary = train(Config(data={...}, optim={"lr": 3e-4}))`.
"""

__version__ = "0.2.0"

from utp_dist.config import Config, ConfigError  # noqa: E402
from utp_dist.registry import (  # noqa: E402
    register_batch_transform,
    register_callback,
    register_dataset,
    register_loss,
    register_metric,
    register_model,
)

__all__ = [
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


def __getattr__(name: str):
    # `train` is the callable module utp_dist/train.py, imported on first use: importing it here would make
    # `python -m utp_dist.train` find it imported already (runpy warns)
    if name == "train":
        import importlib

        return importlib.import_module("utp_dist.train")
    raise AttributeError(f"module 'utp_dist' has no attribute '{name}'")
