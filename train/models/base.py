"""The contract every adaptive-depth model implements.

A model has ``num_stages`` residual stages. Stage ``k`` is a *mandatory* sub-path followed by a
*skippable* sub-path; an exit head after every stage turns features into logits. Mandatory blocks
carry skip-aware twin norms, used only when their stage's skippable sub-path is skipped.

Everything downstream (losses, MACs counting, export into segments) uses only the methods below,
so a new model family needs nothing but these.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn

SkipConfig = tuple[bool, ...]


def normalize_skip(skip: Sequence[bool] | str | None, num_stages: int) -> SkipConfig:
    """Turn ``None`` (nothing skipped), a 'TFFT' string or a bool sequence into a checked tuple."""
    if skip is None:
        return (False,) * num_stages
    if isinstance(skip, str):
        if set(skip.upper()) - {"T", "F"}:
            raise ValueError(f"skip config {skip!r} must use only 'T' and 'F'")
        skip = [c == "T" for c in skip.upper()]
    skip = tuple(bool(s) for s in skip)
    if len(skip) != num_stages:
        raise ValueError(f"skip config has {len(skip)} entries, the model has {num_stages} stages")
    return skip


def skip_to_str(skip: Sequence[bool]) -> str:
    """(True, False) -> 'TF' (the paper's notation)."""
    return "".join("T" if s else "F" for s in skip)


def is_mixed(skip: Sequence[bool]) -> bool:
    """Whether a skip configuration (or a prefix of one) skips some stages but not all."""
    return any(skip) and not all(skip)


def all_skip_configs(num_stages: int) -> list[SkipConfig]:
    """Every one of the 2^S skip configurations, FF..F first, TT..T last."""
    return [tuple(bool(i >> (num_stages - 1 - b) & 1) for b in range(num_stages))
            for i in range(2 ** num_stages)]


class AdaptiveDepthNet(nn.Module, ABC):
    """Base class: stem -> S x (mandatory [+ skippable]) with an exit head after every stage."""

    num_stages: int
    num_classes: int
    in_chans: int
    img_size: int

    @abstractmethod
    def forward_stem(self, x: Tensor) -> Tensor:
        """Input images (N, C, H, W) -> features entering stage 0."""

    @abstractmethod
    def forward_mandatory(self, k: int, h: Tensor, skipping: bool) -> Tensor:
        """Mandatory sub-path of stage k; ``skipping`` selects the skip-aware twin norms."""

    @abstractmethod
    def forward_skippable(self, k: int, h: Tensor) -> Tensor:
        """Skippable sub-path of stage k (same shape in and out)."""

    @abstractmethod
    def forward_head(self, k: int, h: Tensor) -> Tensor:
        """Exit head k: features after stage k -> logits (N, num_classes)."""

    def forward_head_for(self, k: int, h: Tensor, skipped: bool) -> Tensor:
        """Exit head k after stage k ran with (``skipped=False``) or without its skippable
        sub-path; models whose heads keep per-variant norm statistics override it."""
        return self.forward_head(k, h)

    def forward_stage(self, k: int, h: Tensor, skip: bool) -> Tensor:
        h = self.forward_mandatory(k, h, skip)
        return h if skip else self.forward_skippable(k, h)

    def forward(self, x: Tensor, skip: Sequence[bool] | str | None = None,
                return_increments: bool = False):
        """Logits for every exit (list of S tensors) under a skip configuration.

        With ``return_increments`` also returns, per executed skippable sub-path, the relative
        residual increment ||F(h)|| / ||h|| per sample (used by the diminishing-returns term of
        L_depth); skipped stages contribute ``None``.
        """
        skip = normalize_skip(skip, self.num_stages)
        h = self.forward_stem(x)
        logits: list[Tensor] = []
        increments: list[Tensor | None] = []
        for k in range(self.num_stages):
            h = self.forward_mandatory(k, h, skip[k])
            if skip[k]:
                increments.append(None)
            else:
                out = self.forward_skippable(k, h)
                if return_increments:
                    increments.append(_relative_norm(out - h, h))
                h = out
            logits.append(self.forward_head_for(k, h, skip[k]))
        return (logits, increments) if return_increments else logits

    def forward_configs(self, x: Tensor, configs: Sequence[Sequence[bool] | str]) -> list[list[Tensor]]:
        """Exit logits of several skip configurations, as :meth:`forward` gives them for each; a
        stage prefix that configurations share (TTF and TFT share stage 0's skip variant) runs once."""
        configs = [normalize_skip(c, self.num_stages) for c in configs]
        states: dict[SkipConfig, Tensor] = {(): self.forward_stem(x)}
        logits: dict[SkipConfig, Tensor] = {}
        for config in configs:
            for k in range(self.num_stages):
                prefix = config[:k + 1]
                if prefix not in states:
                    states[prefix] = self.forward_stage(k, states[config[:k]], config[k])
                    logits[prefix] = self.forward_head_for(k, states[prefix], config[k])
        return [[logits[config[:k + 1]] for k in range(self.num_stages)] for config in configs]

    def model_config(self) -> dict:
        """Constructor arguments that rebuild this model through the registry."""
        return {"num_classes": self.num_classes, "in_chans": self.in_chans, "img_size": self.img_size}


def _relative_norm(delta: Tensor, base: Tensor) -> Tensor:
    dims = tuple(range(1, delta.dim()))
    return delta.flatten(1).norm(dim=1) / base.flatten(1).norm(dim=1).clamp_min(1e-6) if dims else delta.abs()
