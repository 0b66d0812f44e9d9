"""ViTAE vision transformers in pure PyTorch: v1, isotropic, v2 and the article API.

    import vitae
    model = vitae.create_model("vitae_t", num_classes=10, img_size=32)
    vitae.load_pretrained(model, "ViTAE-T.pth.tar")

Checkpoint-compatible with the reference implementation; no Ray, MLflow or S3 imports here.
"""

from . import vitae_v1, vitae_v2  # noqa: F401  (registers the named models)
from .article import EfficientAttention, MLP, MultiHeadAttention, PatchEmbed, ReductionModule, ViTAEBlock, ViTAETransformer
from .pretrained import checkpoint_filter_fn, load_pretrained
from .layers import set_fused_attn
from .model import ViTAE
from .factory import create_model, is_model, list_models, register_model

__all__ = [
    "create_model", "list_models", "is_model", "register_model", "load_pretrained", "checkpoint_filter_fn",
    "set_fused_attn", "ViTAE", "ViTAEBlock", "EfficientAttention", "MultiHeadAttention", "ReductionModule",
    "ViTAETransformer", "PatchEmbed", "MLP",
]
