"""ViTAE v1 (three stages of reduction cells, normal cells in the last) and isotropic ViTAE
(16x16 patch embedding, class token, a stack of normal cells with a shallow PCM).

Paper: Xu et al., "ViTAE: Vision Transformer Advanced by Exploring Intrinsic Inductive Bias",
NeurIPS 2021. Reference implementation: `ViTAE-Transformer/ViTAE-Transformer`,
`Image-Classification/vitae/` (`ViTAE_basic_Tiny` ... `ViTAE_basic_Huge`); state_dict keys match it.
"""

from __future__ import annotations

from torch import nn

from .cells import EmbeddingCell, NormalCell, PerformerBlock, PyramidReduction, PyramidReductionCell, ReductionCell
from .layers import conv_stack, drop_path_rates, pcm_strides
from .model import Stage, ViTAE, image_cfg
from .factory import register_model

KERNEL_SIZES = (7, 3, 3)
DILATIONS = ((1, 2, 3, 4), (1, 2, 3), (1, 2))
DOWNSAMPLE_RATIOS = (4, 2, 2)
PATCH_SIZE = 16


def check_groups(channels: int, groups: int, what: str) -> None:
    if channels % groups:
        raise ValueError(f"{what}: {channels} channels are not divisible into {groups} groups")


def check_img_size(img_size: int, multiple: int, family: str) -> None:
    if img_size <= 0 or img_size % multiple:
        raise ValueError(f"{family} models need a square image size divisible by {multiple}, got {img_size}")


def normal_cell_pcm(dim: int, mlp_ratio: float, groups: int, shallow: bool = False, final_act: bool = True) -> nn.Sequential:
    """The NC's PCM: dim -> dim*mlp_ratio -> dim (shallow) or -> dim -> dim (full)."""
    hidden = int(dim * mlp_ratio)
    check_groups(hidden, groups, f"normal-cell PCM with mlp_ratio={mlp_ratio}")
    if shallow:
        return conv_stack((dim, hidden, dim), groups, batch_norms=(True,))
    return conv_stack((dim, hidden, dim, dim), groups, batch_norms=(True, True), final_act=final_act)


def _create_vitae(embed_dims: tuple[int, int, int], token_dims: tuple[int, int, int], depth: int,
                  num_heads: int, mlp_ratio: float, nc_groups: int, *, num_classes: int, img_size: int,
                  in_chans: int, drop_path_rate: float, cumulative_drop_path: bool = False,
                  performer_drop_rate: float = 0.1) -> ViTAE:
    check_img_size(img_size, 16, "ViTAE v1")
    nc_rates = drop_path_rates((0, 0, depth), drop_path_rate, cumulative_drop_path)[2]
    stages, channels = [], in_chans
    for i, (embed_dim, token_dim) in enumerate(zip(embed_dims, token_dims)):
        prm = PyramidReduction(channels, embed_dim, KERNEL_SIZES[i], DOWNSAMPLE_RATIOS[i], DILATIONS[i])
        if i < 2:
            pcm = conv_stack((channels, embed_dim, embed_dim, token_dim), groups=1,
                             strides=pcm_strides(DOWNSAMPLE_RATIOS[i]), batch_norms=(False, True), final_act=True)
            block = PerformerBlock(prm.out_chans, token_dim, drop_rate=performer_drop_rate)
            stages.append(Stage(ReductionCell(prm, pcm, block), []))
        else:
            if prm.out_chans != token_dim:
                raise ValueError(f"last-stage token width must be {prm.out_chans} (PRM output), got {token_dim}")
            cells = [NormalCell(token_dim, num_heads, mlp_ratio, normal_cell_pcm(token_dim, mlp_ratio, nc_groups),
                                drop_path_rate=rate) for rate in nc_rates]
            stages.append(Stage(PyramidReductionCell(prm), cells))
        channels = token_dim
    return ViTAE(stages, token_dims[-1], num_classes, pretrained_cfg=image_cfg(img_size, in_chans, family="vitae"))


def _create_isotropic(embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, nc_groups: int, *,
                      num_classes: int, img_size: int, in_chans: int, drop_path_rate: float,
                      cumulative_drop_path: bool = False) -> ViTAE:
    check_img_size(img_size, PATCH_SIZE, "isotropic ViTAE")
    rates = drop_path_rates((0, 0, depth), drop_path_rate, cumulative_drop_path)[2]
    embedding = EmbeddingCell(in_chans, embed_dim, PATCH_SIZE, (img_size // PATCH_SIZE) ** 2)
    cells = [NormalCell(embed_dim, num_heads, mlp_ratio, normal_cell_pcm(embed_dim, mlp_ratio, nc_groups, shallow=True),
                        drop_path_rate=rate, class_token=True) for rate in rates]
    # The reference keeps the three-stage shell: every normal cell sits in stage 3 (`layers.2.NC`).
    stages = [Stage(embedding, []), Stage(nn.Identity(), []), Stage(nn.Identity(), cells)]
    return ViTAE(stages, embed_dim, num_classes, class_token=True,
                 pretrained_cfg=image_cfg(img_size, in_chans, family="vitae_isotropic"))


def _override(arch: dict, depth: int | None, mlp_ratio: float | None) -> dict:
    return {**arch, **({"depth": depth} if depth is not None else {}),
            **({"mlp_ratio": mlp_ratio} if mlp_ratio is not None else {})}


@register_model
def vitae_t(depth=None, mlp_ratio=None, **kwargs) -> ViTAE:
    arch = dict(embed_dims=(64, 64, 128), token_dims=(64, 64, 256), depth=7, num_heads=4, mlp_ratio=2.0, nc_groups=64)
    return _create_vitae(**_override(arch, depth, mlp_ratio), **kwargs)


@register_model
def vitae_6m(depth=None, mlp_ratio=None, **kwargs) -> ViTAE:
    arch = dict(embed_dims=(64, 64, 128), token_dims=(64, 64, 256), depth=10, num_heads=4, mlp_ratio=2.0, nc_groups=64)
    return _create_vitae(**_override(arch, depth, mlp_ratio), **kwargs)


@register_model
def vitae_13m(depth=None, mlp_ratio=None, **kwargs) -> ViTAE:
    arch = dict(embed_dims=(64, 64, 160), token_dims=(64, 64, 320), depth=11, num_heads=5, mlp_ratio=2.0, nc_groups=64)
    return _create_vitae(**_override(arch, depth, mlp_ratio), **kwargs)


@register_model
def vitae_s(depth=None, mlp_ratio=None, **kwargs) -> ViTAE:
    arch = dict(embed_dims=(64, 64, 192), token_dims=(96, 192, 384), depth=14, num_heads=6, mlp_ratio=3.0, nc_groups=96)
    return _create_vitae(**_override(arch, depth, mlp_ratio), **kwargs)


@register_model
def vitae_b(depth=None, mlp_ratio=None, **kwargs) -> ViTAE:
    arch = dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, nc_groups=192)
    return _create_isotropic(**_override(arch, depth, mlp_ratio), **kwargs)


@register_model
def vitae_l(depth=None, mlp_ratio=None, **kwargs) -> ViTAE:
    arch = dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, nc_groups=256)
    return _create_isotropic(**_override(arch, depth, mlp_ratio), **kwargs)


@register_model
def vitae_h(depth=None, mlp_ratio=None, **kwargs) -> ViTAE:
    arch = dict(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0, nc_groups=320)
    return _create_isotropic(**_override(arch, depth, mlp_ratio), **kwargs)
