"""A Qwen vision-language model (Qwen2.5-VL, Qwen3-VL) on Megatron-Core: vision encoder + merger
on the first pipeline stage, features scattered into the image/video placeholder tokens, then
the M-RoPE language model. With deepstack (Qwen3-VL) the encoder's intermediate features are
placed the same way, at the same rows, and handed to the first language layers (model/deepstack.py).

With context parallelism the model takes the whole (packed) sequence and keeps this rank's
zigzag share of tokens, position ids and labels (parallel/context_parallel.py): it embeds only
that share; images are encoded once, split over the CP ranks. Outputs (logits or per-token loss)
are for the local tokens.

Images come in one of two forms: `pages`, uint8 RGB of only the images this CP rank encodes,
patchified here on the device (training: the loader ships 8x fewer bytes and decodes each page
once per replica); or `pixel_values`, the float patches of every image as transformers takes
them (parity checks and evaluation, which feed both models the same inputs, videos included).
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

from megatron_mmprolong.config import VLConfig
from megatron_mmprolong.model.language import LanguageModel
from megatron_mmprolong.model.packed import host_cu_seqlens
from megatron_mmprolong.model.specs import Backend
from megatron_mmprolong.model.vision import VisionEncoder, mark_vision_copies
from megatron_mmprolong.model.vision_layout import build_vision_layout
from megatron_mmprolong.parallel.context_parallel import assign_images, gather_padded, gathered_rows, local_token_index
from megatron_mmprolong.patchify import patchify
from megatron_mmprolong.positions import mrope_position_ids


class VisionLanguageModel(MegatronModule):
    def __init__(
        self,
        config: VLConfig,
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
        if self.vision_model is not None:  # counted once in the gradient norm at vision TP < TP
            mark_vision_copies(self.vision_model, pg_collection.tp, vision_pg_collection.tp)
        self.language_model = LanguageModel(
            language_config, config.text, backend, pg_collection, pre_process, post_process, vp_stage,
            deepstack=config.deepstack_levels > 0,
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
        """Stop training the vision blocks (patch embedding included) and/or the mergers
        (deepstack mergers included)."""
        if self.vision_model is None:
            return
        for name, param in self.vision_model.named_parameters():
            in_merger = name.startswith(("merger.", "deepstack_mergers."))
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
        return mrope_position_ids(
            input_ids,
            **self.model_config.mrope_rule(),
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts,
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
        pages: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        labels: Tensor | None = None,
        cp_index: Tensor | None = None,
        return_hidden: bool = False,
    ) -> Tensor:
        """input_ids [batch, seq] ([1, tokens] with `packed_seq_params` for packed samples).

        Images: `pixel_values` (float patches of all images) or `pages` (uint8 [pixels, 3] of the
        images `assign_images` gives this CP rank, in image order; `image_grid_thw` of all).
        Position ids [3, batch, seq] normally come from the data loader; without them they are
        computed here. Grids and `cp_index` (this CP rank's token positions, `cp_token_index`)
        are best computed on the CPU by the caller; otherwise they are derived here.
        Returns logits [batch, local seq, vocab], or the per-token loss [batch, local seq] given
        labels (full-sequence labels; the local share is taken here), or with `return_hidden` the
        final hidden states [local seq, batch, hidden] (`language_model.logits` maps rows of it).
        """
        cu_seqlens = host_cu_seqlens(packed_seq_params) if packed_seq_params is not None else None
        if position_ids is None:
            position_ids = self.position_ids(input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, cu_seqlens)
        if self.cp_size > 1:
            if cp_index is None:
                cp_index = self.cp_token_index(input_ids.shape[1], cu_seqlens).to(input_ids.device, non_blocking=True)
            position_ids = position_ids[..., cp_index]
            labels = labels[:, cp_index] if labels is not None else None
        decoder_input = deepstack = None
        if self.pre_process:
            decoder_input, deepstack = self.embed(
                input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, cp_index, pages
            )
        return self.language_model(decoder_input, position_ids, packed_seq_params, labels, return_hidden,
                                   deepstack=deepstack)

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
        pages: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Embeddings [seq, batch, hidden] of this rank's tokens with the vision features in
        their placeholder positions: only the CP share (`cp_index`) is looked up and only its
        features are placed; then, with sequence parallelism, each TP rank keeps its rows. With
        deepstack, also the deepstack features of the same rows [seq, batch, levels, hidden]
        (zeros at text tokens; None without vision inputs)."""
        if pages is not None and (pixel_values is not None or pixel_values_videos is not None):
            raise ValueError("images come as pages or as pixel_values, not both; videos only as pixel_values_videos")
        tokens = self.model_config.tokens
        items = [
            (pixels, grids.cpu(), token)  # no copy when the loader keeps grids on the CPU
            for pixels, grids, token in (
                (pages if pages is not None else pixel_values, image_grid_thw, tokens.image),
                (pixel_values_videos, video_grid_thw, tokens.video),
            )
            if pixels is not None and len(grids)
        ]
        ids = input_ids[:, cp_index] if cp_index is not None else input_ids
        embeddings = self.language_model.embed(ids)
        deepstack = None
        if items:
            levels = self.model_config.deepstack_levels
            if levels:  # placed together with the embeddings: one gather, the same rows
                embeddings = torch.cat([embeddings, embeddings.new_zeros(*embeddings.shape[:-1],
                                                                         levels * embeddings.shape[-1])], dim=-1)
            embeddings = self._place_vision(embeddings, input_ids, items, cp_index, from_pages=pages is not None)
            if levels:
                rows, batch, _ = embeddings.shape
                embeddings, deepstack = embeddings.view(rows, batch, 1 + levels, -1).split([1, levels], dim=2)
                embeddings, deepstack = embeddings.squeeze(2).contiguous(), deepstack.contiguous()
        elif self._vision_needs_grad():
            # no vision work in this micro-batch: a blank image keeps the vision parameters in
            # the backward pass (see _blank_image_features), adding exactly zero
            embeddings = embeddings + self._blank_image_features().sum().to(embeddings.dtype) * 0
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
            if deepstack is not None:
                deepstack = tensor_parallel.scatter_to_sequence_parallel_region(deepstack)
        return embeddings, deepstack

    def _place_vision(self, embeddings: Tensor, input_ids: Tensor, items, rows: Tensor | None,
                      from_pages: bool = False) -> Tensor:
        """`embeddings` of the tokens at positions `rows` (None: all) with the features of the
        (pixels or pages, grids, placeholder token) items in their placeholders."""
        # One encoder pass for images and videos: attention segments never cross items.
        grids = torch.cat([g for _, g, _ in items])
        inputs = items[0][0] if len(items) == 1 else torch.cat([p for p, _, _ in items])
        features, order = self.encode_vision(inputs, grids, from_pages)
        features = features.to(embeddings.dtype)
        merge = self.model_config.vision.spatial_merge_size
        first = 0
        for _, item_grids, token in items:
            count = int(item_grids.prod(-1).sum()) // merge**2
            embeddings = _place_features(embeddings, input_ids, token, features, order, first, count, rows)
            first += count
        return embeddings

    def encode_vision(self, inputs: Tensor, grids: Tensor, from_pages: bool = False) -> tuple[Tensor, Tensor | None]:
        """Merged vision features of all items and, with CP, the row of each feature (items in
        input order) in them (None: rows already in input order). With CP each rank encodes its
        share of the images and the shares are all-gathered, padded to the largest. `inputs`:
        float patches of every item, or with `from_pages` uint8 pages of this rank's share."""
        vision = self.model_config.vision
        if self.cp_size == 1:
            pixels = self._patchify(inputs, grids) if from_pages else inputs
            return self.vision_model(pixels, build_vision_layout(grids, vision, inputs.device)), None
        cp = self.pg_collection.cp
        patches = grids.prod(-1)
        merged = patches // vision.spatial_merge_size**2
        owned = assign_images(patches, self.cp_size)
        mine = torch.tensor(owned[cp.rank()], dtype=torch.long)
        if len(mine):
            if from_pages:
                pixels = self._patchify(inputs, grids[mine])
            else:
                pixels = inputs.index_select(0, _rows_of(patches, mine).to(inputs.device, non_blocking=True))
            local = self.vision_model(pixels, build_vision_layout(grids[mine], vision, inputs.device))
        elif self._vision_needs_grad():
            # every CP rank's backward reduce-scatters, so this rank's (empty) share must be in
            # the autograd graph too; the blank image also gives the parameters their gradient
            local = self._blank_image_features()[:0]
        else:
            local = inputs.new_empty(0, self.vision_model.out_width, dtype=self._vision_dtype())
        longest = max(int(merged[o].sum()) for o in owned)
        gathered = gather_padded(local, longest, cp)
        return gathered, gathered_rows(merged, owned, longest).to(gathered.device, non_blocking=True)

    def _patchify(self, pages: Tensor, grids: Tensor) -> Tensor:
        vision = self.model_config.vision
        return patchify(pages, grids, vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size,
                        mean=vision.image_mean, std=vision.image_std)

    def _vision_dtype(self) -> torch.dtype:
        return self.vision_model.patch_embed.weight.dtype

    def _vision_needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_model.parameters())

    def _blank_image_features(self) -> Tensor:
        """Merged features [1, out_hidden] of one blank image of 2 x 2 patches. A rank with no
        image to encode in a training micro-batch runs it, so that every vision and merger
        parameter receives a (zero) gradient: Megatron's DDP with --overlap-grad-reduce launches
        a bucket's reduction only once all its parameters have one, and ranks that skipped the
        encoder would launch the buckets in another order than the others."""
        vision = self.model_config.vision
        merge = vision.spatial_merge_size
        weight = self.vision_model.patch_embed.weight
        grid = torch.tensor([[1, merge, merge]])
        blank = weight.new_zeros(merge * merge, vision.patch_dim)
        return self.vision_model(blank, build_vision_layout(grid, vision, weight.device))


