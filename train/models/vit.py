"""ViT-ADN: a Vision Transformer whose blocks form stages of mandatory + skippable blocks.

Names follow timm (``patch_embed.proj cls_token pos_embed blocks.i.{norm1,attn.qkv,attn.proj,norm2,
mlp.fc1,mlp.fc2} norm head``). Mandatory blocks use :class:`SkipAwareLayerNorm` for ``norm1``/``norm2``
(twins at ``*.norm1.twin.*``). Intermediate exits live in ``exits.k``; the last exit is ``norm`` + ``head``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdaptiveDepthNet
from .layers import DropPath, SkipAwareLayerNorm, TokenExitHead, apply_norm, pool_tokens, split_stage
from .registry import register_model

_EPS = 1e-6


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (q, k, v order, as torchvision/timm)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, fused_attn: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.fused_attn = num_heads, dim // num_heads, fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; skip-aware norms when it is mandatory."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, skip_aware: bool = False, fused_attn: bool = True) -> None:
        super().__init__()
        norm = SkipAwareLayerNorm if skip_aware else nn.LayerNorm
        self.norm1 = norm(dim, eps=_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, fused_attn)
        self.norm2 = norm(dim, eps=_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, skipping: bool = False) -> Tensor:
        x = x + self.drop_path(self.attn(apply_norm(self.norm1, x, skipping)))
        return x + self.drop_path(self.mlp(apply_norm(self.norm2, x, skipping)))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size, self.num_patches = img_size, (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] != self.img_size or x.shape[-1] != self.img_size:
            raise ValueError(f"input is {tuple(x.shape[-2:])}, this ViT was built for {self.img_size}px")
        return self.proj(x).flatten(2).transpose(1, 2)


class ViTADN(AdaptiveDepthNet):
    """Vision Transformer split into ``num_stages`` equal groups of blocks, each ``ceil(n/2)`` mandatory.

    Args:
        global_pool: ``'token'`` (cls token, ViT-B/16 default) or ``'avg'`` (mean of patch tokens, no cls token).
        fused_attn: use ``F.scaled_dot_product_attention`` (else explicit matmul-softmax-matmul).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 224, patch_size: int = 16,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 num_stages: int = 4, global_pool: str = "token", qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, fused_attn: bool = True) -> None:
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if depth % num_stages:
            raise ValueError(f"depth {depth} does not split into {num_stages} equal stages")
        self.num_classes, self.in_chans, self.img_size, self.num_stages = num_classes, in_chans, img_size, num_stages
        self._cfg = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                         mlp_ratio=mlp_ratio, num_stages=num_stages, global_pool=global_pool, qkv_bias=qkv_bias,
                         drop_path_rate=drop_path_rate, fused_attn=fused_attn)
        self.global_pool = global_pool
        per_stage = depth // num_stages
        n_mand = split_stage(per_stage)[0]
        self.splits = [split_stage(per_stage)] * num_stages
        # stage k = blocks[k*per_stage : (k+1)*per_stage]; the first n_mand are mandatory
        self.stage_ranges = [(k * per_stage, k * per_stage + n_mand, (k + 1) * per_stage) for k in range(num_stages)]

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_prefix_tokens = 1 if global_pool == "token" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if self.num_prefix_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens, embed_dim))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], skip_aware=(i % per_stage) < n_mand,
                  fused_attn=fused_attn) for i in range(depth))
        self.exits = nn.ModuleList(TokenExitHead(embed_dim, num_classes, global_pool, self.num_prefix_tokens, _EPS)
                                   for _ in range(num_stages - 1))
        self.norm = nn.LayerNorm(embed_dim, eps=_EPS)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias) if m.bias is not None else None
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=(1.0 / w[0].numel()) ** 0.5)
        nn.init.zeros_(self.patch_embed.proj.bias)

    def forward_stem(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    def forward_mandatory(self, k: int, h: Tensor, skipping: bool) -> Tensor:
        start, mid, _ = self.stage_ranges[k]
        for i in range(start, mid):
            h = self.blocks[i](h, skipping)
        return h

    def forward_skippable(self, k: int, h: Tensor) -> Tensor:
        _, mid, end = self.stage_ranges[k]
        for i in range(mid, end):
            h = self.blocks[i](h)
        return h

    def forward_head(self, k: int, h: Tensor) -> Tensor:
        if k == self.num_stages - 1:
            return self.head(pool_tokens(self.norm(h), self.global_pool, self.num_prefix_tokens))
        return self.exits[k](h)

    def model_config(self) -> dict:
        return {**super().model_config(), **self._cfg}


def _vit(defaults: dict, num_classes: int = 10, in_chans: int = 3, img_size: int | None = None,
         **kwargs) -> ViTADN:
    cfg = {**defaults, **kwargs}
    cfg["img_size"] = img_size or cfg["img_size"]
    return ViTADN(num_classes=num_classes, in_chans=in_chans, **cfg)


@register_model(family="vit", default_img_size=32, num_stages=4)
def vit_tiny_adn(**kwargs) -> ViTADN:
    """ViT-Tiny for small images (dim 192, 12 blocks, 3 heads, patch 4: 49/64 tokens at 28/32px, mean pool)."""
    return _vit(dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, global_pool="avg"), **kwargs)


@register_model(family="vit", default_img_size=224, num_stages=4)
def vit_b16_adn(**kwargs) -> ViTADN:
    """ViT-B/16 (dim 768, 12 blocks, 12 heads), 4 stages of 2+1 blocks as in the ADN paper."""
    return _vit(dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs)
