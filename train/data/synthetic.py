"""Seeded synthetic images for smoke tests: one smooth random template per class plus noise.

Learnable in a few steps (nearest class mean is near-perfect), tiny, no files needed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .loader import DataError


def make_templates(num_classes: int, in_chans: int, img_size: int, seed: int) -> Tensor:
    """Float (K, C, H, W) templates in [-1, 1]: upsampled 4x4 random grids."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, in_chans, 4, 4, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(img_size, img_size), mode="bilinear", align_corners=False)


def make_split(n: int, templates: Tensor, seed: int, contrast: float = 80.0,
               noise: float = 20.0) -> tuple[Tensor, Tensor]:
    """``n`` balanced, shuffled samples: uint8 images (n, C, H, W) and int64 labels."""
    k = templates.shape[0]
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    x = 128 + contrast * templates[labels] + noise * torch.randn(
        (n, *templates.shape[1:]), generator=g)
    return x.round().clamp(0, 255).to(torch.uint8), labels


def make_synthetic(n_train: int = 512, n_test: int | None = None, *, num_classes: int = 10,
                   in_chans: int = 1, img_size: int = 28, seed: int = 0) -> tuple[
                       tuple[Tensor, Tensor], tuple[Tensor, Tensor], list[str]]:
    """((train x, y), (test x, y), class names); same templates, independent samples."""
    if num_classes < 2 or in_chans < 1 or img_size < 4 or n_train < num_classes:
        raise DataError("synthetic data needs >= 2 classes, >= 1 channel, img_size >= 4 and "
                        "at least one train sample per class")
    n_test = max(n_train // 4, num_classes) if n_test is None else n_test
    templates = make_templates(num_classes, in_chans, img_size, seed)
    train = make_split(n_train, templates, seed * 2 + 1)
    test = make_split(n_test, templates, seed * 2 + 2)
    return train, test, [f"class{i}" for i in range(num_classes)]


def parse_options(spec: str) -> dict[str, int]:
    """``'synthetic:classes=4,chans=3,size=16,test=64,seed=1'`` -> keyword arguments."""
    keys = {"classes": "num_classes", "chans": "in_chans", "size": "img_size", "test": "n_test",
            "seed": "seed", "train": "n_train"}
    _, _, rest = spec.partition(":")
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, val = part.partition("=")
        if not sep or key.strip() not in keys or not val.strip().lstrip("-").isdigit():
            raise DataError(f"bad synthetic option {part!r}; use {', '.join(keys)} (key=int)")
        out[keys[key.strip()]] = int(val)
    return out
