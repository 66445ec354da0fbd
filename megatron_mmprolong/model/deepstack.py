"""Deepstack (Qwen3-VL): the outputs of a few vision blocks get mergers of their own and are added
at the visual tokens to the outputs of the first language layers.

Both ends ride on the `context` argument that Megatron-Core's TransformerBlock hands from layer
to layer (and through its activation checkpoints), so the blocks run unchanged, recompute and
pipeline schedules included:
- in the vision block, a tapped layer appends its output to `context` and the last layer
  returns its output and the taps side by side on the hidden axis;
- in the language model, `context` holds the merged features of every level, [rows, batch,
  levels, hidden] (zeros at text rows), split over CP and SP ranks like the embeddings, and
  language layer i (0-based, global) adds level i to its output.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer


class DeepstackTapLayer(TransformerLayer):
    """A vision block whose output may feed a deepstack merger (its 0-based index in `taps`)."""

    def __init__(self, *args, taps: tuple[int, ...], **kwargs):
        super().__init__(*args, **kwargs)
        self.taps = frozenset(taps)

    def forward(self, *args, **kwargs):
        output, context = super().forward(*args, **kwargs)
        if self.layer_number - 1 in self.taps:
            context = output if context is None else torch.cat([context, output], dim=-1)
        if self.layer_number == self.config.num_layers:  # the block returns only hidden states
            output = torch.cat([output, context], dim=-1)
        return output, context


class DeepstackLanguageLayer(TransformerLayer):
    """A language layer that adds its deepstack level of `context` (if any) to its output."""

    def forward(self, *args, **kwargs):
        output, context = super().forward(*args, **kwargs)
        level = self.layer_number - 1
        if context is not None and level < context.shape[2]:
            output = output + context[:, :, level]
        return output, context
