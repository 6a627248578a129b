"""MobileNetV2-ADN: MobileNetV2 whose inverted-residual groups split into mandatory + skippable blocks.

Follows the authors' code (github.com/wchkang/depth, ``models/mobilenetv2.py``: ``MobileNetV2``,
``SkippableSequentialStages``, ``SkippableSequentialBlocks``; ``models/misc.py``:
``SkippableConvNormActivation``):

* the five groups with n >= 2 blocks (c = 24, 32, 64, 96, 160) are the 5 stages, split
  ``(n+1)//2`` mandatory + the rest skippable: 1+1, 2+1, 2+2, 2+1, 2+1;
* the stem conv, the n = 1 groups (c = 16, c = 320) and the 1x1 head conv (1280 ch) are never
  skipped, but they carry skip-aware norms too: the stem and the c = 16 block follow the flag of
  stage 0, the c = 320 block and the head conv follow the flag of the last stage.

To respect that with the :class:`AdaptiveDepthNet` cut points (the stem takes no skip flag, nor
does an exit head), ``forward_stem`` is the identity: stage 0's mandatory sub-path starts with the
stem conv and the c = 16 block. The last stage ends with the c = 320 block and the head conv, run
with the twin norms after the mandatory sub-path when skipping and with the main norms after the
skippable sub-path otherwise; its features are the 1280-channel head-conv output (so stage 4's
mandatory sub-path without skipping returns 160 channels, its other two paths 1280: the last
stage's skippable sub-path is the one that does not keep the shape). The last exit is
global average pool + dropout + ``classifier.1``.

Module names follow torchvision's ``mobilenet_v2`` (``features.0..18``, ``features.i.conv.j.k``,
``classifier.1``) so its checkpoints load with twin keys as the only additions
(``features.2.conv.0.1.twin.weight``). Intermediate exits live in ``exits.k``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import AdaptiveDepthNet, _relative_norm, normalize_skip
from .layers import ConvExitHead, SkipAwareBatchNorm2d, apply_norm
from .registry import register_model

# t (expansion), c (channels), n (blocks), s (stride of the first block): torchvision / the paper
IMAGENET_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                    (6, 320, 1, 1))
# CIFAR-style (28-32 px): stride-1 stem and stride-1 c=24 group, 3 downsamplings (32 -> 16 -> 8 -> 4)
CIFAR_SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                 (6, 320, 1, 1))


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor`` without going below 90 % (torchvision's rule)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _bn(chs: int, skip_aware: bool) -> nn.BatchNorm2d:
    return SkipAwareBatchNorm2d(chs) if skip_aware else nn.BatchNorm2d(chs)


def run_seq(seq: nn.Sequential, x: Tensor, skipping: bool) -> Tensor:
    """Run a Sequential, handing ``skipping`` to skip-aware norms and to nested conv-norm-act units."""
    for m in seq:
        x = m(x, skipping) if isinstance(m, ConvNormAct) else apply_norm(m, x, skipping)
    return x


class ConvNormAct(nn.Sequential):
    """conv (``.0``) -> BN (``.1``) -> ReLU6 (``.2``), torchvision's ``Conv2dNormActivation``."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 skip_aware: bool = False) -> None:
        super().__init__(nn.Conv2d(in_chs, out_chs, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                                   bias=False),
                         _bn(out_chs, skip_aware), nn.ReLU6(inplace=True))

    def forward(self, x: Tensor, skipping: bool = False) -> Tensor:  # type: ignore[override]
        return self[2](apply_norm(self[1], self[0](x), skipping))


