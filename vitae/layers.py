"""Building blocks shared by every ViTAE family: attention, MLP, drop-path, convolution stacks
(PCM), token <-> feature-map reshaping and window partitioning.

Attention goes through `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient
kernels where the device has them); `fused_attn = False` on a module selects the explicit
softmax(QK^T)V path, kept for numerical cross-checks and for benchmarking the fused one.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample with probability `drop_prob`."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(mask_shape).bernoulli_(keep_prob)
        return x * mask / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def drop_path_or_identity(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0.0 else nn.Identity()


def drop_path_rates(depths: Sequence[int], rate: float, cumulative: bool = False) -> list[list[float]]:
    """Per-stage lists of per-block drop-path rates, linearly increasing to `rate` over all blocks.

    The reference implementation starts stage i at index `depths[i-1]` rather than at the running
    sum of earlier depths; that is the default here so that published recipes train identically.
    `cumulative=True` gives the textbook schedule.
    """
    all_rates = torch.linspace(0, rate, sum(depths), device="cpu").tolist() if sum(depths) else []
    stage_rates, start = [], 0
    for i, depth in enumerate(depths):
        if cumulative:
            start = sum(depths[:i])
        else:
            start = depths[i - 1] if i > 0 else 0
        stage_rates.append(all_rates[start:start + depth])
    return stage_rates


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, with optional dropout after each linear."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 drop_rate: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)
        self.drop = nn.Dropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention from `dim` input channels to `out_dim` output channels.

    With `out_dim == dim` this is the usual transformer attention; the reduction cells use
    `out_dim != dim` to change the width while mixing tokens.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, out_dim: int | None = None,
                 attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0):
        super().__init__()
        out_dim = out_dim or dim
        if out_dim % num_heads:
            raise ValueError(f"attention width {out_dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.out_dim = out_dim
        self.head_dim = out_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, out_dim * 3, bias=qkv_bias)
        self.attn_drop_rate = attn_drop_rate
        self.proj = nn.Linear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(proj_drop_rate)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, dim) -> q, k, v each (B, heads, N, head_dim)."""
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T * scale) v, merged back to (B, N, out_dim)."""
        drop = self.attn_drop_rate if self.training else 0.0
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        else:
            weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = F.dropout(weights, drop, self.training) @ v
        return merge_heads(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(self.attend(*self.split_heads(x))))


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, head_dim) -> (B, N, heads * head_dim)."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


class WindowAttention(Attention):
    """Attention inside non-overlapping windows (applied by `window_attention`).

    The reference registers a Swin-style relative-position index buffer even though it uses no
    relative-position bias; published checkpoints contain it, so it is kept (and never used).
    """

    def __init__(self, dim: int, window_size: int, **kwargs):
        super().__init__(dim, **kwargs)
        self.window_size = window_size
        self.register_buffer("relative_position_index", relative_position_index(window_size))


def relative_position_index(window_size: int) -> torch.Tensor:
    """(ws*ws, ws*ws) index of each token pair's relative offset, as Swin Transformer defines it."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size),
                                        indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
    return relative[..., 0] * (2 * window_size - 1) + relative[..., 1]


def window_attention(attn: nn.Module, x: torch.Tensor, height: int, width: int, window_size: int) -> torch.Tensor:
    """Apply `attn` within window_size x window_size windows of a (B, H*W, C) token grid.

    The grid is zero-padded symmetrically (extra row/column at the bottom/right) to a multiple of
    the window size, and the padding is cropped off again; there is no shift and no mask.
    """
    batch, _, channels = x.shape
    pad_h, pad_w = (-height) % window_size, (-width) % window_size
    top, left = pad_h // 2, pad_w // 2
    grid = F.pad(x.view(batch, height, width, channels), (0, 0, left, pad_w - left, top, pad_h - top))
    rows, cols = (height + pad_h) // window_size, (width + pad_w) // window_size
    windows = grid.view(batch, rows, window_size, cols, window_size, channels).permute(0, 1, 3, 2, 4, 5)
    out = attn(windows.reshape(-1, window_size * window_size, channels))
    out_channels = out.shape[-1]
    out = out.view(batch, rows, cols, window_size, window_size, out_channels).permute(0, 1, 3, 2, 4, 5)
    out = out.reshape(batch, rows * window_size, cols * window_size, out_channels)
    return out[:, top:top + height, left:left + width].reshape(batch, height * width, out_channels)


def conv_stack(channels: Sequence[int], groups: int, strides: Sequence[int] | None = None,
               batch_norms: Sequence[bool] = (), final_act: bool = False) -> nn.Sequential:
    """The parallel convolution module (PCM): 3x3 convolutions channels[i] -> channels[i+1].

    Between two convolutions comes an optional BatchNorm (`batch_norms[i]`) and a SiLU; `final_act`
    adds a SiLU after the last one. The Sequential's indices are those of the reference checkpoints.
    """
    strides = strides or [1] * (len(channels) - 1)
    layers: list[nn.Module] = []
    for i, (c_in, c_out, stride) in enumerate(zip(channels[:-1], channels[1:], strides)):
        layers.append(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, groups=groups))
        is_last = i == len(channels) - 2
        if not is_last and batch_norms[i]:
            layers.append(nn.BatchNorm2d(c_out))
        if not is_last or final_act:
            layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


def pcm_strides(downsample_ratio: int) -> list[int]:
    """Strides of the three PCM convolutions for a reduction cell: 4 -> (2, 2, 1), 2 -> (2, 1, 1)."""
    strides, remaining = [], downsample_ratio // 2
    for _ in range(3):
        strides.append(2 if remaining > 0 else 1)
        remaining //= 2
    if remaining:
        raise ValueError(f"downsample ratio {downsample_ratio} needs more than three stride-2 convolutions")
    return strides


def square_side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a square grid")
    return side


def tokens_to_map(x: torch.Tensor) -> torch.Tensor:
    """(B, N, C) tokens of a square grid -> (B, C, H, W) feature map (row-major)."""
    batch, tokens, channels = x.shape
    side = square_side(tokens)
    return x.transpose(1, 2).reshape(batch, channels, side, side)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), positions flattened row-major."""
    return x.flatten(2).transpose(1, 2)


def set_fused_attn(model: nn.Module, enabled: bool) -> int:
    """Switch every attention module of `model` between the fused kernel and the explicit path.

    Returns how many modules were switched (the Performer blocks have no softmax attention).
    """
    switched = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = enabled
            switched += 1
    return switched
