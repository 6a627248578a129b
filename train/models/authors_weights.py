"""Load the ADN authors' ImageNet checkpoints (github.com/wchkang/depth) into our models.

The authors' models are torchvision's with skip-aware norms added as siblings named ``*_skip``;
ours keep torchvision / timm names and put the twin *inside* the norm (``bn1.twin``). The mapping
below was written against their model code (commit 7a51ea1 of wchkang/depth):

* ResNet-50-ADN -- ``models/resnet.py``: ``Bottleneck`` has ``bn1/bn2/bn3`` plus ``bn1_skip/bn2_skip/
  bn3_skip`` when ``skippable == False`` (``ResNet._make_layer``: the first ``min(n-1, (n+1)//2)``
  blocks of a stage); the ``downsample`` Sequential (conv, BN) has *no* skip norm: it is shared by
  both paths. Ours has a twin there, so it receives a copy of the shared norm (identical logits in
  every skip config; training the two copies apart afterwards is our model's choice, not theirs).
* MobileNetV2-ADN -- ``models/mobilenetv2.py`` (``MobileNetV2``, ``InvertedResidual``,
  ``SkippableSequentialStages``) and ``models/misc.py`` (``SkippableConvNormActivation``: children
  ``conv_layer``, ``norm``, ``norm_skip`` -- the latter only when ``skippable == False``). Their
  ``features`` nest the n >= 2 groups (``features.2.1.conv.0.norm_skip``); ours are flat as in
  torchvision (``features.3.conv.0.1.twin``); their pw-linear ``conv.2.conv_layer`` / ``conv.2.norm``
  are our ``conv.2`` / ``conv.3``.
* ViT-B/16-ADN -- ``models/vision_transformer.py``: torchvision's ``VisionTransformer`` with
  ``EncoderBlock.ln_1_skip / ln_2_skip`` on non-skippable blocks (every ``(i+1) % 3 != 0`` block,
  i.e. 2+1 per group of 3). Their skippable block is always the *last* of a group: our split rule
  agrees for groups of 2 or 3 blocks only (checked).
* Swin-T-ADN -- ``models/swin_transformer.py``: the patch embedding is ``pre.0`` (conv) / ``pre.2``
  (LayerNorm); ``features`` alternate stages (``features.0/2/4/6``) and ``PatchMerging``
  (``features.1/3/5``, ``norm`` + ``norm_skip`` + ``reduction``) as ``SkippableSequentialStages``
  with ``skip[(i + 1) // 2]``: the merging norm follows the stage it feeds, as our
  ``layers.k.downsample.norm``; blocks have ``norm1_skip / norm2_skip`` when ``skippable == False``;
  the MLP is torchvision's ``MLP`` (``mlp.0``, ``mlp.3``); ``relative_position_index`` is a stored
  buffer there and derived here (dropped on load, rebuilt on export). Exact for any of our Swin
  models whose windows were not shrunk to a small map (always true at 224 px).

Their models have one exit; our intermediate exit heads start fresh. ``adn_to_authors`` writes the
inverse (our weights in their layout; a ResNet downsample twin is dropped: they share that norm).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .mobilenetv2 import ConvNormAct, MobileNetV2ADN
from .resnet import ResNetADN
from .swin import SwinADN
from .torchvision_weights import LoadReport, classifier_prefix, read_state_dict
from .vit import ViTADN

# Where the authors publish them (Google Drive links in their README; download by hand).
AUTHORS_WEIGHTS = {
    "resnet50_adn": "https://drive.google.com/file/d/1thbJDkDYhhM7ZI3LY8d9dZ4TWSbYMT0b/view?usp=sharing",
    "resnet50_adn_v2": "https://drive.google.com/file/d/15g7GNB9VkTARW-yqyiHOyglfeOaGf15p/view?usp=drive_link",
    "mobilenetv2_adn": "https://drive.google.com/file/d/1bft5SECYXOFjEhPSkAp2Z9d1U-7w2Mnz/view?usp=sharing",
    "vit_b16_adn": "https://drive.google.com/file/d/1DlHNgjDCKJOWWFSuQIjClA5Ewbc6Jy3u/view?usp=sharing",
    "swin_t_adn": "https://drive.google.com/file/d/10twk67rVBAoKFKZSkgsXEzx1RABX73kF/view?usp=sharing",
}

_DERIVED = "relative_position_index"


def _resnet_pairs(keys: list[str]) -> dict[str, str]:
    pairs = {}
    for key in keys:
        m = re.match(r"^(layer\d+\.\d+\.)(bn\d)\.twin\.(.*)$", key)
        if m:
            pairs[key] = f"{m[1]}{m[2]}_skip.{m[3]}"
        elif re.match(r"^layer\d+\.\d+\.downsample\.1\.twin\.", key):
            pairs[key] = key.replace(".twin.", ".")  # shared norm in their model
        else:
            pairs[key] = key
    return pairs


def _norm_key(prefix: str, rest: str) -> str:
    """Our ``<norm>.X`` / ``<norm>.twin.X`` tail -> their ``norm.X`` / ``norm_skip.X`` under ``prefix``."""
    return f"{prefix}norm_skip.{rest[5:]}" if rest.startswith("twin.") else f"{prefix}norm.{rest}"


def _mobilenetv2_pairs(model: MobileNetV2ADN, keys: list[str]) -> dict[str, str]:
    # their features: stem, then one entry per (t, c, n, s) row (nested Sequential when n >= 2), head conv
    theirs = {0: "features.0.", len(model.features) - 1: f"features.{len(model.group_ranges) + 1}."}
    for g, (start, end) in enumerate(model.group_ranges, start=1):
        for i in range(start, end):
            theirs[i] = f"features.{g}.{i - start}." if end - start >= 2 else f"features.{g}."
    pairs = {}
    for key in keys:
        m = re.match(r"^features\.(\d+)\.(.*)$", key)
        if not m:
            pairs[key] = key  # classifier.1.*
            continue
        idx, rest = int(m[1]), m[2]
        pre, mod = theirs[idx], model.features[idx]
        if isinstance(mod, ConvNormAct):
            pairs[key] = f"{pre}conv_layer.{rest[2:]}" if rest.startswith("0.") else _norm_key(pre, rest[2:])
            continue
        unit, tail = re.match(r"^conv\.(\d+)\.(.*)$", rest).groups()
        unit, last = int(unit), len(mod.conv) - 2  # our pw-linear conv index; its BN is last + 1
        if unit < last:  # a conv-norm-act unit
            pairs[key] = (f"{pre}conv.{unit}.conv_layer.{tail[2:]}" if tail.startswith("0.")
                          else _norm_key(f"{pre}conv.{unit}.", tail[2:]))
        elif unit == last:
            pairs[key] = f"{pre}conv.{last}.conv_layer.{tail}"
        else:
            pairs[key] = _norm_key(f"{pre}conv.{last}.", tail)
    return pairs


_VIT = [(r"^cls_token$", "class_token"), (r"^pos_embed$", "encoder.pos_embedding"),
        (r"^patch_embed\.proj\.", "conv_proj."), (r"^norm\.", "encoder.ln."), (r"^head\.", "heads.head."),
        (r"^blocks\.(\d+)\.norm(\d)\.twin\.", r"encoder.layers.encoder_layer_\1.ln_\2_skip."),
        (r"^blocks\.(\d+)\.norm(\d)\.", r"encoder.layers.encoder_layer_\1.ln_\2."),
        (r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"encoder.layers.encoder_layer_\1.self_attention.in_proj_\2"),
        (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.encoder_layer_\1.self_attention.out_proj."),
        (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layers.encoder_layer_\1.mlp.0."),
        (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layers.encoder_layer_\1.mlp.3.")]

def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def _swin_rename(key: str) -> str:
    """Our Swin key -> theirs: stage k is their ``features.(2k)``, the merging feeding it ``features.(2k-1)``."""
    key = _rename(key, [(r"^patch_embed\.proj\.", "pre.0."), (r"^patch_embed\.norm\.", "pre.2.")])
    m = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", key)
    if m:
        return f"features.{2 * int(m[1]) - 1}." + m[2].replace("norm.twin.", "norm_skip.")
    m = re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.(.*)$", key)
    if m:
        rest = _rename(m[3], [(r"^norm(\d)\.twin\.", r"norm\1_skip."), (r"^mlp\.fc1\.", "mlp.0."),
                              (r"^mlp\.fc2\.", "mlp.3.")])
        return f"features.{2 * int(m[1])}.{m[2]}.{rest}"
    return key


def _check_vit(model: ViTADN) -> None:
    per_stage = model._cfg["depth"] // model.num_stages
    if per_stage not in (2, 3) or model.global_pool != "token" or not model._cfg["qkv_bias"]:
        raise ValueError("the authors' ViT skips the last block of every group of blocks and pools the class token: "
                         f"only groups of 2 or 3 blocks with global_pool='token' map (this model: {per_stage} blocks "
                         f"per stage, global_pool={model.global_pool!r})")


def _check_swin(model: SwinADN) -> None:
    window = model._cfg["window_size"]
    for k, stage in enumerate(model.layers):
        for blk in stage.blocks:
            if blk.attn.window != window:
                raise ValueError(f"stage {k}'s window shrank from {window} to {blk.attn.window} (map smaller than the "
                                 "window): the authors' torchvision code pads instead; no exact mapping")


def key_pairs(model: nn.Module) -> dict[str, str]:
    """Every key of ``model.state_dict()`` except the intermediate exits -> the authors' key it maps to.

    Several of ours may map to one of theirs (a ResNet downsample norm and its twin).
    """
    keys = [k for k in model.state_dict() if not k.startswith("exits.")]
    if isinstance(model, ResNetADN):
        return _resnet_pairs(keys)
    if isinstance(model, MobileNetV2ADN):
        return _mobilenetv2_pairs(model, keys)
    if isinstance(model, ViTADN):
        _check_vit(model)
        return {k: _rename(k, _VIT) for k in keys}
    if isinstance(model, SwinADN):
        _check_swin(model)
        return {k: _swin_rename(k) for k in keys}
    raise TypeError(f"no authors' layout for {type(model).__name__}")


def adn_to_authors(model: nn.Module) -> dict[str, Tensor]:
    """Our weights in the authors' key layout (what their ``load_state_dict`` expects)."""
    sd = model.state_dict()
    out: dict[str, Tensor] = {}
    for ours, theirs in key_pairs(model).items():
        if theirs not in out or ".twin." not in ours:
            out[theirs] = sd[ours].clone()
    if isinstance(model, SwinADN):
        for name, buf in model.named_buffers():
            if name.endswith(_DERIVED):
                out[_swin_rename(name)] = buf.clone()
    return out


