"""Stored page images -> uint8 RGB pages `[pixels, 3]` (each image's HWC rows back to back, the
form the loader ships; megatron_mmprolong/patchify.py turns them into the vision encoder's
input on the device), and, for callers that need transformers' `pixel_values`, the same patches
made on the host.

Decoding runs on PIL (default) or NVIDIA DALI (`image_backend="dali"`), which decodes whole
batches in its own threads, on the CPU or, with `dali_device="gpu"`, on the GPU.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from megatron_mmprolong.data.images import ImageParams
from megatron_mmprolong.patchify import patchify


class PilDecoder:
    def __call__(self, images: list[bytes]) -> list[np.ndarray]:
        out = []
        for data in images:
            with Image.open(io.BytesIO(data)) as image:
                out.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
        return out


class DaliDecoder:
    """One DALI pipeline per process (built on first use): decode a batch to RGB uint8."""

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
            return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)

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


def decode_pages(images: list[bytes], grids: np.ndarray, decode, patch: int) -> np.ndarray:
    """Decoded images, checked against their grids, back to back: uint8 [pixels, 3]."""
    if not images:
        return np.zeros((0, 3), dtype=np.uint8)
    decoded = decode(images)
    for image, (t, h, w) in zip(decoded, grids):
        if image.shape[:2] != (h * patch, w * patch):
            raise ValueError(f"stored image of {image.shape[1]}x{image.shape[0]} px does not match its grid {h}x{w}")
    return np.concatenate([image.reshape(-1, 3) for image in decoded])


def patchify_pages(pages: torch.Tensor, grids: torch.Tensor, image: ImageParams) -> torch.Tensor:
    """`patchify` with the processor settings `image` (a dataset's, or a model family's)."""
    return patchify(pages, grids, image.patch_size, image.merge_size, image.temporal_patch_size,
                    mean=image.mean, std=image.std)


def pixel_values(images: list[bytes], grids: np.ndarray, decode, image: ImageParams) -> np.ndarray:
    """transformers' `pixel_values` of all images of a sample: [sum of t*h*w, C*temporal*patch*patch]."""
    decoded = torch.from_numpy(decode_pages(images, grids, decode, image.patch_size))
    return patchify_pages(decoded, torch.from_numpy(np.asarray(grids, dtype=np.int64)).reshape(-1, 3), image).numpy()


def sample_pixels(store, index: int, decode) -> tuple[np.ndarray, np.ndarray]:
    """(pixel values, grids) of one sample of a `MultimodalStore`, with the store's image parameters."""
    grids = store.image_grids(index)
    pixels = pixel_values(store.image_bytes(index), grids, decode, store.image_params)
    return pixels, grids
