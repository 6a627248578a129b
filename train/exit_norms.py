"""Per-variant statistics for the exit heads' norms, re-estimated after training.

During training the base-net pass (every skippable sub-path skipped) and the super-net pass
share each intermediate exit head, so the head's BatchNorm running statistics are a mix of the
two feature distributions, which neither variant sees at inference. After training, every exit
head of a model that supports it (ResNet-ADN: ``exit_norm_twins``) gets a twin norm for the
skip variant of its stage, and both are re-estimated on training images: the main norm on every
configuration that runs stage k in full, the twin on every configuration that skips it (each
prefix of the earlier stages equally). Parameters (gamma, beta, weights) do not change.

::

    model = recalibrate_exit_norms(model, train_images_uint8, mean, std)   # a new model

Measured on the default recipe's model (docs/training.md, "Exit-head norms per variant").
"""
from __future__ import annotations

import itertools
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from train.data.augment import normalize_batch
from train.models.layers import SkipAwareBatchNorm2d

__all__ = ["supports_exit_norm_twins", "recalibrate_exit_norms"]


def supports_exit_norm_twins(model: nn.Module) -> bool:
    """Whether ``model`` can keep per-variant exit-head norms (its constructor has
    ``exit_norm_twins`` and its heads have BatchNorms)."""
    return hasattr(model, "exit_norm_twins") and any(
        isinstance(m, nn.BatchNorm2d) for m in getattr(model, "exits", nn.ModuleList()).modules())


def _head_norms(model: nn.Module) -> list[SkipAwareBatchNorm2d]:
    return [m for m in model.exits.modules() if isinstance(m, SkipAwareBatchNorm2d)]


@torch.no_grad()
def recalibrate_exit_norms(model: nn.Module, images: Tensor, mean: Sequence[float],
                           std: Sequence[float], *, batch_size: int = 500,
                           progress: Optional[Callable[[str], None]] = None) -> nn.Module:
    """A copy of ``model`` with per-variant exit-head norm statistics estimated on ``images``
    (uint8 NCHW training images). Raises ValueError if the model does not support it."""
    if not supports_exit_norm_twins(model):
        raise ValueError(f"{type(model).__name__} has no per-variant exit-head norms")
    from train.models import create_model

    cfg = {**model.model_config(), "exit_norm_twins": True}
    name = getattr(model, "model_name", None)
    new = create_model(name, **cfg) if name else type(model)(**cfg)
    new.load_state_dict(model.state_dict())  # twins start as copies of the main norms
    new.eval()
    norms = _head_norms(new)
    for bn in norms:
        for m in (bn, bn.twin):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over every batch seen
            m.train()
    S = new.num_stages
    configs = ["".join(c) for c in itertools.product("FT", repeat=S)]
    for i, cfg_ in enumerate(configs):
        for j in range(0, len(images), batch_size):
            new(normalize_batch(images[j:j + batch_size], mean, std), skip=cfg_)
        if progress:
            progress(f"  exit-head norms: {i + 1}/{len(configs)} configurations "
                     f"({len(images)} images each)")
    for bn in norms:
        for m in (bn, bn.twin):
            m.momentum = 0.1
            m.eval()
    return new