class InvertedResidual(nn.Module):
    """[1x1 expand] -> 3x3 depthwise -> 1x1 linear projection, residual when stride 1 and same width."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int, skip_aware: bool = False) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(in_chs * expand_ratio))
        self.use_res_connect = stride == 1 and in_chs == out_chs
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(in_chs, hidden, 1, skip_aware=skip_aware))
        layers += [ConvNormAct(hidden, hidden, 3, stride, groups=hidden, skip_aware=skip_aware),
                   nn.Conv2d(hidden, out_chs, 1, bias=False), _bn(out_chs, skip_aware)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor, skipping: bool = False) -> Tensor:
        out = run_seq(self.conv, x, skipping)
        return x + out if self.use_res_connect else out


class MobileNetV2ADN(AdaptiveDepthNet):
    """MobileNetV2 with 5 stages (the n >= 2 groups), each ``(n+1)//2`` mandatory + the rest skippable.

    Args:
        setting: (t, c, n, s) rows; every n >= 2 row is a stage, n = 1 rows ride with their neighbour
            stage (rows before the first stage with stage 0, rows after the last with the last stage).
        cifar_stem: stride-1 stem conv (with ``CIFAR_SETTING`` for 28-32 px inputs).
        exit_conv / exit_width_mult: intermediate exits as in ResNet-ADN (``ConvExitHead``).
        width_mult: channel multiplier (torchvision's, channels rounded to multiples of 8).
        dropout: before the last classifier.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 224,
                 setting: Sequence[Sequence[int]] = IMAGENET_SETTING, cifar_stem: bool = False,
                 width_mult: float = 1.0, exit_conv: bool = False, exit_width_mult: int = 1,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.exit_conv, self.exit_width_mult, self.width_mult, self.dropout = \
            exit_conv, int(exit_width_mult), float(width_mult), float(dropout)
        self.cifar_stem = cifar_stem
        if self.exit_width_mult < 1:
            raise ValueError(f"exit_width_mult must be >= 1, got {exit_width_mult!r}")
        staged = [i for i, row in enumerate(setting) if row[2] >= 2]
        if not staged:
            raise ValueError("MobileNetV2-ADN needs at least one group of 2+ blocks")
        self.num_stages = len(staged)

        in_chs = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvNormAct(in_chans, in_chs, 3, 1 if cifar_stem else 2, skip_aware=True)]
        # per stage: (first, first skippable, end) indices into features; the tail is handled apart
        self.stage_ranges: list[tuple[int, int, int]] = []
        self.splits: list[tuple[int, int]] = []
        self.stage_chs: list[int] = []
        self.group_ranges: list[tuple[int, int]] = []  # [start, end) in features of every (t, c, n, s) row
        for t, c, n, s in setting:
            out_chs = make_divisible(c * width_mult)
            n_mand = (n + 1) // 2 if n >= 2 else n  # the authors' rule: block i skippable iff i >= (n+1)//2
            start = len(features)
            for i in range(n):
                features.append(InvertedResidual(in_chs, out_chs, s if i == 0 else 1, t, skip_aware=i < n_mand))
                in_chs = out_chs
            self.group_ranges.append((start, start + n))
            if n >= 2:
                self.stage_ranges.append((start, start + n_mand, start + n))
                self.splits.append((n_mand, n - n_mand))
                self.stage_chs.append(out_chs)
        features.append(ConvNormAct(in_chs, self.last_channel, 1, skip_aware=True))
        self.features = nn.Sequential(*features)
        # stage 0's mandatory path starts at the stem; the last stage ends with the tail
        first = self.stage_ranges[0]
        self.stage_ranges[0] = (0, first[1], first[2])
        self.tail = (self.stage_ranges[-1][2], len(features))

        self.exits = nn.ModuleList(ConvExitHead(c, num_classes, conv=exit_conv, width=c * self.exit_width_mult)
                                   for c in self.stage_chs[:-1])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def _run(self, start: int, end: int, h: Tensor, skipping: bool) -> Tensor:
        for i in range(start, end):
            h = self.features[i](h, skipping)
        return h

    def forward_stem(self, x: Tensor) -> Tensor:
        return x  # the stem conv's norms follow stage 0's flag: it runs in stage 0's mandatory path

    def forward_mandatory(self, k: int, h: Tensor, skipping: bool) -> Tensor:
        start, mid, _ = self.stage_ranges[k]
        h = self._run(start, mid, h, skipping)
        if skipping and k == self.num_stages - 1:
            h = self._run(*self.tail, h, True)
        return h

    def _skippable_blocks(self, k: int, h: Tensor) -> Tensor:
        _, mid, end = self.stage_ranges[k]
        return self._run(mid, end, h, False)

    def forward_skippable(self, k: int, h: Tensor) -> Tensor:
        h = self._skippable_blocks(k, h)
        return self._run(*self.tail, h, False) if k == self.num_stages - 1 else h

    def forward_head(self, k: int, h: Tensor) -> Tensor:
        if k == self.num_stages - 1:
            return self.classifier(torch.flatten(self.avgpool(h), 1))
        return self.exits[k](h)

    def forward(self, x: Tensor, skip: Sequence[bool] | str | None = None, return_increments: bool = False):
        """As :meth:`AdaptiveDepthNet.forward`; the last stage's increment is that of its skippable
        blocks alone (the tail after them changes the shape)."""
        if not return_increments:
            return super().forward(x, skip)
        skip = normalize_skip(skip, self.num_stages)
        h = self.forward_stem(x)
        logits, increments = [], []
        for k in range(self.num_stages):
            h = self.forward_mandatory(k, h, skip[k])
            if skip[k]:
                increments.append(None)
            else:
                out = self._skippable_blocks(k, h)
                increments.append(_relative_norm(out - h, h))
                h = self._run(*self.tail, out, False) if k == self.num_stages - 1 else out
            logits.append(self.forward_head(k, h))
        return logits, increments

    def model_config(self) -> dict:
        return {**super().model_config(), "width_mult": self.width_mult, "exit_conv": self.exit_conv,
                "exit_width_mult": self.exit_width_mult, "dropout": self.dropout}


def _mobilenetv2(cifar: bool, num_classes: int = 10, in_chans: int = 3, img_size: int | None = None,
                 **kwargs) -> MobileNetV2ADN:
    kwargs.setdefault("exit_conv", cifar)
    return MobileNetV2ADN(num_classes=num_classes, in_chans=in_chans, img_size=img_size or (32 if cifar else 224),
                          setting=CIFAR_SETTING if cifar else IMAGENET_SETTING, cifar_stem=cifar, **kwargs)


@register_model(family="mobilenetv2", default_img_size=224, num_stages=5)
def mobilenetv2_adn(**kwargs) -> MobileNetV2ADN:
    """ImageNet MobileNetV2 (torchvision layout), stages 1+1, 2+1, 2+2, 2+1, 2+1 as in the ADN paper."""
    return _mobilenetv2(False, **kwargs)


@register_model(family="mobilenetv2", default_img_size=32, num_stages=5)
def mobilenetv2_adn_cifar(**kwargs) -> MobileNetV2ADN:
    """MobileNetV2 for 28-32 px: stride-1 stem and c=24 group (3 downsamplings), stages as mobilenetv2_adn."""
    return _mobilenetv2(True, **kwargs)
