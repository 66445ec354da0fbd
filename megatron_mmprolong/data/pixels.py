"""Stored page images -> the vision encoder's input, as Qwen2.5-VL's image processor makes it:
RGB, scaled to [0, 1], normalised with the CLIP mean/std, duplicated to 2 frames and cut into
14x14 patches in merge-group order: [patches, 3 * 2 * 14 * 14] float32 per image.

Decoding runs on PIL (default) or NVIDIA DALI (`image_backend="dali"`), which decodes and
normalises whole batches in its own threads, on the CPU or, with `dali_device="gpu"`, on the GPU.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# CLIP normalisation used by the Qwen2.5-VL image processor.
IMAGE_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
IMAGE_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def patchify(image: np.ndarray, patch: int = 14, merge: int = 2, temporal: int = 2) -> np.ndarray:
    """Normalised [C, H, W] float32 -> [(H/14)*(W/14), C*temporal*14*14] in merge-group order."""
    channels, height, width = image.shape
    gh, gw = height // patch, width // patch
    grid = image.reshape(channels, gh // merge, merge, patch, gw // merge, merge, patch)
    grid = grid.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    grid = np.broadcast_to(grid[:, :, :, :, :, None], (*grid.shape[:5], temporal, patch, patch))
    return np.ascontiguousarray(grid).reshape(gh * gw, channels * temporal * patch * patch)


class PilDecoder:
    def __call__(self, images: list[bytes]) -> list[np.ndarray]:
        out = []
        for data in images:
            with Image.open(io.BytesIO(data)) as image:
                rgb = np.asarray(image.convert("RGB"), dtype=np.float32) * np.float32(1 / 255)
            out.append(((rgb - IMAGE_MEAN) / IMAGE_STD).transpose(2, 0, 1))
        return out


class DaliDecoder:
    """One DALI pipeline per process (built on first use): decode + normalise a batch."""

    def __init__(self, device: str = "cpu", max_batch: int = 256, threads: int = 2):
        self.device, self.max_batch, self.threads = device, max_batch, threads
        self._pipe = None

    def _build(self):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        gpu = self.device == "gpu"

        @pipeline_def(batch_size=self.max_batch, num_threads=self.threads, device_id=0 if gpu else None,
                      prefetch_queue_depth=1)
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            decoded = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
            return fn.crop_mirror_normalize(
                decoded, dtype=types.FLOAT, output_layout="CHW",
                mean=(IMAGE_MEAN * 255).tolist(), std=(IMAGE_STD * 255).tolist(),
            )

        self._pipe = pipeline()
        self._pipe.build()

    def __call__(self, images: list[bytes]) -> list[np.ndarray]:
        if self._pipe is None:
            self._build()
        out = []
        for start in range(0, len(images), self.max_batch):
            chunk = [np.frombuffer(data, dtype=np.uint8) for data in images[start:start + self.max_batch]]
            self._pipe.feed_input("encoded", chunk)
            (batch,) = self._pipe.run()
            if self.device == "gpu":
                batch = batch.as_cpu()
            out += [np.array(batch[i]) for i in range(len(chunk))]
        return out


def decoder(backend: str = "pil", device: str = "cpu"):
    if backend == "pil":
        return PilDecoder()
    if backend == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            raise ValueError("image backend dali needs NVIDIA DALI: pip install nvidia-dali-cuda120") from None
        return DaliDecoder(device)
    raise ValueError(f"image backend must be pil or dali, got {backend!r}")


def pixel_values(images: list[bytes], grids: np.ndarray, decode, patch: int = 14, merge: int = 2,
                 temporal: int = 2) -> np.ndarray:
    """All images of a sample (or pack), concatenated: [sum of t*h*w, C*temporal*patch*patch]."""
    if not images:
        return np.zeros((0, 3 * temporal * patch * patch), dtype=np.float32)
    decoded = decode(images)
    for image, (t, h, w) in zip(decoded, grids):
        if image.shape[1:] != (h * patch, w * patch):
            raise ValueError(f"stored image of {image.shape[2]}x{image.shape[1]} px does not match its grid {h}x{w}")
    return np.concatenate([patchify(image, patch, merge, temporal) for image in decoded])


def sample_pixels(store, index: int, decode) -> tuple[np.ndarray, np.ndarray]:
    """(pixel values, grids) of one sample of a `MultimodalStore`, with the store's image parameters."""
    image, grids = store.manifest["image"], store.image_grids(index)
    pixels = pixel_values(store.image_bytes(index), grids, decode, image["patch_size"], image["merge_size"],
                          image["temporal_patch_size"])
    return pixels, grids
