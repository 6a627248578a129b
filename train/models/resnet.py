"""ResNet-ADN: ResNets whose stages split into a mandatory and a skippable sub-path.

Module names follow torchvision (``conv1 bn1 layer1..layerN fc``; blocks ``layerN.i.conv1/bn1/...``
and ``downsample.0/1``) so torchvision checkpoints load (see ``torchvision_weights``). Mandatory
blocks use :class:`SkipAwareBatchNorm2d` (twins at ``*.bn1.twin.*``); intermediate exits live in
``exits.k``; the last exit is the usual ``avgpool`` + ``fc``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import AdaptiveDepthNet
from .layers import ConvExitHead, SkipAwareBatchNorm2d, apply_norm, split_stage
from .registry import register_model


EXIT_HEADS = ("conv", "pyramid")  # ResNetADN(exit_head=...)


def _bn(chs: int, skip_aware: bool) -> nn.BatchNorm2d:
    return SkipAwareBatchNorm2d(chs) if skip_aware else nn.BatchNorm2d(chs)


class Downsample(nn.Sequential):
    """1x1 conv + BN shortcut (``downsample.0`` / ``downsample.1``), skip-aware when mandatory."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, skip_aware: bool) -> None:
        super().__init__(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), _bn(out_chs, skip_aware))

    def forward(self, x: Tensor, skipping: bool = False) -> Tensor:  # type: ignore[override]
        return apply_norm(self[1], self[0](x), skipping)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR ResNets)."""

    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1, skip_aware: bool = False) -> None:
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _bn(planes, skip_aware)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = _bn(planes, skip_aware)
        self.downsample = Downsample(in_chs, out_chs, stride, skip_aware) \
            if stride != 1 or in_chs != out_chs else None

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor, skipping: bool = False) -> Tensor:
        out = self.relu(apply_norm(self.bn1, self.conv1(x), skipping))
        out = apply_norm(self.bn2, self.conv2(out), skipping)
        identity = x if self.downsample is None else self.downsample(x, skipping)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, torchvision V1.5) -> 1x1 bottleneck (ResNet-50)."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, skip_aware: bool = False) -> None:
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = _bn(planes, skip_aware)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn(planes, skip_aware)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.bn3 = _bn(out_chs, skip_aware)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = Downsample(in_chs, out_chs, stride, skip_aware) \
            if stride != 1 or in_chs != out_chs else None

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor, skipping: bool = False) -> Tensor:
        out = self.relu(apply_norm(self.bn1, self.conv1(x), skipping))
        out = self.relu(apply_norm(self.bn2, self.conv2(out), skipping))
        out = apply_norm(self.bn3, self.conv3(out), skipping)
        identity = x if self.downsample is None else self.downsample(x, skipping)
        return self.relu(out + identity)


class ResNetADN(AdaptiveDepthNet):
    """ResNet with one mandatory + one skippable sub-path per stage and an exit after every stage.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage; each stage splits ``ceil(n/2)`` mandatory + the rest skippable.
        widths: planes per stage.
        cifar_stem: 3x3 stride-1 stem without max-pool (CIFAR/Fashion-MNIST) instead of 7x7/2 + pool.
        exit_conv: intermediate exits get a 3x3 conv-BN-ReLU before pooling.
        exit_head: ``"conv"`` (one strided conv of ``exit_width_mult`` x the stage's channels) or
            ``"pyramid"`` (exit k gets one strided conv per later stage, with that stage's channels
            x ``exit_width_mult``: the head reaches the last stage's width and resolution cheaply).
        zero_init_residual: zero the last BN gamma of every block (and its twin).
        exit_norm_twins: the intermediate exit heads' BatchNorm keeps separate statistics for
            the skip variant of their stage (set by ``train.exit_norms.recalibrate_exit_norms``
            after training; training itself runs without).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 widths: Sequence[int], num_classes: int = 10, in_chans: int = 3, img_size: int = 224,
                 cifar_stem: bool = False, exit_conv: bool = False, exit_width_mult: int = 1,
                 zero_init_residual: bool = True, exit_norm_twins: bool = False,
                 exit_head: str = "conv") -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError(f"layers {list(layers)} and widths {list(widths)} differ in length")
        self.num_stages = len(layers)
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.exit_conv, self.zero_init_residual = exit_conv, zero_init_residual
        self.exit_width_mult = int(exit_width_mult)
        if self.exit_width_mult < 1:
            raise ValueError(f"exit_width_mult must be >= 1, got {exit_width_mult!r}")
        if exit_head not in EXIT_HEADS:
            raise ValueError(f"exit_head must be one of {', '.join(EXIT_HEADS)}, got {exit_head!r}")
        if exit_head != "conv" and not exit_conv:
            raise ValueError(f"exit_head={exit_head!r} needs exit_conv=True")
        self.exit_head = exit_head
        self.splits = [split_stage(n) for n in layers]

        stem_chs = widths[0]
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_chs, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.relu = nn.ReLU(inplace=True)

        in_chs, self.stage_chs = stem_chs, []
        for k, (n, planes) in enumerate(zip(layers, widths)):
            n_mand = self.splits[k][0]
            blocks = []
            for i in range(n):
                blocks.append(block(in_chs, planes, stride=(1 if k == 0 else 2) if i == 0 else 1,
                                    skip_aware=i < n_mand))
                in_chs = planes * block.expansion
            self.add_module(f"layer{k + 1}", nn.Sequential(*blocks))
            self.stage_chs.append(in_chs)

        self.exit_norm_twins = bool(exit_norm_twins)
        self.exits = nn.ModuleList(ConvExitHead(c, num_classes, conv=exit_conv, widths=self._exit_widths(k),
                                                norm_twins=self.exit_norm_twins)
                                   for k, c in enumerate(self.stage_chs[:-1]))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_chs, num_classes)
        self._init_weights()

    def _exit_widths(self, k: int) -> list[int] | None:
        """Output channels of exit ``k``'s strided convs (None: no conv)."""
        if not self.exit_conv:
            return None
        if self.exit_head == "pyramid":
            return [c * self.exit_width_mult for c in self.stage_chs[k + 1:]]
        return [self.stage_chs[k] * self.exit_width_mult]

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    norm = m.last_norm()
                    nn.init.zeros_(norm.weight)
                    if isinstance(norm, SkipAwareBatchNorm2d):
                        nn.init.zeros_(norm.twin.weight)

    def stage(self, k: int) -> nn.Sequential:
        """Blocks of stage ``k`` (``layer{k+1}``)."""
        if not 0 <= k < self.num_stages:
            raise IndexError(f"stage {k} out of range for {self.num_stages} stages")
        return getattr(self, f"layer{k + 1}")

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_mandatory(self, k: int, h: Tensor, skipping: bool) -> Tensor:
        layer = self.stage(k)
        for i in range(self.splits[k][0]):
            h = layer[i](h, skipping)
        return h

    def forward_skippable(self, k: int, h: Tensor) -> Tensor:
        layer = self.stage(k)
        for i in range(self.splits[k][0], len(layer)):
            h = layer[i](h)
        return h

    def forward_head(self, k: int, h: Tensor) -> Tensor:
        return self.forward_head_for(k, h, False)

    def forward_head_for(self, k: int, h: Tensor, skipped: bool) -> Tensor:
        if k == self.num_stages - 1:
            return self.fc(torch.flatten(self.avgpool(h), 1))
        return self.exits[k](h, skipped)

    def model_config(self) -> dict:
        cfg = {**super().model_config(), "exit_conv": self.exit_conv,
               "exit_width_mult": self.exit_width_mult, "zero_init_residual": self.zero_init_residual}
        if self.exit_norm_twins:  # only when set: earlier checkpoints' configs stay as they were
            cfg["exit_norm_twins"] = True
        cfg["exit_head"] = self.exit_head
        return cfg


