"""Initialise ADN models from torchvision-format checkpoints (ResNets and MobileNetV2 by name; ViT-B/16
and Swin-T key names are mapped).

Matching tensors are copied (shapes must agree exactly), every block norm is copied into its
skip-aware twin and the intermediate exit heads are initialised afresh. The classifier (``fc`` /
``head``) is skipped when its class count differs from the model's.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .layers import copy_norms_to_twins

# Official torchvision weights (download on a machine with internet, then pass the file path).
TORCHVISION_URLS = {
    "resnet18_adn": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34_adn": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50_adn": "https://download.pytorch.org/models/resnet50-0676ba61.pth",  # IMAGENET1K_V1, 76.13%
    "resnet50_adn_v2": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",  # IMAGENET1K_V2, 80.86%
    "vit_b16_adn": "https://download.pytorch.org/models/vit_b_16-c867db91.pth",
    "mobilenetv2_adn": "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",  # IMAGENET1K_V1, 71.88%
    "swin_t_adn": "https://download.pytorch.org/models/swin_t-704ceda3.pth",  # IMAGENET1K_V1, 81.47%
}

_VIT_RULES = [  # torchvision ViT name -> ViTADN name
    (r"^class_token$", "cls_token"),
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^encoder\.pos_embedding$", "pos_embed"),
    (r"^encoder\.ln\.", "norm."),
    (r"^heads\.head\.", "head."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(0|linear_1)\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(3|linear_2)\.", r"blocks.\1.mlp.fc2."),
]


# torchvision Swin (features.0 = patch embedding, features.1/3/5/7 = stages, features.2/4/6 = patch
# merging) -> SwinADN (timm layout: the patch merging opens the stage it feeds)
_SWIN_STAGE = {1: 0, 3: 1, 5: 2, 7: 3}
_SWIN_MERGE = {2: 1, 4: 2, 6: 3}


def _swin_key(key: str) -> str | None:
    """One torchvision ``SwinTransformer`` key -> ``SwinADN`` key (None: a derived buffer, dropped)."""
    if key.endswith("relative_position_index"):
        return None
    m = re.match(r"^features\.0\.(0|2)\.(.*)$", key)
    if m:
        return f"patch_embed.{'proj' if m[1] == '0' else 'norm'}.{m[2]}"
    m = re.match(r"^features\.(\d+)\.(.*)$", key)
    if m and int(m[1]) in _SWIN_MERGE:
        return f"layers.{_SWIN_MERGE[int(m[1])]}.downsample.{m[2]}"
    if m and int(m[1]) in _SWIN_STAGE:
        rest = re.sub(r"\.mlp\.0\.", ".mlp.fc1.", re.sub(r"\.mlp\.3\.", ".mlp.fc2.", "." + m[2]))[1:]
        return f"layers.{_SWIN_STAGE[int(m[1])]}.blocks.{rest}"
    return key


def torchvision_swin_to_adn(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename torchvision ``swin_t`` keys to ``SwinADN`` names (``relative_position_index`` dropped)."""
    out = {}
    for key, value in sd.items():
        new = _swin_key(key)
        if new is not None:
            out[new] = value
    return out


def _is_torchvision_swin(sd: Mapping[str, Tensor]) -> bool:
    return "features.0.0.weight" in sd and any(k.startswith("features.1.0.attn.") for k in sd)


def classifier_prefix(model: nn.Module) -> str:
    """Key prefix of the last exit's classifier: ``classifier.1.`` (MobileNetV2), ``head.`` (ViT,
    Swin) or ``fc.`` (ResNet)."""
    if isinstance(getattr(model, "classifier", None), nn.Sequential):
        return "classifier.1."
    return "head." if hasattr(model, "head") and not hasattr(model, "fc") else "fc."


@dataclass
class LoadReport:
    """What ``load_torchvision_state_dict`` did, by parameter/buffer name."""

    loaded: list[str] = field(default_factory=list)
    twins: list[str] = field(default_factory=list)       # skip-aware norms copied into their twin
    skipped: list[str] = field(default_factory=list)     # classifier keys left fresh (class count differs)
    missing: list[str] = field(default_factory=list)     # backbone keys absent from the checkpoint
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model does not have
    fresh: list[str] = field(default_factory=list)       # exit-head keys initialised afresh

    def __str__(self) -> str:
        return (f"loaded {len(self.loaded)} tensors, {len(self.twins)} twin norms, "
                f"{len(self.fresh)} fresh exit-head tensors; skipped {self.skipped}, "
                f"missing {self.missing}, unexpected {self.unexpected}")


def read_state_dict(state_dict_or_path: Mapping[str, Tensor] | str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a mapping or a file (``torch.load(weights_only=True)``), unwrapping
    ``{"state_dict": ...}`` / ``{"model": ...}`` and a ``module.`` prefix."""
    sd = state_dict_or_path
    if isinstance(sd, (str, os.PathLike)):
        sd = torch.load(sd, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, Mapping) and isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping):
        raise TypeError(f"expected a state dict, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def torchvision_vit_to_adn(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename torchvision ``VisionTransformer`` keys to ``ViTADN`` names (others pass through)."""
    out = {}
    for key, value in sd.items():
        for pattern, repl in _VIT_RULES:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def _is_twin(key: str) -> bool:
    return ".twin." in key


@torch.no_grad()
def load_torchvision_state_dict(model: nn.Module, state_dict_or_path: Mapping[str, Tensor] | str | os.PathLike,
                                *, strict: bool = True) -> LoadReport:
    """Initialise an ADN model from a torchvision-format state dict or checkpoint file.

    Raises ``ValueError`` naming the key on any shape mismatch (nothing is copied then), and with
    ``strict`` also on backbone keys missing from the checkpoint or checkpoint keys the model lacks.
    """
    sd = read_state_dict(state_dict_or_path)
    if "conv_proj.weight" in sd:
        sd = torchvision_vit_to_adn(sd)
    elif _is_torchvision_swin(sd):
        sd = torchvision_swin_to_adn(sd)
    target = model.state_dict()
    head = classifier_prefix(model)
    report = LoadReport()
    head_differs = f"{head}weight" in sd and sd[f"{head}weight"].shape[0] != target[f"{head}weight"].shape[0]
    backbone = {k for k in target if not _is_twin(k) and not k.startswith("exits.")}
    for key, value in sd.items():
        if key not in backbone:
            report.unexpected.append(key)
        elif key.startswith(head) and head_differs:
            report.skipped.append(key)
        elif tuple(value.shape) != tuple(target[key].shape):
            raise ValueError(f"shape mismatch for {key!r}: checkpoint {tuple(value.shape)}, "
                             f"model {tuple(target[key].shape)}")
        else:
            report.loaded.append(key)
    report.missing = sorted(k for k in backbone - set(sd) - set(report.skipped)
                            if not k.endswith("num_batches_tracked"))
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"checkpoint does not match {type(model).__name__}: "
                         f"missing {report.missing[:10]}{'...' if len(report.missing) > 10 else ''}, "
                         f"unexpected {report.unexpected[:10]}{'...' if len(report.unexpected) > 10 else ''}")
    for key in report.loaded:
        target[key].copy_(sd[key])
    report.twins = copy_norms_to_twins(model)
    for exit_head in getattr(model, "exits", []):
        exit_head.reset_parameters()
    report.fresh = sorted(k for k in target if k.startswith("exits."))
    if report.skipped:
        model.get_submodule(head.rstrip(".")).reset_parameters()
    return report
