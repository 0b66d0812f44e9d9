"""The article API: the ViT-style classes of the reference article, importable from `vitae`.

`ViTAETransformer(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
depth=12, num_heads=12, mlp_ratio=4., qkv_bias=True)` behaves as the article describes: patch
embedding, learned position embedding over the patches, class token prepended, pre-norm blocks
(attention then MLP, each with a residual), final LayerNorm, class-token pooling, linear head.
The article leaves `MultiHeadAttention`, `PatchEmbed` and `MLP` undefined; they are defined here.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import Attention, Mlp, map_to_tokens

MLP = Mlp


class EfficientAttention(Attention):
    """Multi-head self-attention computed by `scaled_dot_product_attention` (fused kernels)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias)


class MultiHeadAttention(EfficientAttention):
    """The same attention written out as softmax(QK^T * scale)V, as the article's sketch does."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.fused_attn = False


class ReductionModule(nn.Module):
    """Bottleneck over channels: LayerNorm -> Linear(dim, dim // r) -> GELU -> Linear(dim // r, dim)."""

    def __init__(self, dim: int, reduction_ratio: int = 4):
        super().__init__()
        if dim // reduction_ratio < 1:
            raise ValueError(f"reduction_ratio {reduction_ratio} leaves no channels of {dim}")
        self.norm = nn.LayerNorm(dim)
        self.reduction = nn.Sequential(nn.Linear(dim, dim // reduction_ratio), nn.GELU(),
                                       nn.Linear(dim // reduction_ratio, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(x))


class PatchEmbed(nn.Module):
    """Image -> (B, num_patches, embed_dim) through one patch_size-strided convolution."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(x.shape[-2:])}")
        return map_to_tokens(self.proj(x))


class ViTAEBlock(nn.Module):
    """Pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`."""

    def __init__(self, dim: int, num_heads: int = 8, mlp_ratio: float = 4.0, qkv_bias: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EfficientAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTAETransformer(nn.Module):
    """The article's complete model (see the module docstring)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(ViTAEBlock(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x[:, 0] if pre_logits else self.head(x[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
