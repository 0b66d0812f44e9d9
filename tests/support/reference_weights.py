"""Deterministic, module-order-independent weights for reference-equivalence tests.

Every tensor of a state_dict template is filled from its *key name and shape only* (a generator
seeded with ``zlib.crc32(key) + seed``), so two implementations exposing the same state_dict keys
receive bit-identical weights no matter how their modules are built or ordered. The magnitudes keep
activations of deep ViTAE stacks finite and non-degenerate (see ``make_reference_logits.py``).
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor

# The performer's kqv projection gets a smaller gain so that |k|^2/2 and |q|^2/2 inside
# exp(w.x - |x|^2/2) stay O(1): with unit-variance k/q the positive random features underflow
# (~e^-60) and the 1e-8 epsilon of the normaliser would dominate, hiding the attention path.
_KQV_GAIN = 0.25


def _generator(key: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")) + int(seed))


def _fill(key: str, shape: tuple[int, ...], seed: int) -> Tensor:
    g = _generator(key, seed)
    leaf = key.rsplit(".", 1)[-1]
    randn = lambda: torch.randn(shape, generator=g, dtype=torch.float32)  # noqa: E731
    if leaf == "running_var":
        return 0.5 + torch.rand(shape, generator=g, dtype=torch.float32)
    if leaf == "running_mean":
        return 0.1 * randn()
    if leaf == "bias":
        return 0.02 * randn()
    if leaf == "weight" and len(shape) == 1:  # LayerNorm / BatchNorm affine scale
        return 1.0 + 0.1 * randn()
    if leaf == "w":  # performer's frozen random-feature matrix (m, e)
        return randn()
    if leaf in ("cls_token", "pos_embed"):
        return 0.02 * randn()
    numel = math.prod(shape)
    fan_in = max(1, numel // shape[0]) if shape else 1
    gain = _KQV_GAIN if key.endswith("kqv.weight") else 1.0
    return randn() * (gain / math.sqrt(fan_in))


def deterministic_state_dict(template: dict[str, Tensor], seed: int = 0) -> dict[str, Tensor]:
    """Return a new state_dict with the template's keys, shapes and dtypes, filled deterministically.

    Integer/bool tensors (``num_batches_tracked``, ``relative_position_index``, ...) are copied
    unchanged; floating tensors are drawn from a generator seeded by ``crc32(key) + seed``.
    """
    out: dict[str, Tensor] = {}
    for key, ref in template.items():
        if not torch.is_floating_point(ref):
            out[key] = ref.detach().clone()
            continue
        value = _fill(key, tuple(ref.shape), seed)
        out[key] = value.to(dtype=ref.dtype)
    return out
