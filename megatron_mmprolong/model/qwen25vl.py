"""Qwen2.5-VL on Megatron-Core: vision encoder + merger on the first pipeline stage, features
scattered into the image/video placeholder tokens, then the M-RoPE language model."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
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
        self.backend = backend
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
    ) -> Tensor:
        """input_ids [batch, seq] ([1, tokens] with `packed_seq_params` for packed samples).

        Position ids [3, batch, seq] normally come from the data loader; without them they are
        computed here. Grids are best passed on the CPU (the vision layout is built there).
        Returns logits [batch, seq, vocab], or the per-token loss [batch, seq] given labels.
        """
        if position_ids is None:
            cu_seqlens = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else None
            position_ids = self.position_ids(
                input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, cu_seqlens
            )
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(
                input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
            )
        return self.language_model(decoder_input, position_ids, packed_seq_params, labels)

    def embed(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        pixel_values_videos: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
    ) -> Tensor:
        """Token embeddings with vision features in the placeholder positions, [seq, batch, hidden]
        (scattered over the tensor-parallel ranks when sequence parallelism is on)."""
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
            pixels = torch.cat([p for p, _, _ in items])
            layout = build_vision_layout(grids, self.model_config.vision, device=pixels.device)
            features = self.vision_model(pixels, layout).to(embeddings.dtype)
            merge = self.model_config.vision.spatial_merge_size
            sizes = [int(g.prod(-1).sum()) // merge**2 for _, g, _ in items]
            for (_, _, token), part in zip(items, features.split(sizes)):
                embeddings = _scatter_features(embeddings, input_ids, token, part)
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        return embeddings


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
