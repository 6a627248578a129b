"""Batched augmentation (pad + random crop, horizontal flip) and normalisation.

All ops are whole-batch tensor ops with per-sample randomness drawn from an explicit
``torch.Generator`` (CPU), so a seed reproduces the exact augmented batch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AugmentSpec:
    """``pad``: zero-pad each side then random-crop back to size; ``flip``: random h-flip (p=0.5)."""

    pad: int = 0
    flip: bool = False

    @property
    def enabled(self) -> bool:
        return self.pad > 0 or self.flip


def augment_batch(x: Tensor, spec: AugmentSpec, generator: torch.Generator) -> Tensor:
    """Augment a NCHW batch (uint8 or float); same shape, dtype and device as ``x``.

    Random draws (in this order): crop rows, crop cols, flip coins, all from ``generator``.
    """
    if x.dim() != 4:
        raise ValueError(f"expected NCHW batch, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if n == 0 or not spec.enabled:
        return x
    if spec.pad > 0:
        p = spec.pad
        hp, wp = h + 2 * p, w + 2 * p
        oy = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=generator).to(x.device)
        ox = torch.randint(0, 2 * p + 1, (n, 1, 1), generator=generator).to(x.device)
        padded = x.new_zeros(n, c, hp, wp)
        padded[:, :, p:p + h, p:p + w] = x
        # flat index of every output pixel in its sample's padded (hp * wp) plane
        rows = (oy + torch.arange(h, device=x.device).view(1, h, 1)) * wp
        cols = ox + torch.arange(w, device=x.device).view(1, 1, w)
        index = (rows + cols).view(n, 1, h * w).expand(n, c, h * w)
        x = padded.view(n, c, hp * wp).gather(2, index).view(n, c, h, w)
    if spec.flip:
        coin = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(coin[:, None, None, None], x.flip(-1), x)
    return x


def normalize_batch(x: Tensor, mean: Sequence[float], std: Sequence[float],
                    channels_last: bool = False) -> Tensor:
    """float32 ``(x / 255 - mean) / std`` per channel; ``x`` holds 0..255 pixel values (uint8).

    ``channels_last`` returns the (still NCHW-shaped) tensor in channels-last memory format.
    """
    c = x.shape[1]
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    if mean_t.shape[1] not in (1, c) or std_t.shape[1] not in (1, c):
        raise ValueError(f"mean/std have {mean_t.shape[1]}/{std_t.shape[1]} entries for {c} channels")
    scale = 1.0 / (255.0 * std_t)
    shift = mean_t / std_t
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = x.to(dtype=torch.float32, memory_format=fmt)
    if out.data_ptr() == x.data_ptr():  # x was already float32 in that layout: don't mutate it
        out = out.clone(memory_format=fmt)
    return out.mul_(scale).sub_(shift)
