"""The vision encoder of both families: patch embedding (plus, for Qwen3-VL, a learned position
grid resampled to each image), blocks of window or frame attention with 2D rotary, the merger
that turns each 2x2 patch group into one language-model token, and Qwen3-VL's deepstack mergers."""

from __future__ import annotations

import torch
import torch.distributed as dist
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
    """Conv3d with stride equal to its kernel over [C, T, P, P] patches, computed as the single
    matmul it is. The weight keeps the Conv3d shape of the reference checkpoint."""

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
        self.bias = (
            nn.Parameter(torch.zeros(vision.hidden_size, dtype=config.params_dtype))
            if vision.patch_embed_bias
            else None
        )
        if config.perform_initialization:
            config.init_method(self.weight)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [patches, C*T*P*P] -> [patches, hidden]."""
        return F.linear(pixel_values.to(self.weight.dtype), self.weight.flatten(1), self.bias)


class PositionGrid(nn.Module):
    """A learned square grid of position embeddings (Qwen3-VL: 48 x 48), resampled bilinearly to
    each image's patch grid: every patch adds the weighted sum of its four nearest grid points
    (`VisionLayout.position_taps`, computed from the grids alone)."""

    def __init__(self, vision: VisionConfig, config: TransformerConfig):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(vision.num_position_embeddings, vision.hidden_size, dtype=config.params_dtype)
        )
        if config.perform_initialization:
            config.init_method(self.weight)

    def forward(self, taps: Tensor, weights: Tensor) -> Tensor:
        """taps, weights [patches, 4] -> [patches, hidden]."""
        return (self.weight[taps] * weights.unsqueeze(-1)).sum(1)


class PatchMerger(MegatronModule):
    """A norm per patch (or, `norm_after_grouping`, per group), then an MLP over each group of
    merge x merge patches."""

    def __init__(
        self,
        vision: VisionConfig,
        vision_config: TransformerConfig,
        merger_config: TransformerConfig,
        backend: Backend,
        pg_collection: ProcessGroupCollection,
        norm_after_grouping: bool = False,
    ):
        super().__init__(config=merger_config)
        self.group_size = vision.merger_hidden_size
        self.norm_after_grouping = norm_after_grouping
        self.norm = build_module(
            backend_modules(backend).norm,
            config=vision_config,
            hidden_size=self.group_size if norm_after_grouping else vision.hidden_size,
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
        if self.norm_after_grouping:
            grouped = self.norm(hidden_states.reshape(-1, 1, self.group_size))
        else:
            grouped = self.norm(hidden_states).reshape(-1, 1, self.group_size)
        return self.projector(grouped).squeeze(1)


class MergerList(nn.ModuleList):
    """The deepstack mergers. A plain ModuleList would be checkpointed as replicated tensors,
    so its tensor-parallel shards get the names and offsets of each merger's own."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        state = {}
        for index, merger in enumerate(self):
            state.update(merger.sharded_state_dict(f"{prefix}{index}.", sharded_offsets, metadata))
        return state


def mark_vision_copies(encoder: nn.Module, language_tp, vision_tp) -> None:
    """With a vision TP group smaller than the language model's, each TP group holds TP /
    vision-TP copies of the encoder, one per vision-TP subgroup; they encode the same images, so
    their gradients are equal. Megatron's gradient norm (and zero count) counts a
    tensor-parallel parameter on every TP rank and any other one on TP rank 0, which would count
    the vision shards once per copy. So every copy but the one holding TP rank 0 marks its
    parameters `shared`: the attribute Megatron gives a tied embedding's second copy, read only
    by the norm and zero count (`param_is_not_shared`) and carried to the optimizers' main
    parameters; DDP, finalize_model_grads and checkpoints do not read it, and
    `tensor_model_parallel` stays true of the shards."""
    if vision_tp is language_tp or vision_tp.size() == language_tp.size():
        return
    if dist.get_global_rank(language_tp, 0) in dist.get_process_group_ranks(vision_tp):
        return
    for param in encoder.parameters():
        param.shared = True


class VisionEncoder(MegatronModule):
    """Patches in processor order -> merged tokens in processor order [groups, out_width]: the
    merger's features, then (Qwen3-VL) each deepstack level's, side by side on the last axis."""

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
        self.position_grid = PositionGrid(vision, config) if vision.num_position_embeddings else None
        self.rotary = VisionRotaryEmbedding(vision.head_dim, vision.rope_theta)
        self.decoder = TransformerBlock(
            config,
            vision_block_spec(backend, config, vision.deepstack_visual_indexes),
            post_layer_norm=False,
            pg_collection=pg_collection,
        )
        self.merger = PatchMerger(vision, config, merger_config, backend, pg_collection)
        self.deepstack_mergers = MergerList(
            PatchMerger(vision, config, merger_config, backend, pg_collection, norm_after_grouping=True)
            for _ in vision.deepstack_visual_indexes
        )
        self.full_attention_layers = frozenset(i + 1 for i in vision.fullatt_block_indexes)

    @property
    def out_width(self) -> int:
        return self.vision.out_hidden_size * (1 + len(self.deepstack_mergers))

    def forward(self, pixel_values: Tensor, layout: VisionLayout) -> Tensor:
        if pixel_values.shape[0] != layout.num_patches:
            raise ValueError(
                f"pixel values hold {pixel_values.shape[0]} patches but the grids describe "
                f"{layout.num_patches}"
            )
        hidden = self.patch_embed(pixel_values)
        if self.position_grid is not None:
            hidden = hidden + self.position_grid(layout.position_taps, layout.position_weights).to(hidden.dtype)
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
        if not self.deepstack_mergers:
            return self.merger(hidden)[layout.restore_index]
        # with deepstack the block returns the last output and the tapped ones side by side
        outputs = hidden.split(self.vision.hidden_size, dim=-1)
        features = [merger(h) for merger, h in zip([self.merger, *self.deepstack_mergers], outputs, strict=True)]
        return torch.cat(features, dim=-1)[layout.restore_index]
