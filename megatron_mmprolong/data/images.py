"""Page images as Qwen2.5-VL sees them: the processor's size rule, resizing, encoding.

`smart_resize` follows the rule of the Qwen2.5-VL image processor: each side rounded to a
multiple of 28 px (patch 14 x merge 2), then scaled down (floor) or up (ceil) by the square root
of the pixel-count excess so the area lands in [min_pixels, max_pixels]. Images are stored at
exactly that size, so the loader only decodes, normalises and cuts patches.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image

# The published Qwen2.5-VL preprocessor_config.json: 4 to 16384 vision tokens per image.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 16384


class ImageError(ValueError):
    pass


@dataclass(frozen=True)
class ImageParams:
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    format: str = "png"  # "png" (lossless) or "jpeg"
    jpeg_quality: int = 95

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def __post_init__(self):
        if self.format not in ("png", "jpeg"):
            raise ValueError(f"image format must be png or jpeg, got {self.format!r}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")


def smart_resize(height: int, width: int, params: ImageParams = ImageParams()) -> tuple[int, int]:
    factor = params.factor
    if min(height, width) <= 0:
        raise ImageError(f"image of {width}x{height} px has no area")
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"aspect ratio of {width}x{height} px exceeds 200")
    h = round(height / factor) * factor  # may round to 0; the min_pixels branch then scales up
    w = round(width / factor) * factor
    if h * w > params.max_pixels:
        shrink = math.sqrt(height * width / params.max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < params.min_pixels:
        grow = math.sqrt(params.min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


def grid_thw(height: int, width: int, params: ImageParams = ImageParams()) -> tuple[int, int, int]:
    """(t, h, w) in patches of an image already at its smart_resize size."""
    return 1, height // params.patch_size, width // params.patch_size


def vision_tokens(height: int, width: int, params: ImageParams = ImageParams()) -> int:
    """Language-model tokens of an image at its smart_resize size: one per 28x28 px."""
    return (height // params.factor) * (width // params.factor)


def prepare_image(image: Image.Image, params: ImageParams = ImageParams()) -> tuple[bytes, tuple[int, int, int]]:
    """RGB, resized as the processor would (bicubic), encoded; returns (bytes, grid)."""
    image = image.convert("RGB")
    height, width = smart_resize(image.height, image.width, params)
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    if params.format == "png":
        image.save(buffer, format="PNG", optimize=False)
    else:
        image.save(buffer, format="JPEG", quality=params.jpeg_quality)
    return buffer.getvalue(), grid_thw(height, width, params)


def open_image(path: str) -> Image.Image:
    """Decode an image file fully, or raise ImageError with the reason."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist") from None
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as err:
        raise ImageError(f"image {path} cannot be decoded ({err})") from None


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the header only, or ImageError."""
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"image {path} cannot be read ({err})") from None