@torch.no_grad()
def load_authors_state_dict(model: nn.Module, state_dict_or_path: Mapping[str, Tensor] | str | os.PathLike,
                            *, strict: bool = True) -> LoadReport:
    """Load an authors' checkpoint (file or state dict; ``model`` / ``state_dict`` / ``model_ema``
    wrappers and a ``module.`` prefix are removed) into an ADN model of the same architecture.

    Every skip configuration then computes the authors' logits at its last exit; the intermediate
    exits are initialised afresh (``report.fresh``). The classifier is skipped when the class count
    differs. Any shape mismatch raises ``ValueError`` (nothing copied); with ``strict`` so do keys
    on either side without a counterpart. ``report.twins`` lists twins filled from a shared norm.
    """
    sd = state_dict_or_path
    if isinstance(sd, Mapping) and isinstance(sd.get("model_ema"), Mapping):
        sd = {k.removeprefix("module."): v for k, v in sd["model_ema"].items() if k != "n_averaged"}
    sd = read_state_dict(sd)
    pairs = key_pairs(model)
    target = model.state_dict()
    head = classifier_prefix(model)
    head_differs = f"{head}weight" in target and pairs[f"{head}weight"] in sd and \
        sd[pairs[f"{head}weight"]].shape[0] != target[f"{head}weight"].shape[0]
    report = LoadReport()
    wanted = set(pairs.values())
    report.unexpected = sorted(k for k in sd if k not in wanted and not k.endswith(_DERIVED))
    copies = []
    for ours, theirs in pairs.items():
        if ours.startswith(head) and head_differs:
            report.skipped.append(ours)
        elif theirs not in sd:
            if not ours.endswith("num_batches_tracked"):
                report.missing.append(ours)
        elif tuple(sd[theirs].shape) != tuple(target[ours].shape):
            raise ValueError(f"shape mismatch for {theirs!r} -> {ours!r}: checkpoint {tuple(sd[theirs].shape)}, "
                             f"model {tuple(target[ours].shape)}")
        else:
            copies.append((ours, theirs))
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"authors' checkpoint does not match {type(model).__name__}: "
                         f"missing {report.missing[:10]}{'...' if len(report.missing) > 10 else ''}, "
                         f"unexpected {report.unexpected[:10]}{'...' if len(report.unexpected) > 10 else ''}")
    for ours, theirs in copies:
        target[ours].copy_(sd[theirs])
        (report.twins if ".twin." in ours and "_skip" not in theirs else report.loaded).append(ours)
    for exit_head in getattr(model, "exits", []):
        exit_head.reset_parameters()
    report.fresh = sorted(k for k in target if k.startswith("exits."))
    if report.skipped:
        model.get_submodule(head.rstrip(".")).reset_parameters()
    return report
