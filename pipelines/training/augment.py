"""Image preprocessing: PIL transforms per sample (run in DataLoader workers: random resized crop,
flip, RandAugment-style ops for training; resize and centre crop for evaluation) and the tensor
steps on the device (normalisation), shared by training, evaluation and the packaged model
(docs/design/training.md).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image, ImageEnhance, ImageOps

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
Box = tuple[int, int, int, int]  # left, upper, right, lower


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> (3, H, W) uint8."""
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(image.height, image.width, 3).permute(2, 0, 1).contiguous()


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float, scaled to [0, 1] then standardised per channel."""
    return (images.float() / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def random_resized_crop_box(size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float],
                            rng: random.Random, attempts: int = 10) -> Box:
    """A box covering a random fraction `scale` of the area with an aspect ratio in `ratio`."""
    width, height = size
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    return _central_box(size, ratio)


def _central_box(size: tuple[int, int], ratio: tuple[float, float]) -> Box:
    """The whole image, cropped centrally to the nearest allowed aspect ratio."""
    width, height = size
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
    w, h = min(w, width), min(h, height)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _signed(magnitude: float, rng: random.Random) -> float:
    return magnitude if rng.random() < 0.5 else -magnitude


def _affine(image: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR)


def _enhance(enhancer) -> Callable[[Image.Image, float, random.Random], Image.Image]:
    return lambda image, m, rng: enhancer(image).enhance(1.0 + _signed(0.9 * m, rng))


# RandAugment ops: (image, magnitude in [0, 1], rng) -> image.
RANDAUGMENT_OPS: dict[str, Callable[[Image.Image, float, random.Random], Image.Image]] = {
    "identity": lambda image, m, rng: image,
    "autocontrast": lambda image, m, rng: ImageOps.autocontrast(image),
    "equalize": lambda image, m, rng: ImageOps.equalize(image),
    "rotate": lambda image, m, rng: image.rotate(_signed(30.0 * m, rng), Image.Resampling.BILINEAR),
    "solarize": lambda image, m, rng: ImageOps.solarize(image, round(255 - 255 * m)),
    "posterize": lambda image, m, rng: ImageOps.posterize(image, 8 - round(4 * m)),
    "color": _enhance(ImageEnhance.Color),
    "contrast": _enhance(ImageEnhance.Contrast),
    "brightness": _enhance(ImageEnhance.Brightness),
    "sharpness": _enhance(ImageEnhance.Sharpness),
    "shear_x": lambda image, m, rng: _affine(image, (1, _signed(0.3 * m, rng), 0, 0, 1, 0)),
    "shear_y": lambda image, m, rng: _affine(image, (1, 0, 0, _signed(0.3 * m, rng), 1, 0)),
    "translate_x": lambda image, m, rng: _affine(image, (1, 0, _signed(0.45 * m * image.width, rng), 0, 1, 0)),
    "translate_y": lambda image, m, rng: _affine(image, (1, 0, 0, 0, 1, _signed(0.45 * m * image.height, rng))),
}


def rand_augment(image: Image.Image, ops: int, magnitude: float, rng: random.Random) -> Image.Image:
    """Apply `ops` ops drawn uniformly (with replacement) at `magnitude` (0-10)."""
    for name in rng.choices(list(RANDAUGMENT_OPS), k=ops):
        image = RANDAUGMENT_OPS[name](image, magnitude / 10.0, rng)
    return image


@dataclass(frozen=True)
class TrainTransform:
    img_size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float
    randaugment_ops: int
    randaugment_magnitude: float
    interpolation: str

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        box = random_resized_crop_box(image.size, self.scale, self.ratio, rng)
        image = image.resize((self.img_size, self.img_size), INTERPOLATIONS[self.interpolation], box=box)
        if rng.random() < self.hflip:
            image = ImageOps.mirror(image)
        image = rand_augment(image, self.randaugment_ops, self.randaugment_magnitude, rng)
        return to_uint8_tensor(image)


@dataclass(frozen=True)
class EvalTransform:
    img_size: int
    crop_pct: float
    interpolation: str

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """Deterministic: `rng` is accepted (and unused) so that both transforms read alike."""
        short_side = math.floor(self.img_size / self.crop_pct)
        scale = short_side / min(image.size)
        resized = (max(self.img_size, round(image.width * scale)), max(self.img_size, round(image.height * scale)))
        image = image.resize(resized, INTERPOLATIONS[self.interpolation])
        left, top = (image.width - self.img_size) // 2, (image.height - self.img_size) // 2
        return to_uint8_tensor(image.crop((left, top, left + self.img_size, top + self.img_size)))
