"""Evaluation of every exit under every skip configuration."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from export.simulate import max_prob_exits, outcome_at_exits
from train.data import ImageDataset, iterate_batches, normalize_batch
from train.models.base import AdaptiveDepthNet, SkipConfig, all_skip_configs, skip_to_str


def _config_probabilities(model: AdaptiveDepthNet, x: Tensor,
                          configs: Sequence[SkipConfig]) -> dict[SkipConfig, Tensor]:
    """Softmax of every exit, (S, N, C), per skip config; configs sharing a prefix share its work
    (:meth:`AdaptiveDepthNet.forward_configs`: all 2^S configs cost 2 + 4 + ... + 2^S stage runs
    instead of S * 2^S)."""
    logits = model.forward_configs(x, configs)
    return {c: torch.stack([z.float().softmax(dim=1) for z in per_exit])
            for c, per_exit in zip(configs, logits)}


@torch.no_grad()
def exit_probabilities_by_config(model: AdaptiveDepthNet, ds: ImageDataset, mean: Sequence[float],
                                 std: Sequence[float], skip_configs: Sequence[SkipConfig],
                                 batch_size: int = 1000, channels_last: bool = False,
                                 ) -> tuple[dict[SkipConfig, np.ndarray], np.ndarray]:
    """Per skip config the softmax outputs of every exit, (S, N, C) float32; and the labels (N,)."""
    model.eval()
    configs = [tuple(c) for c in skip_configs]
    chunks: dict[SkipConfig, list[np.ndarray]] = {c: [] for c in configs}
    labels = []
    for images, y in iterate_batches(ds, batch_size, shuffle=False):
        x = normalize_batch(images, mean, std, channels_last=channels_last)
        for c, probs in _config_probabilities(model, x, configs).items():
            chunks[c].append(probs.numpy())
        labels.append(y.numpy())
    return {c: np.concatenate(p, axis=1) for c, p in chunks.items()}, np.concatenate(labels)


def exit_probabilities(model: AdaptiveDepthNet, ds: ImageDataset, mean: Sequence[float],
                       std: Sequence[float], skip: SkipConfig, batch_size: int = 1000,
                       channels_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Softmax outputs of every exit, (S, N, C) float32, and the labels (N,), for one skip config."""
    skip = tuple(skip)
    probs, labels = exit_probabilities_by_config(model, ds, mean, std, [skip], batch_size, channels_last)
    return probs[skip], labels


def evaluate_configs(model: AdaptiveDepthNet, ds: ImageDataset, mean: Sequence[float],
                     std: Sequence[float], skip_configs: Sequence[SkipConfig] | None = None,
                     threshold: float = 0.9, batch_size: int = 1000,
                     channels_last: bool = False) -> dict[str, dict]:
    """Per skip config: accuracy of every exit, and early-exit outcome at a confidence threshold."""
    configs = skip_configs or all_skip_configs(model.num_stages)
    probs_by_config, labels = exit_probabilities_by_config(model, ds, mean, std, configs,
                                                           batch_size, channels_last)
    results = {}
    for skip, probs in probs_by_config.items():
        accuracy = (probs.argmax(axis=2) == labels[None]).mean(axis=1)
        results[skip_to_str(skip)] = {
            "accuracy_per_exit": [round(float(a), 5) for a in accuracy],
            "early_exit": {"threshold": threshold,
                           **outcome_at_exits(probs, labels, max_prob_exits(probs, threshold))},
        }
    return results
