"""Parameter groups, optimizer and the warm-up + decay schedule."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from utp_dist.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """Adam/AdamW with no weight decay on biases, norm weights and every other 1-D parameter."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls([g for g in groups if g["params"]], lr=cfg.lr, fused=fused or None)


def optimizer_steps(batches_per_epoch: int, epochs: int, accum: int, max_steps: int | None) -> int:
    """Optimizer steps in the run: accumulation groups per epoch (a partial last group still steps) x epochs."""
    total = math.ceil(batches_per_epoch / accum) * epochs
    return min(total, max_steps) if max_steps else total


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Linear warm-up for warmup_ratio of the steps, then cosine/linear decay or constant."""
    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