def _resnet(block, layers, widths, cifar: bool, num_classes: int = 10, in_chans: int = 3,
            img_size: int | None = None, **kwargs) -> ResNetADN:
    kwargs.setdefault("exit_conv", cifar)
    # CIFAR family: pyramid heads (docs/models.md: stronger early exits for a few % of the MACs)
    kwargs.setdefault("exit_head", "pyramid" if cifar and kwargs["exit_conv"] else "conv")
    return ResNetADN(block, layers, widths, num_classes=num_classes, in_chans=in_chans,
                     img_size=img_size or (32 if cifar else 224), cifar_stem=cifar, **kwargs)


_CIFAR_W, _IMNET_W = (16, 32, 64), (64, 128, 256, 512)
#: checkpoints written before the CIFAR family's default head became "pyramid" have no exit_head
_CIFAR_LEGACY = {"exit_head": "conv"}


@register_model(family="resnet_cifar", default_img_size=32, num_stages=3, legacy_config=_CIFAR_LEGACY)
def resnet20_adn(**kwargs) -> ResNetADN:
    """CIFAR ResNet-20 (3x3 BasicBlocks, 16/32/64 channels), stages 2+1 each."""
    return _resnet(BasicBlock, (3, 3, 3), _CIFAR_W, cifar=True, **kwargs)


@register_model(family="resnet_cifar", default_img_size=32, num_stages=3, legacy_config=_CIFAR_LEGACY)
def resnet32_adn(**kwargs) -> ResNetADN:
    """CIFAR ResNet-32 (5 BasicBlocks per stage), stages 3+2 each."""
    return _resnet(BasicBlock, (5, 5, 5), _CIFAR_W, cifar=True, **kwargs)


@register_model(family="resnet_cifar", default_img_size=32, num_stages=3, legacy_config=_CIFAR_LEGACY)
def resnet56_adn(**kwargs) -> ResNetADN:
    """CIFAR ResNet-56 (9 BasicBlocks per stage), stages 5+4 each."""
    return _resnet(BasicBlock, (9, 9, 9), _CIFAR_W, cifar=True, **kwargs)


@register_model(family="resnet", default_img_size=224, num_stages=4)
def resnet18_adn(**kwargs) -> ResNetADN:
    """ImageNet ResNet-18, stages 1+1 each."""
    return _resnet(BasicBlock, (2, 2, 2, 2), _IMNET_W, cifar=False, **kwargs)


@register_model(family="resnet", default_img_size=224, num_stages=4)
def resnet34_adn(**kwargs) -> ResNetADN:
    """ImageNet ResNet-34, stages 2+1, 2+2, 3+3, 2+1."""
    return _resnet(BasicBlock, (3, 4, 6, 3), _IMNET_W, cifar=False, **kwargs)


@register_model(family="resnet", default_img_size=224, num_stages=4)
def resnet50_adn(**kwargs) -> ResNetADN:
    """ImageNet ResNet-50 (Bottleneck, torchvision V1.5), stages 2+1, 2+2, 3+3, 2+1 as in the ADN paper."""
    return _resnet(Bottleneck, (3, 4, 6, 3), _IMNET_W, cifar=False, **kwargs)
