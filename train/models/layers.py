"""Building blocks shared by the ADN model families: skip-aware norms, exit heads, split rule."""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn


def split_stage(num_blocks: int) -> tuple[int, int]:
    """Blocks of one stage -> (mandatory, skippable): ceil half mandatory (3->2+1, 6->3+3, 2->1+1)."""
    if num_blocks < 2:
        raise ValueError(f"a stage needs at least 2 blocks to have a skippable sub-path, got {num_blocks}")
    mandatory = math.ceil(num_blocks / 2)
    return mandatory, num_blocks - mandatory


class SkipAwareBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with a ``twin`` BatchNorm2d used only while the stage's skippable path is skipped.

    The main parameters keep their usual names (``bn1.weight``); the twin lives at ``bn1.twin.*``.
    """

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.twin = nn.BatchNorm2d(num_features, **kwargs)

    def forward(self, x: Tensor, skipping: bool = False) -> Tensor:  # type: ignore[override]
        return self.twin(x) if skipping else super().forward(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # a state dict from before this norm had a twin (a plain BatchNorm2d's): the twin starts
        # as a copy of the main norm
        twin = prefix + "twin."
        if prefix + "weight" in state_dict and not any(k.startswith(twin) for k in state_dict):
            for key in self.twin.state_dict():
                if prefix + key in state_dict:
                    state_dict[twin + key] = state_dict[prefix + key].clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class SkipAwareLayerNorm(nn.LayerNorm):
    """LayerNorm with a ``twin`` LayerNorm used only while the stage's skippable path is skipped."""

    def __init__(self, normalized_shape: int, **kwargs) -> None:
        super().__init__(normalized_shape, **kwargs)
        self.twin = nn.LayerNorm(normalized_shape, **kwargs)

    def forward(self, x: Tensor, skipping: bool = False) -> Tensor:  # type: ignore[override]
        return self.twin(x) if skipping else super().forward(x)


SKIP_AWARE_NORMS = (SkipAwareBatchNorm2d, SkipAwareLayerNorm)


def apply_norm(norm: nn.Module, x: Tensor, skipping: bool) -> Tensor:
    """Call a norm with the skip flag when it is skip-aware, plainly otherwise."""
    return norm(x, skipping) if isinstance(norm, SKIP_AWARE_NORMS) else norm(x)


def skip_aware_norms(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every skip-aware norm in ``model``."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, SKIP_AWARE_NORMS))


@torch.no_grad()
def copy_norms_to_twins(model: nn.Module) -> list[str]:
    """Copy every skip-aware norm's parameters and running statistics into its twin; returns names."""
    names = []
    for name, norm in skip_aware_norms(model):
        for key, value in norm.twin.state_dict().items():
            value.copy_(getattr(norm, key))
        names.append(name)
    return names


class ConvExitHead(nn.Module):
    """Intermediate exit for CNN features: [3x3/2 conv-BN-ReLU] x n -> global avg pool -> Linear.

    Every conv is strided: a quarter of the MACs of a stride-1 conv, so the exits an adaptive run
    passes through stay cheap next to the trunk. ``widths`` gives each conv's output channels
    (one conv of ``width`` channels, or none with ``conv=False``, when not given).
    """

    def __init__(self, in_chs: int, num_classes: int, conv: bool = True, width: int | None = None,
                 norm_twins: bool = False, widths: Sequence[int] | None = None) -> None:
        super().__init__()
        if widths is None:  # a wider conv lifts a thin early exit
            widths = [width or in_chs] if conv else []
        elif not conv:
            raise ValueError("widths needs conv=True")
        widths = [int(w) for w in widths]
        if any(w < 1 for w in widths):
            raise ValueError(f"exit head widths must be >= 1, got {widths}")
        layers: list[nn.Module] = []
        chs = in_chs
        for w in widths:
            # norm_twins: the head's BatchNorms keep separate statistics for the skip variant of
            # its stage (SkipAwareBatchNorm2d), so the two variants' features are not normalised alike
            norm = SkipAwareBatchNorm2d(w) if norm_twins else nn.BatchNorm2d(w)
            layers += [nn.Conv2d(chs, w, 3, stride=2, padding=1, bias=False), norm, nn.ReLU(inplace=True)]
            chs = w
        self.conv = nn.Sequential(*layers) if layers else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(chs, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
                m.reset_running_stats()
            elif isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward(self, x: Tensor, skipping: bool = False) -> Tensor:
        if isinstance(self.conv, nn.Sequential):
            for i in range(0, len(self.conv), 3):
                conv, norm, act = self.conv[i:i + 3]
                x = act(apply_norm(norm, conv(x), skipping))
        return self.fc(torch.flatten(self.pool(x), 1))


class TokenExitHead(nn.Module):
    """Intermediate exit for transformer tokens: LayerNorm -> cls-token or mean pooling -> Linear."""

    def __init__(self, dim: int, num_classes: int, pool: str = "token", num_prefix_tokens: int = 1,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.pool, self.num_prefix_tokens = pool, num_prefix_tokens
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc = nn.Linear(dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(pool_tokens(self.norm(x), self.pool, self.num_prefix_tokens))


def pool_tokens(x: Tensor, pool: str, num_prefix_tokens: int) -> Tensor:
    """(N, T, D) -> (N, D): the cls token (``'token'``) or the mean of the patch tokens (``'avg'``)."""
    return x[:, 0] if pool == "token" else x[:, num_prefix_tokens:].mean(dim=1)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or with p=0)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"
