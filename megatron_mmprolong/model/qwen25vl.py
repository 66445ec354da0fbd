"""Qwen2.5-VL on Megatron-Core: vision encoder + merger on the first pipeline stage, features
scattered into the image/video placeholder tokens, then the M-RoPE language model.

With context parallelism the model takes the whole (packed) sequence, embeds it, and keeps this
rank's zigzag share of tokens, position ids and labels (parallel/context_parallel.py); images are
encoded once, split over the CP ranks. Outputs (logits or per-token loss) are for the local tokens.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_mmprolong.config import Qwen25VLConfig
from megatron_mmprolong.model.language import LanguageModel
from megatron_mmprolong.model.specs import Backend
from megatron_mmprolong.model.vision import VisionEncoder
from megatron_mmprolong.model.vision_layout import build_vision_layout
from megatron_mmprolong.parallel.context_parallel import assign_images, gather_rows, local_token_index
from megatron_mmprolong.positions import mrope_position_ids


class Qwen25VLModel(MegatronModule):
    def __init__(
        self,
        config: Qwen25VLConfig,
        language_config: TransformerConfig,
        vision_config: TransformerConfig,
        merger_config: TransformerConfig,
        backend: Backend,
        pg_collection: ProcessGroupCollection,
        vision_pg_collection: ProcessGroupCollection,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
    ):
        super().__init__(config=language_config)
        self.model_config = config
        self.model_type = ModelType.encoder_or_decoder  # what Megatron's schedules dispatch on
        self.backend = backend
        self.pg_collection = pg_collection
        self.vision_pg_collection = vision_pg_collection
        self.cp_size = language_config.context_parallel_size
        self.pre_process = pre_process
        self.post_process = post_process
        self.vision_model = (
            VisionEncoder(config.vision, vision_config, merger_config, backend, vision_pg_collection)
            if pre_process
            else None
        )
        self.language_model = LanguageModel(
            language_config, config.text, backend, pg_collection, pre_process, post_process, vp_stage
        )

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    # Megatron's finalize_model_grads reads these two on the wrapped model to all-reduce a tied
    # word embedding's gradient between the first and last pipeline stages.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def freeze(self, vision_encoder: bool = False, merger: bool = False) -> None:
        """Stop training the vision blocks (patch embedding included) and/or the merger."""
        if self.vision_model is None:
            return
        for name, param in self.vision_model.named_parameters():
            in_merger = name.startswith("merger.")
            if (merger and in_merger) or (vision_encoder and not in_merger):
                param.requires_grad_(False)

    def position_ids(
        self,
        input_ids: Tensor,
        image_grid_thw: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        second_per_grid_ts: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        c = self.model_config
        return mrope_position_ids(
            input_ids,
            image_token_id=c.tokens.image,
            video_token_id=c.tokens.video,
            spatial_merge_size=c.vision.spatial_merge_size,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts,
            tokens_per_second=c.vision.tokens_per_second,
            cu_seqlens=cu_seqlens,
        )

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        *,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        pixel_values_videos: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        second_per_grid_ts: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        labels: Tensor | None = None,
        cp_index: Tensor | None = None,
    ) -> Tensor:
        """input_ids [batch, seq] ([1, tokens] with `packed_seq_params` for packed samples).

        Position ids [3, batch, seq] normally come from the data loader; without them they are
        computed here. Grids and `cp_index` (this CP rank's token positions, `cp_token_index`)
        are best computed on the CPU by the caller; otherwise they are derived here.
        Returns logits [batch, local seq, vocab], or the per-token loss [batch, local seq] given
        labels (full-sequence labels; the local share is taken here).
        """
        cu_seqlens = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else None
        if position_ids is None:
            position_ids = self.position_ids(input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, cu_seqlens)
        if self.cp_size > 1:
            if cp_index is None:
                cp_index = self.cp_token_index(input_ids.shape[1], cu_seqlens).to(input_ids.device)
            position_ids = position_ids[..., cp_index]
            labels = labels[:, cp_index] if labels is not None else None
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(
                input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, cp_index
            )
        return self.language_model(decoder_input, position_ids, packed_seq_params, labels)

    def cp_token_index(self, seq_length: int, cu_seqlens: Tensor | None = None) -> Tensor:
        """Positions of the sequence kept by this context-parallel rank (CPU)."""
        cu = cu_seqlens if cu_seqlens is not None else torch.tensor([0, seq_length])
        return local_token_index(cu, self.cp_size, self.pg_collection.cp.rank())

    def embed(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        pixel_values_videos: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        cp_index: Tensor | None = None,
    ) -> Tensor:
        """Token embeddings with vision features in the placeholder positions, [seq, batch, hidden]:
        this CP rank's tokens (`cp_index`), scattered over the tensor-parallel ranks when
        sequence parallelism is on."""
        embeddings = self.language_model.embed(input_ids)
        tokens = self.model_config.tokens
        items = [
            (pixels, grids.cpu(), token)  # no copy when the loader keeps grids on the CPU
            for pixels, grids, token in (
                (pixel_values, image_grid_thw, tokens.image),
                (pixel_values_videos, video_grid_thw, tokens.video),
            )
            if pixels is not None
        ]
        if items:
            # One encoder pass for images and videos: attention segments never cross items.
            grids = torch.cat([g for _, g, _ in items])
            features = self.encode_vision(torch.cat([p for p, _, _ in items]), grids).to(embeddings.dtype)
            merge = self.model_config.vision.spatial_merge_size
            sizes = [int(g.prod(-1).sum()) // merge**2 for _, g, _ in items]
            for (_, _, token), part in zip(items, features.split(sizes)):
                embeddings = _scatter_features(embeddings, input_ids, token, part)
        if cp_index is not None:
            embeddings = embeddings[cp_index]
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        return embeddings


    def encode_vision(self, pixels: Tensor, grids: Tensor) -> Tensor:
        """Merged vision features of all items, in order; with CP each rank encodes its share."""
        if self.cp_size == 1:
            return self.vision_model(pixels, build_vision_layout(grids, self.model_config.vision, pixels.device))
        cp = self.pg_collection.cp
        patches = grids.prod(-1)
        merged = patches // self.model_config.vision.spatial_merge_size**2
        owned = assign_images(patches, self.cp_size)
        mine = torch.tensor(owned[cp.rank()], dtype=torch.long)
        if len(mine):
            rows = _rows_of(patches, mine).to(pixels.device)
            layout = build_vision_layout(grids[mine], self.model_config.vision, pixels.device)
            local = self.vision_model(pixels.index_select(0, rows), layout)
        else:
            local = pixels.new_zeros(0, self.model_config.vision.out_hidden_size)
        sizes = [int(merged[o].sum()) for o in owned]
        gathered = gather_rows(local, sizes, cp)
        rank_order = torch.tensor([i for o in owned for i in o], dtype=torch.long)
        position = torch.empty_like(rank_order)
        position[rank_order] = torch.arange(len(rank_order))
        # rows of each image in the gathered (rank-major) order, images back in input order
        starts = torch.cumsum(merged[rank_order], 0) - merged[rank_order]
        return gathered.index_select(0, _rows_of(merged, torch.arange(len(merged)), starts[position]).to(gathered.device))


def _rows_of(counts: Tensor, items: Tensor, starts: Tensor | None = None) -> Tensor:
    """Row indices of `items` whose rows start at `starts` (default: cumulative `counts`)."""
    if starts is None:
        starts = (torch.cumsum(counts, 0) - counts)[items]
    sizes = counts[items]
    within = torch.arange(int(sizes.sum())) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    return torch.repeat_interleave(starts, sizes) + within


def _scatter_features(embeddings: Tensor, input_ids: Tensor, token_id: int, features: Tensor) -> Tensor:
    """Write `features` into the positions of `token_id`, in sequence order."""
    mask = (input_ids == token_id).transpose(0, 1).unsqueeze(-1)  # [seq, batch, 1]
    # Checked on the device without a host sync; on CPU it raises at once.
    torch._assert_async(
        mask.sum() == features.shape[0],
        f"the number of placeholder tokens {token_id} in input_ids differs from the "
        f"{features.shape[0]} vision features that the grids describe",
    )
    return embeddings.masked_scatter(mask, features)