def _rows_of(counts: Tensor, items: Tensor) -> Tensor:
    """Row indices of `items` in a tensor holding every item's `counts` rows back to back."""
    starts = (torch.cumsum(counts, 0) - counts)[items]
    sizes = counts[items]
    within = torch.arange(int(sizes.sum())) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    return torch.repeat_interleave(starts, sizes) + within


def _place_features(embeddings: Tensor, input_ids: Tensor, token_id: int, features: Tensor, order: Tensor | None,
                    first: int, count: int, rows: Tensor | None) -> Tensor:
    """Put the `count` features of `token_id` placeholders (feature `first + k`, through `order`,
    for the k-th placeholder of `input_ids` in batch-major order) into the embedding rows, which
    hold the tokens at positions `rows` of each sample (None: all positions). No host sync."""
    is_token = input_ids == token_id  # [batch, seq], the whole sequence
    # Checked on the device without a host sync; on CPU it raises at once.
    torch._assert_async(
        is_token.sum() == count,
        f"the number of placeholder tokens {token_id} in input_ids differs from the "
        f"{count} vision features that the grids describe",
    )
    feature = torch.cumsum(is_token.flatten(), 0).view_as(is_token) - 1 + first
    if rows is not None:
        is_token, feature = is_token[:, rows], feature[:, rows]
    feature = feature.clamp(min=first)  # rows that are no placeholder pick some feature, then drop it
    if order is not None:
        feature = order[feature]
    picked = features[feature.transpose(0, 1)]  # [rows, batch, hidden]
    return torch.where(is_token.transpose(0, 1).unsqueeze(-1), picked, embeddings)
