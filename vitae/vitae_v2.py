"""ViTAEv2: four stages, window attention in stages 1-2 and global attention in stages 3-4.

Paper: Zhang et al., "ViTAEv2: Vision Transformer Advanced by Exploring Inductive Bias for Image
Recognition and Beyond", IJCV 2022. Reference implementation: `ViTAE-Transformer/ViTAE-Transformer`,
`Image-Classification/vitaev2/` (`ViTAEv2_S`, `ViTAEv2_48M`, `ViTAEv2_B`); state_dict keys match it.
Windows are 7x7 without shift, mask or relative-position bias, as in the published checkpoints.
"""

from __future__ import annotations

from .cells import NormalCell, PyramidReduction, ReductionCell, TokenTransformerBlock, WindowTokenBlock
from .layers import conv_stack, drop_path_rates, pcm_strides
from .model import Stage, ViTAE, image_cfg
from .factory import register_model
from .vitae_v1 import _override, check_groups, check_img_size, normal_cell_pcm

KERNEL_SIZES = (7, 3, 3, 3)
DILATIONS = ((1, 2, 3, 4), (1, 2, 3), (1, 2), (1, 2))
DOWNSAMPLE_RATIOS = (4, 2, 2, 2)
WINDOW_STAGES = (True, True, False, False)
NC_GROUPS = (1, 32, 64, 128)
RC_GROUPS = (1, 16, 32, 64)
WINDOW_SIZE = 7


def _reduction_cell(stage: int, in_chans: int, embed_dim: int, token_dim: int, num_heads: int) -> ReductionCell:
    prm = PyramidReduction(in_chans, embed_dim, KERNEL_SIZES[stage], DOWNSAMPLE_RATIOS[stage], DILATIONS[stage])
    groups = RC_GROUPS[stage]
    check_groups(in_chans, groups, f"stage {stage + 1} reduction-cell PCM")
    pcm = conv_stack((in_chans, embed_dim, embed_dim, token_dim), groups,
                     strides=pcm_strides(DOWNSAMPLE_RATIOS[stage]), batch_norms=(True, True))
    if WINDOW_STAGES[stage]:
        block = WindowTokenBlock(prm.out_chans, token_dim, num_heads, WINDOW_SIZE)
    else:
        block = TokenTransformerBlock(prm.out_chans, token_dim, num_heads)
    return ReductionCell(prm, pcm, block)


def _create_vitaev2(embed_dims: tuple[int, ...], token_dims: tuple[int, ...], depths: tuple[int, ...],
                    nc_heads: tuple[int, ...], rc_heads: tuple[int, ...], depth: int, mlp_ratio: float, *,
                    num_classes: int, img_size: int, in_chans: int, drop_path_rate: float,
                    cumulative_drop_path: bool = False) -> ViTAE:
    check_img_size(img_size, 32, "ViTAEv2")
    depths = (*depths[:2], depth, depths[3])
    rates = drop_path_rates(depths, drop_path_rate, cumulative_drop_path)
    stages, channels = [], in_chans
    for i, token_dim in enumerate(token_dims):
        cells = [NormalCell(token_dim, nc_heads[i], mlp_ratio,
                            normal_cell_pcm(token_dim, mlp_ratio, NC_GROUPS[i], final_act=False),
                            drop_path_rate=rate, window_size=WINDOW_SIZE if WINDOW_STAGES[i] else None)
                 for rate in rates[i]]
        stages.append(Stage(_reduction_cell(i, channels, embed_dims[i], token_dim, rc_heads[i]), cells))
        channels = token_dim
    return ViTAE(stages, token_dims[-1], num_classes, pretrained_cfg=image_cfg(img_size, in_chans, family="vitaev2"))


@register_model
def vitaev2_s(depth=None, mlp_ratio=None, **kwargs) -> ViTAE:
    arch = dict(embed_dims=(64, 64, 128, 256), token_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2),
                nc_heads=(1, 2, 4, 8), rc_heads=(1, 1, 2, 4), depth=8, mlp_ratio=4.0)
    return _create_vitaev2(**_override(arch, depth, mlp_ratio), **kwargs)


@register_model
def vitaev2_48m(depth=None, mlp_ratio=None, **kwargs) -> ViTAE:
    arch = dict(embed_dims=(64, 64, 192, 384), token_dims=(96, 192, 384, 768), depths=(2, 2, 11, 2),
                nc_heads=(1, 2, 4, 8), rc_heads=(1, 1, 2, 4), depth=11, mlp_ratio=4.0)
    return _create_vitaev2(**_override(arch, depth, mlp_ratio), **kwargs)


@register_model
def vitaev2_b(depth=None, mlp_ratio=None, **kwargs) -> ViTAE:
    arch = dict(embed_dims=(96, 96, 256, 512), token_dims=(128, 256, 512, 1024), depths=(2, 2, 12, 2),
                nc_heads=(1, 4, 8, 16), rc_heads=(1, 1, 4, 8), depth=12, mlp_ratio=4.0)
    return _create_vitaev2(**_override(arch, depth, mlp_ratio), **kwargs)
