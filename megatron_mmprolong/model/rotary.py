"""Rotary angles of Qwen2.5-VL and Qwen3-VL (M-RoPE, contiguous or interleaved sections, and the
vision encoder's 2D rotary), computed per token on the device of the positions.

Both modules return angles shaped [tokens, batch, 1, head_dim] in float32 (Megatron's rotary
layout, rotate-half convention), one value per token: a packed or context-parallel sequence
needs no slicing afterwards because its positions are already per token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _inverse_frequencies(dim: int, base: float) -> Tensor:
    # Same float32 arithmetic as the reference implementation, on the CPU, so that a model
    # built on the meta device or on a GPU gets bit-identical frequencies.
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    return 1.0 / (base**exponents)


class _Float32Frequencies(nn.Module):
    """Keeps the buffer `inv_freq` in float32 whatever dtype the module is cast to, while it
    still follows the module across devices. Megatron's Float16Module (`train --bf16`) calls
    `module.bfloat16()`, which casts every floating-point buffer: bf16 frequencies move the
    angles at 128K-256K by tens of radians, so a bf16 run would train under another RoPE than
    the fp32 one it is exported and evaluated with."""

    def _apply(self, fn, recurse=True):
        frequencies = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = frequencies.to(self.inv_freq.device)
        return self


class MRopeEmbedding(_Float32Frequencies):
    """Language-model M-RoPE: frequency j reads the temporal, height or width position
    according to `mrope_section`: in contiguous chunks (Qwen2.5-VL: 16 / 24 / 24 of the 64
    frequencies of a 128-dim head) or `interleaved` T,H,W,T,H,W,... while each axis has
    frequencies left, then T (Qwen3-VL: 24 / 20 / 20)."""

    def __init__(self, head_dim: int, base: float, mrope_section: tuple[int, int, int], interleaved: bool = False):
        super().__init__()
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
        self.register_buffer("inv_freq", _inverse_frequencies(head_dim, base), persistent=False)
        if interleaved:
            j = torch.arange(head_dim // 2, device="cpu")
            _, height, width = mrope_section
            axis = torch.where((j % 3 == 1) & (j < 3 * height), 1, torch.where((j % 3 == 2) & (j < 3 * width), 2, 0))
        else:
            axis = torch.tensor([a for a, n in enumerate(mrope_section) for _ in range(n)], device="cpu")
        self.register_buffer("axis_of_frequency", axis, persistent=False)

    def forward(self, position_ids: Tensor) -> Tensor:
        """position_ids [3, batch, seq] -> angles [seq, batch, 1, head_dim]."""
        positions = position_ids.index_select(0, self.axis_of_frequency.to(position_ids.device))
        angles = positions.permute(2, 1, 0).float() * self.inv_freq.to(position_ids.device)
        return torch.cat([angles, angles], dim=-1).unsqueeze(2)


class VisionRotaryEmbedding(_Float32Frequencies):
    """2D rotary of the vision blocks: half of the head's frequencies read the patch row,
    the other half the patch column."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", _inverse_frequencies(head_dim // 2, base), persistent=False)

    def forward(self, patch_positions: Tensor) -> Tensor:
        """patch_positions [patches, 2] (row, col) -> angles [patches, 1, 1, head_dim]."""
        inv_freq = self.inv_freq.to(patch_positions.device)
        angles = (patch_positions.float().unsqueeze(-1) * inv_freq).flatten(1)
        return torch.cat([angles, angles], dim=-1)[:, None, None, :]
