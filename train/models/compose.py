"""Wrap any backbone as an :class:`AdaptiveDepthNet` without subclassing: ``compose_adn``.

```python
net = compose_adn(stem, stages=[(mandatory0, skippable0), (mandatory1, skippable1), ...],
                  exits=None, num_classes=10, in_chans=3, img_size=32)
```

* ``stem``: image ``(N, C, H, W)`` -> features entering stage 0.
* ``stages``: one ``(mandatory, skippable)`` module pair per stage; the skippable module must keep
  the feature shape (it is the part of the stage the network may leave out).
* ``exits``: one head per stage (features -> logits ``(N, num_classes)``), or ``None`` (or
  ``None`` entries) for a default head: :class:`ConvExitHead` for ``(N, C, H, W)`` features
  (a strided 3x3 conv-BN-ReLU before pooling except on the last exit, as in the CIFAR ResNets),
  :class:`TokenExitHead` (mean pooling) for ``(N, T, D)`` tokens, a Linear for ``(N, D)``.

Skip-aware norms (see ``base.py``): every norm inside a mandatory module (BatchNorm, LayerNorm,
GroupNorm, InstanceNorm, subclasses such as timm's ``BatchNormAct2d`` included) gets a ``twin``
copy used only while that stage's skippable sub-path is skipped, as in the built-in models. The
norm keeps its class's behaviour and its parameter names (``layer1.0.bn1.weight``; the twin at
``layer1.0.bn1.twin.*``), so a backbone's own state dict still loads (with ``strict=False``,
then :func:`copy_norms_to_twins`). The user's blocks call their norms as usual (``bn(x)``): the
skipping flag reaches them through a per-thread flag that :meth:`ComposedADN.forward_mandatory`
sets for the duration of the call, so concurrent forwards in different threads stay independent
and ONNX tracing sees one graph per skip setting. BatchNorm2d / LayerNorm twins are
``SkipAwareBatchNorm2d`` / ``SkipAwareLayerNorm`` instances, so everything that looks for
skip-aware norms (``layers.skip_aware_norms``, ``copy_norms_to_twins``) finds them.

A factory for ``pipeline train --model mymodule:factory`` takes ``num_classes``, ``in_chans``,
``img_size`` (and any keyword of your own) and returns ``compose_adn(...)``.
"""
from __future__ import annotations

import copy
import threading
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import AdaptiveDepthNet
from .layers import ConvExitHead, SkipAwareBatchNorm2d, SkipAwareLayerNorm, TokenExitHead

_STATE = threading.local()

#: norm types that get a twin inside mandatory modules (subclasses included)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _skipping() -> bool:
    return getattr(_STATE, "skipping", False)


class _Skipping:
    """Context: composed twin norms of this thread select their twin."""

    def __enter__(self) -> None:
        self.before = _skipping()
        _STATE.skipping = True

    def __exit__(self, *exc) -> None:
        _STATE.skipping = self.before


class ComposedTwinNorm:
    """Marker base of the generated twin-norm classes (``SkipAware<Norm>``)."""


_CLASSES: dict[type, type] = {}


def _twin_class(norm_type: type[nn.Module]) -> type[nn.Module]:
    """``SkipAware<norm_type>``: the norm's own forward, or its twin's while skipping."""
    if norm_type not in _CLASSES:
        extra = ((SkipAwareBatchNorm2d,) if issubclass(norm_type, nn.BatchNorm2d) else
                 (SkipAwareLayerNorm,) if issubclass(norm_type, nn.LayerNorm) else ())

        def forward(self, x: Tensor, skipping: bool | None = None) -> Tensor:
            if skipping is None:
                skipping = _skipping()
            return self.twin(x) if skipping else norm_type.forward(self, x)

        _CLASSES[norm_type] = type(f"SkipAware{norm_type.__name__}", (ComposedTwinNorm, *extra, norm_type),
                                   {"forward": forward, "__module__": __name__,
                                    "__doc__": f"{norm_type.__name__} with a skip-aware twin."})
    return _CLASSES[norm_type]


def add_twin_norms(module: nn.Module) -> list[str]:
    """Give every norm inside ``module`` a twin (a copy: same parameters and statistics), in
    place; returns the converted norms' names. Norms that already have one are left alone."""
    names = []
    for name, norm in list(module.named_modules()):
        if not isinstance(norm, NORM_TYPES) or isinstance(norm, (ComposedTwinNorm, SkipAwareBatchNorm2d,
                                                                SkipAwareLayerNorm)):
            continue
        if ".twin" in f".{name}":
            continue
        twin = copy.deepcopy(norm)
        norm.__class__ = _twin_class(type(norm))
        norm.twin = twin  # registered as a child module (nn.Module.__setattr__)
        names.append(name)
    return names


