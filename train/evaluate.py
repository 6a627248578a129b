"""Evaluation of every exit under every skip configuration."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from runtime.exits import max_prob_exits, outcome_at_exits
from train.data import ImageDataset, iterate_batches, normalize_batch
from train.models.base import AdaptiveDepthNet, SkipConfig, all_skip_configs, skip_to_str


@torch.no_grad()
def exit_probabilities(model: AdaptiveDepthNet, ds: ImageDataset, mean: Sequence[float],
                       std: Sequence[float], skip: SkipConfig, batch_size: int = 1000,
                       channels_last: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Softmax outputs of every exit, (S, N, C) float32, and the labels (N,)."""
    model.eval()
    probs, labels = [], []
    for images, y in iterate_batches(ds, batch_size, shuffle=False):
        x = normalize_batch(images, mean, std, channels_last=channels_last)
        logits = model(x, skip=skip)
        probs.append(torch.stack([z.float().softmax(dim=1) for z in logits]).numpy())
        labels.append(y.numpy())
    return np.concatenate(probs, axis=1), np.concatenate(labels)


def evaluate_configs(model: AdaptiveDepthNet, ds: ImageDataset, mean: Sequence[float],
                     std: Sequence[float], skip_configs: Sequence[SkipConfig] | None = None,
                     threshold: float = 0.9, batch_size: int = 1000,
                     channels_last: bool = False) -> dict[str, dict]:
    """Per skip config: accuracy of every exit, and early-exit outcome at a confidence threshold."""
    configs = skip_configs or all_skip_configs(model.num_stages)
    results = {}
    for skip in configs:
        probs, labels = exit_probabilities(model, ds, mean, std, skip, batch_size, channels_last)
        accuracy = (probs.argmax(axis=2) == labels[None]).mean(axis=1)
        results[skip_to_str(skip)] = {
            "accuracy_per_exit": [round(float(a), 5) for a in accuracy],
            "early_exit": {"threshold": threshold,
                           **outcome_at_exits(probs, labels, max_prob_exits(probs, threshold))},
        }
    return results
