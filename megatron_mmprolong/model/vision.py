"""The vision encoder of both families: patch embedding (plus, for Qwen3-VL, a learned position
grid resampled to each image), blocks of window or frame attention with 2D rotary, the merger
that turns each 2x2 patch group into one language-model token, and Qwen3-VL's deepstack mergers."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase
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


def holds_tp_rank_0(language_tp, vision_tp) -> bool:
    """Whether this rank's vision-TP subgroup is the first copy of the vision encoder: the one
    holding TP rank 0 (always, when vision TP equals TP)."""
    if vision_tp is language_tp or vision_tp.size() == language_tp.size():
        return True
    return dist.get_global_rank(language_tp, 0) in dist.get_process_group_ranks(vision_tp)


def mark_vision_copies(encoder: VisionEncoder, language_tp, vision_tp) -> None:
    """With a vision TP group smaller than the language model's, each TP group holds TP /
    vision-TP copies of the encoder, one per vision-TP subgroup; they encode the same images, so
    their gradients are equal, and they hold the same weights. Every copy but the first (the one
    holding TP rank 0) is marked twice:

    - its parameters are `shared`. Megatron's gradient norm (and zero count) counts a
      tensor-parallel parameter on every TP rank and any other one on TP rank 0, which would
      count the vision shards once per copy. `shared` is the attribute Megatron gives a tied
      embedding's second copy, read only by the norm and zero count (`param_is_not_shared`) and
      carried to the optimizers' main parameters; DDP, finalize_model_grads and checkpoints do
      not read it, and `tensor_model_parallel` stays true of the shards.
    - the encoder is no `first_copy`, so that its checkpoint shards are no main replicas
      (`VisionEncoder.sharded_state_dict`): a distributed checkpoint takes each shard from
      exactly one rank."""
    encoder.first_copy = holds_tp_rank_0(language_tp, vision_tp)
    if encoder.first_copy:
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
        self.first_copy = True  # see mark_vision_copies

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Megatron's sharded state dict: the vision layers' shards have the offsets and replica
        ids of their vision-TP group. Each copy but the first (`mark_vision_copies`) adds 1 to
        the TP coordinate of its replica ids (Megatron's (PP, TP, DP); a main replica has all
        zeros), so that no shard of it is a main replica. The optimizer's state takes the
        model's replica ids (the distributed optimizer keeps the first two coordinates)."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if not self.first_copy:
            for shard in nested_values(state):
                if isinstance(shard, ShardedBase):
                    shard.replica_id = _not_main(shard.replica_id)
        return state

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


def _not_main(replica_id):
    """The replica id one higher in the TP coordinate of (PP, TP, DP): never a main replica's."""
    if isinstance(replica_id, int):
        return replica_id + 1
    axis = 1 if len(replica_id) > 1 else 0
    return tuple(r + (i == axis) for i, r in enumerate(replica_id))
