"""Page images as the model's image processor sees them: its size rule, resizing, encoding, and
its normalisation (applied later, on the device, by megatron_mmprolong/patchify.py).

`smart_resize` follows the rule of the Qwen2.5-VL and Qwen3-VL image processors: each side
rounded to a multiple of patch x merge px (28 or 32), then scaled down (floor) or up (ceil) by the
square root of the pixel-count excess so the area lands in [min_pixels, max_pixels]. Images are
stored at exactly that size, so the loader only decodes, normalises and cuts patches.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass

from PIL import Image

from megatron_mmprolong.config import VisionConfig, VLConfig

_QWEN25 = VisionConfig()


class ImageError(ValueError):
    pass


@dataclass(frozen=True)
class ImageParams:
    """One model family's image processor (defaults: Qwen2.5-VL's) and how pages are stored."""

    min_pixels: int = _QWEN25.min_pixels
    max_pixels: int = _QWEN25.max_pixels
    patch_size: int = _QWEN25.patch_size
    merge_size: int = _QWEN25.spatial_merge_size
    temporal_patch_size: int = _QWEN25.temporal_patch_size
    mean: tuple[float, float, float] = _QWEN25.image_mean
    std: tuple[float, float, float] = _QWEN25.image_std
    format: str = "png"  # "png" (lossless) or "jpeg"
    jpeg_quality: int = 95

    @classmethod
    def for_model(cls, vision: VisionConfig, min_pixels: int | None = None, max_pixels: int | None = None,
                  **storage) -> "ImageParams":
        """The processor of the model whose vision config is `vision`; pixel bounds default to its."""
        return cls(min_pixels=vision.min_pixels if min_pixels is None else min_pixels,
                   max_pixels=vision.max_pixels if max_pixels is None else max_pixels,
                   patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                   temporal_patch_size=vision.temporal_patch_size, mean=tuple(vision.image_mean),
                   std=tuple(vision.image_std), **storage)

    @classmethod
    def for_family(cls, family: str, **kwargs) -> "ImageParams":
        """The processor of a model family (transformers' model_type: qwen2_5_vl, qwen3_vl)."""
        families = VLConfig.families()
        if family not in families:
            raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(families)}")
        return cls.for_model(families[family]().vision, **kwargs)

    @classmethod
    def from_manifest(cls, image: dict) -> "ImageParams":
        """The params a dataset was built with (its manifest's "image"); datasets built before
        the mean/std were recorded are Qwen2.5-VL's."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in image.items() if k in names}
        return cls(**known)

    def processor_mismatch(self, vision: VisionConfig) -> list[str]:
        """How these params differ from the processor of the model `vision` describes ([] if not)."""
        model = ImageParams.for_model(vision)
        return [f"{name} {getattr(self, name)} (the model's: {getattr(model, name)})"
                for name in ("patch_size", "merge_size", "temporal_patch_size", "mean", "std")
                if getattr(self, name) != getattr(model, name)]

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
    """Language-model tokens of an image at its smart_resize size: one per factor x factor px."""
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
