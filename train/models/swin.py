"""Swin-ADN: a Swin Transformer whose stages split into mandatory + skippable blocks.

Follows the authors' code (github.com/wchkang/depth, ``models/swin_transformer.py``:
``SwinTransformer``, ``SwinTransformerBlock``, ``PatchMerging``, ``SkippableSequentialStages``),
which is torchvision's Swin V1 plus skip-aware norms:

* Swin-T's stages of 2, 2, 6, 2 blocks split 1+1, 1+1, 3+3, 1+1 (``depths_base``); the mandatory
  blocks carry twin ``norm1`` / ``norm2`` used when the stage's skippable blocks are skipped (the
  base-net also runs those blocks without stochastic depth, as the authors do);
* every patch-merging layer has a twin norm switched by the flag of the stage it *feeds*
  (``skip[(i + 1) // 2]`` in ``SkippableSequentialStages``): here the patch merging is the first
  module of stages 1..3's mandatory sub-path (timm's layout), so its twin follows that stage;
* the patch embedding (conv + LayerNorm) and the final LayerNorm have no twins.

Features are channels-last ``(N, H, W, C)`` as in torchvision. Names follow timm
(``patch_embed.{proj,norm} layers.k.downsample.{norm,reduction} layers.k.blocks.i.{norm1,attn.qkv,
attn.proj,attn.relative_position_bias_table,norm2,mlp.fc1,mlp.fc2} norm head``); twins at
``*.norm1.twin.*``, ``layers.k.downsample.norm.twin.*``; intermediate exits ``exits.k.{norm,fc}``
(LayerNorm -> mean over positions -> Linear); the last exit is ``norm`` -> mean -> ``head``.

Attention follows torchvision's ``shifted_window_attention`` (pad to a multiple of the window,
no shift when the window covers the padded map, the same mask values). One deviation, for small
inputs only: when a stage's map is smaller than the window, the window shrinks to the map (the
original Swin's rule) instead of torchvision's padding; at 224 px (maps 56, 28, 14, 7 with window
7) the two agree exactly. The model is built for one square ``img_size`` (masks and window sizes
are fixed at construction).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdaptiveDepthNet
from .layers import DropPath, SkipAwareLayerNorm, TokenExitHead, apply_norm
from .registry import register_model
from .vit import Mlp

_EPS = 1e-5


def _norm(dim: int, skip_aware: bool) -> nn.LayerNorm:
    return SkipAwareLayerNorm(dim, eps=_EPS) if skip_aware else nn.LayerNorm(dim, eps=_EPS)


def _relative_position_index(window: int) -> Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return (rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]).flatten()


def _shift_mask(pad_h: int, pad_w: int, window: int, shift: int) -> Tensor:
    """torchvision's attention mask for shifted windows: (num_windows, N, N) with 0 / -100."""
    mask = torch.zeros(pad_h, pad_w)
    count = 0
    for hs in ((0, -window), (-window, -shift), (-shift, None)):
        for ws in ((0, -window), (-window, -shift), (-shift, None)):
            mask[hs[0]:hs[1], ws[0]:ws[1]] = count
            count += 1
    mask = mask.view(pad_h // window, window, pad_w // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class WindowAttention(nn.Module):
    """(Shifted) window multi-head self-attention with relative position bias, for one map size."""

    def __init__(self, dim: int, num_heads: int, resolution: int, window: int, shift: int,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        window = min(window, resolution)  # the original Swin's rule for maps smaller than the window
        pad = (window - resolution % window) % window
        self.num_heads, self.window, self.resolution, self.pad = num_heads, window, resolution, pad
        self.shift = 0 if window >= resolution + pad else shift
        # a Python float: exported as a float32 constant (a scale computed from the traced
        # shape becomes a float64 graph op that TVM's ONNX importer refuses)
        self.scale = float((dim // num_heads) ** -0.5)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", _relative_position_index(window), persistent=False)
        self.register_buffer("attn_mask", _shift_mask(resolution + pad, resolution + pad, window, self.shift)
                             if self.shift else None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        n, h, w, c = x.shape
        ws, nh = self.window, self.num_heads
        if self.pad:
            x = F.pad(x, (0, 0, 0, self.pad, 0, self.pad))
        ph, pw = h + self.pad, w + self.pad
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        nw = (ph // ws) * (pw // ws)
        x = x.view(n, ph // ws, ws, pw // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(n * nw, ws * ws, c)
        q, k, v = self.qkv(x).reshape(n * nw, ws * ws, 3, nh, c // nh).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale).matmul(k.transpose(-2, -1))
        bias = self.relative_position_bias_table[self.relative_position_index]
        attn = attn + bias.view(ws * ws, ws * ws, nh).permute(2, 0, 1).unsqueeze(0)
        if self.attn_mask is not None:
            attn = attn.view(n, nw, nh, ws * ws, ws * ws) + self.attn_mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(n * nw, nh, ws * ws, ws * ws)
        x = attn.softmax(dim=-1).matmul(v).transpose(1, 2).reshape(n * nw, ws * ws, c)
        x = self.proj(x)
        x = x.view(n, ph // ws, pw // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(n, ph, pw, c)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x[:, :h, :w, :] if self.pad else x


class SwinBlock(nn.Module):
    """Pre-norm Swin block; skip-aware norms when mandatory (no stochastic depth while skipping)."""

    def __init__(self, dim: int, num_heads: int, resolution: int, window: int, shift: int,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, skip_aware: bool = False) -> None:
        super().__init__()
        self.norm1 = _norm(dim, skip_aware)
        self.attn = WindowAttention(dim, num_heads, resolution, window, shift)
        self.norm2 = _norm(dim, skip_aware)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, skipping: bool = False) -> Tensor:
        drop = (lambda t: t) if skipping else self.drop_path
        x = x + drop(self.attn(apply_norm(self.norm1, x, skipping)))
        return x + drop(self.mlp(apply_norm(self.norm2, x, skipping)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat (torchvision order x0, x1, x2, x3) -> norm -> Linear(4C -> 2C).

    The norm is skip-aware: its twin follows the flag of the stage this layer feeds.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = SkipAwareLayerNorm(4 * dim, eps=_EPS)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor, skipping: bool = False) -> Tensor:
        h, w = x.shape[1], x.shape[2]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x, skipping))


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv -> channels-last -> LayerNorm (torchvision's ``features.0``)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size = img_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=_EPS)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] != self.img_size or x.shape[-1] != self.img_size:
            raise ValueError(f"input is {tuple(x.shape[-2:])}, this Swin was built for {self.img_size}px")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinStage(nn.Module):
    """[patch merging] + blocks; the first ``n_mand`` blocks are mandatory."""

    def __init__(self, downsample: PatchMerging | None, blocks: list[SwinBlock]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)


class SwinADN(AdaptiveDepthNet):
    """Swin Transformer (V1) with one mandatory + one skippable sub-path per stage.

    Args:
        depths / depths_base: blocks per stage and how many of them are mandatory (the authors'
            ``depths_base``; default: ``ceil(n/2)``).
        window_size: attention window (7 for 224 px); ``drop_path_rate``: stochastic depth, linear
            over all blocks as torchvision's ``stochastic_depth_prob``.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 224, patch_size: int = 4,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 depths_base: Sequence[int] | None = None, num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, drop_path_rate: float = 0.1) -> None:
        super().__init__()
        depths, num_heads = [int(d) for d in depths], [int(h) for h in num_heads]
        depths_base = [int(d) for d in depths_base] if depths_base is not None else [(d + 1) // 2 for d in depths]
        if not len(depths) == len(depths_base) == len(num_heads):
            raise ValueError(f"depths {depths}, depths_base {depths_base} and num_heads {num_heads} differ in length")
        if any(not 1 <= b < d for b, d in zip(depths_base, depths)):
            raise ValueError(f"every stage needs 1 <= depths_base < depths, got {depths_base} for {depths}")
        self.num_classes, self.in_chans, self.img_size = num_classes, in_chans, img_size
        self.num_stages = len(depths)
        self._cfg = dict(patch_size=patch_size, embed_dim=embed_dim, depths=depths, depths_base=depths_base,
                         num_heads=num_heads, window_size=window_size, mlp_ratio=mlp_ratio,
                         drop_path_rate=drop_path_rate)
        self.splits = [(b, d - b) for b, d in zip(depths_base, depths)]

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        total, block_id, res = sum(depths), 0, img_size // patch_size
        stages, self.stage_dims = [], []
        for k, (d, b) in enumerate(zip(depths, depths_base)):
            dim = embed_dim * 2 ** k
            downsample = None
            if k:
                downsample, res = PatchMerging(dim // 2), (res + 1) // 2
            blocks = []
            for i in range(d):
                blocks.append(SwinBlock(dim, num_heads[k], res, window_size, 0 if i % 2 == 0 else window_size // 2,
                                        mlp_ratio, drop_path_rate * block_id / max(total - 1, 1), skip_aware=i < b))
                block_id += 1
            stages.append(SwinStage(downsample, blocks))
            self.stage_dims.append(dim)
        self.layers = nn.ModuleList(stages)
        self.exits = nn.ModuleList(TokenExitHead(dim, num_classes, pool="avg", num_prefix_tokens=0, eps=_EPS)
                                   for dim in self.stage_dims[:-1])
        self.norm = nn.LayerNorm(self.stage_dims[-1], eps=_EPS)
        self.head = nn.Linear(self.stage_dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.patch_embed(x)

    def forward_mandatory(self, k: int, h: Tensor, skipping: bool) -> Tensor:
        stage = self.layers[k]
        if stage.downsample is not None:
            h = stage.downsample(h, skipping)
        for i in range(self.splits[k][0]):
            h = stage.blocks[i](h, skipping)
        return h

    def forward_skippable(self, k: int, h: Tensor) -> Tensor:
        stage = self.layers[k]
        for i in range(self.splits[k][0], len(stage.blocks)):
            h = stage.blocks[i](h)
        return h

    def forward_head(self, k: int, h: Tensor) -> Tensor:
        if k == self.num_stages - 1:
            return self.head(self.norm(h).mean(dim=(1, 2)))
        return self.exits[k](h.flatten(1, 2))

    def model_config(self) -> dict:
        return {**super().model_config(), **self._cfg}


def _swin(defaults: dict, num_classes: int = 10, in_chans: int = 3, img_size: int | None = None,
          **kwargs) -> SwinADN:
    cfg = {**defaults, **kwargs}
    cfg["img_size"] = img_size or cfg["img_size"]
    if cfg.get("window_size") is None:  # small variant: a window that tiles the first map if possible
        grid = cfg["img_size"] // cfg["patch_size"]
        cfg["window_size"] = 7 if grid % 7 == 0 else 4
    return SwinADN(num_classes=num_classes, in_chans=in_chans, **cfg)


_SWIN_T = dict(patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), depths_base=(1, 1, 3, 1), num_heads=(3, 6, 12, 24),
               drop_path_rate=0.1)


@register_model(family="swin", default_img_size=224, num_stages=4)
def swin_t_adn(**kwargs) -> SwinADN:
    """Swin-T (dim 96, depths 2-2-6-2, window 7), stages 1+1, 1+1, 3+3, 1+1 as in the ADN paper."""
    return _swin(dict(_SWIN_T, img_size=224, window_size=7), **kwargs)


@register_model(family="swin", default_img_size=32, num_stages=4)
def swin_t_adn_cifar(**kwargs) -> SwinADN:
    """Swin-T for 28-32 px: patch 2, window 7 at 28 px / 4 at 32 px (maps 14-7-4-2 / 16-8-4-2)."""
    return _swin(dict(_SWIN_T, img_size=32, patch_size=2, window_size=None), **kwargs)
