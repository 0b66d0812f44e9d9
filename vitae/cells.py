"""ViTAE cells: the Reduction Cell (RC), the Normal Cell (NC) and their token-mixing blocks.

Paper: Xu et al., "ViTAE: Vision Transformer Advanced by Exploring Intrinsic Inductive Bias"
(NeurIPS 2021) and Zhang et al., "ViTAEv2" (IJCV 2022). Module and parameter names follow the
reference implementation so that its checkpoints load with `strict=True`.

An RC turns an image or token grid into fewer, wider tokens: a pyramid reduction module (PRM) of
dilated strided convolutions makes the tokens, a token block mixes them (Performer, global or
window attention), and a parallel convolution module (PCM) of the input is added. An NC keeps the
width: attention and PCM branches in parallel, then an MLP.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
from torch import nn

from .layers import (Attention, Mlp, WindowAttention, drop_path_or_identity, map_to_tokens, merge_heads,
                     square_side, tokens_to_map, window_attention)


class PyramidReduction(nn.Module):
    """PRM: one strided, dilated convolution + GELU per dilation, concatenated dilation-major."""

    def __init__(self, in_chans: int, embed_dim: int, kernel_size: int, stride: int, dilations: Sequence[int]):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_chans, embed_dim, kernel_size, stride=stride, dilation=d,
                          padding=math.ceil(((kernel_size - 1) * d + 1 - stride) / 2)),
                nn.GELU(),
            )
            for d in dilations
        )
        self.out_chans = embed_dim * len(dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([conv(x) for conv in self.convs], dim=1)


class PerformerBlock(nn.Module):
    """Single-head Performer attention over tokens (linear in their number), with norms and MLP.

    The softmax kernel is approximated with positive random features
    phi(x) = exp(x w^T - |x|^2 / 2) / sqrt(m) using a frozen random matrix `w`; the features and
    their contractions run in float32 even under autocast. The skip connection comes from v.
    """

    def __init__(self, dim: int, out_dim: int, kernel_ratio: float = 0.5, drop_rate: float = 0.1):
        super().__init__()
        self.out_dim = out_dim
        self.kqv = nn.Linear(dim, 3 * out_dim)
        self.dp = nn.Dropout(drop_rate)
        self.proj = nn.Linear(out_dim, out_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = nn.Sequential(nn.Linear(out_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim),
                                 nn.Dropout(drop_rate))
        num_features = int(out_dim * kernel_ratio)
        w = nn.init.orthogonal_(torch.empty(num_features, out_dim)) * math.sqrt(num_features)
        self.w = nn.Parameter(w, requires_grad=False)

    def random_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, e) float32 -> (B, T, m) positive random features."""
        squared_norm = (x * x).sum(dim=-1, keepdim=True) / 2
        return torch.exp(x @ self.w.float().t() - squared_norm) / math.sqrt(self.w.shape[0])

    def mix(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        k, q, v = self.kqv(x).split(self.out_dim, dim=-1)
        with autocast_disabled(x.device):
            k_features, q_features = self.random_features(k.float()), self.random_features(q.float())
            normaliser = q_features @ k_features.sum(dim=1).unsqueeze(-1)  # (B, T, 1)
            context = k_features.transpose(1, 2) @ v.float()  # (B, m, e)
            y = (q_features @ context) / (normaliser + 1e-8)
        return v + self.dp(self.proj(y.to(v.dtype)))


class TokenAttention(Attention):
    """Global attention that changes the width, with the skip connection taken from v."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        return merge_heads(v) + self.proj_drop(self.proj(self.attend(q, k, v)))


class TokenTransformerBlock(nn.Module):
    """RC token block with global multi-head attention (ViTAEv2 stages 3-4)."""

    def __init__(self, dim: int, out_dim: int, num_heads: int, mlp_ratio: float = 1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, num_heads, qkv_bias=False, out_dim=out_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(out_dim, int(out_dim * mlp_ratio))

    def mix(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.attn(x)


class WindowTokenBlock(nn.Module):
    """RC token block with window attention and no residual around it (ViTAEv2 stages 1-2)."""

    def __init__(self, dim: int, out_dim: int, num_heads: int, window_size: int, mlp_ratio: float = 1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads=num_heads, qkv_bias=True, out_dim=out_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(out_dim, int(out_dim * mlp_ratio))

    def mix(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return window_attention(self.attn, x, height, width, self.attn.window_size)


def autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    """A region computed in the tensors' own precision (float32 here) even under autocast."""
    if device.type == "meta":  # shape-only runs (FLOP counting) have no autocast state
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def as_feature_map(x: torch.Tensor) -> torch.Tensor:
    """Accept an image / feature map (B, C, H, W) or the square token grid (B, N, C) of a stage."""
    return x if x.ndim == 4 else tokens_to_map(x)


class ReductionCell(nn.Module):
    """RC: `attn.mix(norm1(PRM(x))) + PCM(x)`, then `+ mlp(norm2(.))`, all in tokens."""

    def __init__(self, prm: PyramidReduction, pcm: nn.Module, token_block: nn.Module):
        super().__init__()
        self.PCM = pcm
        self.PRM = prm
        self.attn = token_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature_map = as_feature_map(x)
        reduced = self.PRM(feature_map)
        height, width = reduced.shape[-2:]
        tokens = self.attn.mix(self.attn.norm1(map_to_tokens(reduced)), height, width)
        tokens = tokens + map_to_tokens(self.PCM(feature_map))
        return tokens + self.attn.mlp(self.attn.norm2(tokens))


class PyramidReductionCell(nn.Module):
    """The reference's 'performer_less' RC (last stage of ViTAE v1): the PRM tokens alone."""

    def __init__(self, prm: PyramidReduction):
        super().__init__()
        self.PRM = prm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return map_to_tokens(self.PRM(as_feature_map(x)))


class PatchProjection(nn.Module):
    """Non-overlapping patch embedding, a single strided convolution (`PRM.proj` in checkpoints)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class EmbeddingCell(nn.Module):
    """First cell of the isotropic models: patch tokens, class token prepended, learned positions."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, num_patches: int):
        super().__init__()
        self.PRM = PatchProjection(in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = map_to_tokens(self.PRM(x))
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.pos_embed


class NormalCell(nn.Module):
    """NC: `x + drop_path(attn(norm1(x))) + drop_path(PCM(x))`, then `x + drop_path(mlp(norm2(x)))`.

    The PCM sees the un-normalised tokens as a square map; a class token, when present, is left
    out of it. `window_size` switches the attention to non-overlapping windows (ViTAEv2).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, pcm: nn.Module, drop_path_rate: float = 0.0,
                 window_size: int | None = None, class_token: bool = False, qkv_bias: bool = True):
        super().__init__()
        self.class_token = class_token
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if window_size:
            self.attn = WindowAttention(dim, window_size, num_heads=num_heads, qkv_bias=qkv_bias)
        else:
            self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path = drop_path_or_identity(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.PCM = pcm

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        if not self.window_size:
            return self.attn(x)
        side = square_side(x.shape[1])
        return window_attention(self.attn, x, side, side, self.window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch_tokens = x[:, 1:] if self.class_token else x
        conv = self.drop_path(map_to_tokens(self.PCM(tokens_to_map(patch_tokens))))
        if self.class_token:
            conv = nn.functional.pad(conv, (0, 0, 1, 0))  # the class token gets no conv term
        x = x + self.drop_path(self.mix(self.norm1(x))) + conv
        return x + self.drop_path(self.mlp(self.norm2(x)))
