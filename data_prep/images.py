"""Encoded image bytes: full-decode validation, format detection from the bytes, optional downscale
(re-encoded copy), RGB decoding.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}
# Re-encoding after a resize: BMP becomes PNG (lossless, compressed).
REENCODE = {"jpg": ("JPEG", {"quality": 95}), "png": ("PNG", {}), "webp": ("WEBP", {"quality": 95}),
            "bmp": ("PNG", {})}


class RejectedImage(Exception):
    """The bytes are not a usable image; the message says why."""


def decode(data: bytes) -> Image.Image:
    """Fully decode `data` (raises on corrupt or truncated input)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright (EXIF orientation applied) RGB pixels."""
    return ImageOps.exif_transpose(image).convert("RGB")


def prepare_image(data: bytes, max_side: int | None = None) -> tuple[bytes, str]:
    """Validate `data`; return the bytes to store and their extension (jpg, png, webp, bmp)."""
    try:
        image = decode(data)
    except UnidentifiedImageError:
        raise RejectedImage("not an image (format not recognised)") from None
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise RejectedImage(f"not a decodable image ({type(error).__name__}: {error})") from None
    extension = FORMAT_EXTENSIONS.get(image.format or "")
    if extension is None:
        raise RejectedImage(f"unsupported image format {image.format}")
    if max_side is None or max(image.size) <= max_side:
        return data, extension
    return _downscaled(image, extension, max_side)


def _downscaled(image: Image.Image, extension: str, max_side: int) -> tuple[bytes, str]:
    image = ImageOps.exif_transpose(image)
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    pil_format, options = REENCODE[extension]
    if pil_format == "JPEG" and image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format, **options)
    return buffer.getvalue(), FORMAT_EXTENSIONS[pil_format]
