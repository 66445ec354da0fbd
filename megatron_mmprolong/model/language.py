"""The language model (Qwen2 or Qwen3 decoder with M-RoPE) as a Megatron LanguageModule."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_mmprolong.config import TextConfig
from megatron_mmprolong.model.rotary import MRopeEmbedding
from megatron_mmprolong.model.specs import Backend, language_block_spec


class LanguageModel(LanguageModule):
    """Embedding (first pipeline stage), decoder layers, final norm and output layer (last stage).

    The embedding does not scatter to sequence-parallel regions by itself: vision features are
    placed into the rank's tokens first (see VisionLanguageModel.embed). (Reduce-scattering the lookup
    and placing features per TP rank would move more: the replicated vision encoder then needs
    its feature gradients all-reduced over TP.)
    """

    def __init__(
        self,
        config: TransformerConfig,
        text: TextConfig,
        backend: Backend,
        pg_collection: ProcessGroupCollection,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
        deepstack: bool = False,
    ):
        super().__init__(config=config, pg_collection=pg_collection)
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = text.tie_word_embeddings
        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=text.vocab_size,
                max_sequence_length=text.max_position_embeddings,
                position_embedding_type="none",
                scatter_to_sequence_parallel=False,
                tp_group=pg_collection.tp,
            )
        self.rotary = MRopeEmbedding(text.head_dim, text.rope_theta, text.mrope_section, text.mrope_interleaved)
        self.decoder = TransformerBlock(
            config,
            language_block_spec(backend, config, vp_stage, deepstack),
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                text.vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                gather_output=False,
                skip_weight_param_allocation=pre_process and self.share_embeddings_and_output_weights,
                tp_group=pg_collection.tp,
            )
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def embed(self, input_ids: Tensor) -> Tensor:
        """[batch, seq] token ids -> [seq, batch, hidden]."""
        return self.embedding(input_ids=input_ids, position_ids=None)

    def forward(
        self,
        decoder_input: Tensor | None,
        position_ids: Tensor,
        packed_seq_params: PackedSeqParams | None = None,
        labels: Tensor | None = None,
        return_hidden: bool = False,
        deepstack: Tensor | None = None,
    ) -> Tensor:
        """Hidden states (not the last stage), logits [batch, seq, vocab] (no labels) or the
        per-token loss [batch, seq] (labels, vocabulary-parallel cross entropy). With
        `return_hidden` the last stage returns its final hidden states [seq, batch, hidden]
        (whole over sequence parallelism) instead, for callers that need logits at a few
        positions only (`logits`): at 128K a full logit tensor is tens of GB. `deepstack`: the
        features the first layers add (first pipeline stage; model/deepstack.py)."""
        hidden = self.decoder(
            decoder_input,
            attention_mask=None,
            context=deepstack,
            rotary_pos_emb=self.rotary(position_ids),
            packed_seq_params=packed_seq_params,
        )
        if not self.post_process:
            return hidden
        if return_hidden:
            if self.config.sequence_parallel:
                hidden = tensor_parallel.gather_from_sequence_parallel_region(
                    hidden, tensor_parallel_output_grad=False, group=self.tp_group)
            return hidden
        logits, _ = self.output_layer(hidden, weight=self.output_weight())
        if labels is not None:
            return self.compute_language_model_loss(labels, logits)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits, group=self.tp_group)
        return logits.transpose(0, 1).contiguous()

    def output_weight(self) -> Tensor:
        """This TP rank's vocabulary rows of the output layer (the embedding's when tied)."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight

    def logits(self, hidden: Tensor) -> Tensor:
        """Hidden states [rows, batch, hidden] from `forward(..., return_hidden=True)` -> logits
        [batch, rows, vocab]. Every rank of the TP group calls it (one all-gather over vocab)."""
        logits = torch.nn.functional.linear(hidden, self.output_weight())
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits, group=self.tp_group)
        return logits.transpose(0, 1)
