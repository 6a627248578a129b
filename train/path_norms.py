"""Norm statistics per path: every BatchNorm's running statistics re-estimated per skip path.

During training every skip configuration's pass normalises with its own batch statistics, but
the running statistics kept for inference are one average over all of them: stage k's norms
mix features that arrived through ``F`` and through ``T`` variants of the stages before, and an
exit head mixes both variants of its stage. At inference each path sees only its own
distribution. Here, after training, the statistics are re-estimated on training images once
per skip configuration (parameters unchanged): the statistics of stage k and exit head k then
depend on the path ``config[:k + 1]`` only, which is what the export's per-path pieces carry
(``export.segments.segment_plan(..., per_path=True)``).

::

    stats = path_norm_stats(model, train_images_uint8, mean, std)   # {config: {buffer: tensor}}
    attach_path_models(model, stats)     # model.path_models[config]: a copy with those statistics
    model_for_path(model, "FT")          # the copy whose statistics serve path F, T

Measured on the default recipe (docs/training.md, "Norm statistics per path").
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from train.data.augment import normalize_batch
from train.models.base import all_skip_configs, skip_to_str

__all__ = ["PATH_MODELS_ATTR", "has_batch_norms", "path_norm_stats", "load_path_stats",
           "attach_path_models", "model_for_path"]

#: The attribute holding ``{config: model copy}`` once :func:`attach_path_models` ran.
PATH_MODELS_ATTR = "path_models"
_STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _norms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def has_batch_norms(model: nn.Module) -> bool:
    """Whether ``model`` keeps running norm statistics (a ViT's LayerNorms keep none)."""
    return bool(_norms(model))


def _stat_buffers(model: nn.Module) -> dict[str, Tensor]:
    return {f"{n}.{s}" if n else s: getattr(m, s).detach().clone()
            for n, m in _norms(model) for s in _STAT_SUFFIXES if getattr(m, s, None) is not None}


@torch.no_grad()
def path_norm_stats(model: nn.Module, images: Tensor, mean: Sequence[float], std: Sequence[float],
                    *, batch_size: int = 500,
                    progress: Optional[Callable[[str], None]] = None) -> dict[str, dict[str, Tensor]]:
    """Per skip configuration ('FTF'), every BatchNorm's running statistics re-estimated along
    that configuration on ``images`` (uint8 NCHW training images): a cumulative average over
    all of them, the other layers in eval mode. Raises ValueError if the model has no
    BatchNorm. ``model`` is left unchanged."""
    if not has_batch_norms(model):
        raise ValueError(f"{type(model).__name__} has no BatchNorm statistics to re-estimate")
    if len(images) == 0:
        raise ValueError("no images to re-estimate the norm statistics on")
    work = copy.deepcopy(model).eval()
    norms = [m for _n, m in _norms(work)]
    configs = [skip_to_str(c) for c in all_skip_configs(work.num_stages)]
    out: dict[str, dict[str, Tensor]] = {}
    for i, cfg in enumerate(configs):
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over every batch seen
            m.train()
        for j in range(0, len(images), batch_size):
            work(normalize_batch(images[j:j + batch_size], mean, std), skip=cfg)
        for m in norms:
            m.eval()
        out[cfg] = _stat_buffers(work)
        if progress:
            progress(f"  norm statistics per path: {i + 1}/{len(configs)} ({cfg}, "
                     f"{len(images)} images)")
    return out


def load_path_stats(model: nn.Module, stats: Mapping[str, Tensor]) -> nn.Module:
    """Copy one path's statistics into ``model``'s norms (in place; returns ``model``). Raises
    KeyError naming a buffer the model lacks or the statistics lack."""
    own = dict(model.named_buffers())
    want = set(_stat_buffers(model))
    missing = sorted(want - set(stats))
    if missing:
        raise KeyError(f"norm statistics lack {missing[0]!r} ({len(missing)} buffers missing)")
    for name in want:
        if name not in own:
            raise KeyError(f"the model has no buffer {name!r}")
        own[name].copy_(stats[name])
    return model


def attach_path_models(model: nn.Module, stats: Mapping[str, Mapping[str, Tensor]]) -> nn.Module:
    """Set ``model.path_models``: per skip configuration a copy of ``model`` (eval mode) holding
    that configuration's statistics. Returns ``model``."""
    configs = {skip_to_str(c) for c in all_skip_configs(model.num_stages)}
    if set(stats) != configs:
        raise ValueError(f"norm statistics per path need every skip configuration "
                         f"({', '.join(sorted(configs))}), got {', '.join(sorted(stats)) or 'none'}")
    copies = {}
    base = copy.deepcopy(model)
    if hasattr(base, PATH_MODELS_ATTR):
        delattr(base, PATH_MODELS_ATTR)
    for cfg in sorted(stats):
        copies[cfg] = load_path_stats(copy.deepcopy(base), stats[cfg]).eval()
    object.__setattr__(model, PATH_MODELS_ATTR, copies)  # plain attribute: not a submodule
    return model


def model_for_path(model: nn.Module, path: Optional[str]) -> nn.Module:
    """The copy of ``model`` whose statistics serve skip path ``path`` (the variants of stages
    0..k, e.g. 'FT'); ``model`` itself when it has no per-path copies or ``path`` is None."""
    copies = getattr(model, PATH_MODELS_ATTR, None)
    if not copies or path is None:
        return model
    for cfg in sorted(copies):
        if cfg.startswith(path):
            return copies[cfg]
    raise KeyError(f"no skip configuration starts with path {path!r}")
