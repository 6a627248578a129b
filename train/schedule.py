"""Optimiser and learning-rate schedule (linear warm-up, then cosine), stepped per iteration."""
from __future__ import annotations

import math

import torch
from torch import nn

from train.config import TrainConfig


def build_optimizer(params: list[dict] | list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; norms and biases get no weight decay."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict]:
    """Split parameters into decayed (weights of rank >= 2) and non-decayed (norms, biases)."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    """Multiplier for LambdaLR: linear 0->1 over warm-up, cosine 1->min_ratio afterwards."""
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup, cfg.min_lr_ratio))
