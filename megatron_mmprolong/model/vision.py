"""The Qwen2.5-VL vision encoder: patch embedding, 32 blocks of window/full attention with 2D
rotary, and the merger that turns each 2x2 patch group into one language-model token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor, nn

from megatron_mmprolong.config import VisionConfig
from megatron_mmprolong.model.attention import BlockSegments
from megatron_mmprolong.model.rotary import VisionRotaryEmbedding
from megatron_mmprolong.model.specs import Backend, backend_modules, merger_submodules, vision_block_spec
from megatron_mmprolong.model.vision_layout import VisionLayout


class PatchEmbed(nn.Module):
    """Conv3d with stride equal to its kernel (no bias) over [C, T, P, P] patches, computed as
    the single matmul it is. The weight keeps the Conv3d shape of the reference checkpoint."""

    def __init__(self, vision: VisionConfig, config: TransformerConfig):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(
                vision.hidden_size,
                vision.in_channels,
                vision.temporal_patch_size,
                vision.patch_size,
                vision.patch_size,
                dtype=config.params_dtype,
            )
        )
        if config.perform_initialization:
            config.init_method(self.weight)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [patches, C*T*P*P] -> [patches, hidden]."""
        return F.linear(pixel_values.to(self.weight.dtype), self.weight.flatten(1))


class PatchMerger(MegatronModule):
    """RMSNorm per patch, then an MLP over each group of merge x merge patches."""

    def __init__(
        self,
        vision: VisionConfig,
        vision_config: TransformerConfig,
        merger_config: TransformerConfig,
        backend: Backend,
        pg_collection: ProcessGroupCollection,
    ):
        super().__init__(config=merger_config)
        self.group_size = vision.merger_hidden_size
        self.norm = build_module(
            backend_modules(backend).norm,
            config=vision_config,
            hidden_size=vision.hidden_size,
            eps=vision.rms_norm_eps,
        )
        self.projector = MultimodalProjector(
            merger_config,
            merger_submodules(backend),
            "mlp",
            input_size=self.group_size,
            tp_group=pg_collection.tp,
        )

    def forward(self, hidden_states: Tensor) -> Tensor:
        """[patches, 1, hidden] (patches of a group adjacent) -> [groups, out_hidden]."""
        grouped = self.norm(hidden_states).reshape(-1, 1, self.group_size)
        return self.projector(grouped).squeeze(1)


class VisionEncoder(MegatronModule):
    def __init__(
        self,
        vision: VisionConfig,
        config: TransformerConfig,
        merger_config: TransformerConfig,
        backend: Backend,
        pg_collection: ProcessGroupCollection,
    ):
        super().__init__(config=config)
        self.vision = vision
        self.patch_embed = PatchEmbed(vision, config)
        self.rotary = VisionRotaryEmbedding(vision.head_dim, vision.rope_theta)
        self.decoder = TransformerBlock(
            config,
            vision_block_spec(backend, config),
            post_layer_norm=False,
            pg_collection=pg_collection,
        )
        self.merger = PatchMerger(vision, config, merger_config, backend, pg_collection)
        self.full_attention_layers = frozenset(i + 1 for i in vision.fullatt_block_indexes)

    def forward(self, pixel_values: Tensor, layout: VisionLayout) -> Tensor:
        """Patches in processor order -> merged tokens in processor order [groups, out_hidden]."""
        if pixel_values.shape[0] != layout.num_patches:
            raise ValueError(
                f"pixel values hold {pixel_values.shape[0]} patches but the grids describe "
                f"{layout.num_patches}"
            )
        hidden = self.patch_embed(pixel_values)
        unit = self.vision.spatial_merge_size**2
        hidden = hidden.view(-1, unit, hidden.shape[-1])[layout.window_index]
        hidden = hidden.view(-1, 1, hidden.shape[-1])  # [patches, batch=1, hidden], window order
        segments = BlockSegments(
            layout.window_segments, layout.frame_segments, self.full_attention_layers
        )
        hidden = self.decoder(
            hidden,
            attention_mask=None,
            rotary_pos_emb=self.rotary(layout.patch_positions),
            packed_seq_params=segments,
        )
        return self.merger(hidden)[layout.restore_index]