@torch.no_grad()
def copy_twins(model: nn.Module) -> list[str]:
    """Copy every composed norm's parameters and running statistics into its twin."""
    names = []
    for name, norm in model.named_modules():
        if isinstance(norm, ComposedTwinNorm):
            own = {k: v for k, v in norm.state_dict().items() if not k.startswith("twin.")}
            norm.twin.load_state_dict(own)
            names.append(name)
    return names


class ComposedADN(AdaptiveDepthNet):
    """An AdaptiveDepthNet from a stem, (mandatory, skippable) stage pairs and exit heads.

    Module names: ``stem``, ``mandatory.k``, ``skippable.k``, ``exits.k``.
    """

    def __init__(self, stem: nn.Module, stages: Sequence[tuple[nn.Module, nn.Module]],
                 exits: Sequence[nn.Module | None] | None = None, *, num_classes: int,
                 in_chans: int = 3, img_size: int = 32, skip_aware_norms: bool = True,
                 exit_conv: bool = True) -> None:
        super().__init__()
        stages = list(stages)
        if not stages:
            raise ValueError("compose_adn needs at least one (mandatory, skippable) stage")
        for k, pair in enumerate(stages):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                    and all(isinstance(m, nn.Module) for m in pair)):
                raise TypeError(f"stage {k} must be a (mandatory, skippable) pair of nn.Modules")
        self.num_stages = len(stages)
        self.num_classes, self.in_chans, self.img_size = int(num_classes), int(in_chans), int(img_size)
        self.stem = stem
        self.mandatory = nn.ModuleList(m for m, _ in stages)
        self.skippable = nn.ModuleList(s for _, s in stages)
        exits = [None] * self.num_stages if exits is None else list(exits)
        if len(exits) != self.num_stages:
            raise ValueError(f"{len(exits)} exit heads for {self.num_stages} stages")
        if any(e is None for e in exits):
            shapes = self._feature_shapes()
            exits = [e if e is not None else _default_head(shapes[k], self.num_classes,
                                                           exit_conv and k < self.num_stages - 1)
                     for k, e in enumerate(exits)]
        self.exits = nn.ModuleList(exits)
        self.twin_norms = [f"mandatory.{k}.{n}" for k, m in enumerate(self.mandatory)
                           for n in (add_twin_norms(m) if skip_aware_norms else [])]

    @torch.no_grad()
    def _feature_shapes(self) -> list[torch.Size]:
        """Shapes of the features after every stage, for one image of ``img_size``."""
        p = next(self.parameters(), None)
        x = torch.zeros(1, self.in_chans, self.img_size, self.img_size,
                        device=p.device if p is not None else None)
        was = self.training
        self.eval()
        try:
            h, shapes = self.stem(x), []
            for k in range(self.num_stages):
                h = self.skippable[k](self.mandatory[k](h))
                shapes.append(h.shape)
        finally:
            self.train(was)
        return shapes

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def forward_mandatory(self, k: int, h: Tensor, skipping: bool) -> Tensor:
        if not skipping:
            return self.mandatory[k](h)
        with _Skipping():
            return self.mandatory[k](h)

    def forward_skippable(self, k: int, h: Tensor) -> Tensor:
        return self.skippable[k](h)

    def forward_head(self, k: int, h: Tensor) -> Tensor:
        return self.exits[k](h)

    def copy_norms_to_twins(self) -> list[str]:
        """Copy every mandatory norm into its twin (after loading backbone weights)."""
        return copy_twins(self)


def _default_head(shape: torch.Size, num_classes: int, conv: bool) -> nn.Module:
    if len(shape) == 4:
        return ConvExitHead(int(shape[1]), num_classes, conv=conv)
    if len(shape) == 3:
        return TokenExitHead(int(shape[-1]), num_classes, pool="avg", num_prefix_tokens=0)
    if len(shape) == 2:
        return nn.Linear(int(shape[-1]), num_classes)
    raise ValueError(f"no default exit head for features of shape {tuple(shape)}; pass exits=[...]")


def compose_adn(stem: nn.Module, stages: Sequence[tuple[nn.Module, nn.Module]],
                exits: Sequence[nn.Module | None] | None = None, *, num_classes: int,
                in_chans: int = 3, img_size: int = 32, skip_aware_norms: bool = True,
                exit_conv: bool = True) -> ComposedADN:
    """Build an :class:`AdaptiveDepthNet` from a stem, ``(mandatory, skippable)`` stage pairs and
    exit heads (``None``: default heads sized from a dummy forward at ``img_size``).

    ``skip_aware_norms``: give every norm of the mandatory modules a twin for skipped stages
    (the ADN scheme; default). ``exit_conv``: default intermediate heads on image features get a
    strided 3x3 conv-BN-ReLU before pooling.
    """
    return ComposedADN(stem, stages, exits, num_classes=num_classes, in_chans=in_chans,
                       img_size=img_size, skip_aware_norms=skip_aware_norms, exit_conv=exit_conv)
