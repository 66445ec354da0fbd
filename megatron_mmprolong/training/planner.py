"""`mmprolong plan`: which (TP, CP, PP, DP, recompute) layouts fit a model and sequence length on a
cluster, their memory per GPU and their estimated step time.

Memory is estimated for the busiest pipeline stage, per GPU:
- model states per parameter: weights (2 B bf16), the fp32 gradient buffer (4 B) and Adam's fp32
  main weights and two moments (12 B), the last sharded over DP by the distributed optimizer
  (Megatron: 18 B, or 6 + 12/DP). fp32 training keeps no main copy: 4 + 4 + 8 B.
- activations: what each transformer layer keeps for backward, from an inventory of its saved
  tensors per token (`SavedTensors`), scaled by the tokens of one micro-batch on this rank
  (sequence / CP), sharded by TP (and SP for the norms), times the micro-batches in flight on the
  stage under 1F1B (the first stage holds PP of them). Full recompute keeps only each layer's input
  and rebuilds one layer at a time; selective recompute drops core attention's saved tensors.
- the vision encoder's blocks and merger on the first stage (each CP rank encodes its own images),
  and on the last stage the fp32 logits [tokens, vocab / TP] that the cross entropy keeps. Windows
  or none (Qwen3-VL) change no saved tensor: attention keeps no scores.
- deepstack (Qwen3-VL), on the first stage: per micro-batch in flight, the features of every level
  [tokens / CP (/ TP with SP), levels, hidden] that ride to the first language layers, and on the
  vision side each deepstack merger's activations and the tapped block outputs.
- in backward, the largest gradient (the MLP's gate/up output) and, with full recompute, the
  layer being rebuilt (the logits are gone by then); and a fixed reserve for the CUDA context, NCCL buffers and fragmentation.

Step time: model FLOPs (training/flops.py, the same count the training log reports) at
achievable rates per kind of work (GEMMs in BF16 or FP8, attention, always BF16) on the slowest
pipeline stage (the first, which also runs the vision encoder), plus recompute,
exposed TP communication (SP all-gathers and reduce-scatters; not overlapped), CP ring
exchanges beyond what attention hides, the DP gradient reduction beyond the last micro-batch's
backward, and the 1F1B pipeline bubble. The rates are assumptions, kept in `GpuSpec`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from megatron_mmprolong.config import ConfigError, ParallelConfig, VLConfig
from megatron_mmprolong.training import flops

GIB = 2**30


@dataclass(frozen=True)
class GpuSpec:
    """Peak and achievable rates of one GPU and its links (H100 SXM defaults)."""

    name: str = "H100 SXM"
    bf16_tflops: float = 989.0  # dense peak
    fp8_tflops: float = 1979.0
    gemm_efficiency_bf16: float = 0.65  # large GEMMs inside a training step, launch and norm gaps included
    gemm_efficiency_fp8: float = 0.50  # plus Transformer Engine's casts and amax bookkeeping
    attention_efficiency: float = 0.50  # causal flash attention, forward and backward, long sequences
    intra_node_gbs: float = 360.0  # NVLink all-gather / reduce-scatter bus bandwidth, GB/s per GPU
    inter_node_gbs: float = 45.0  # one 400 Gb/s InfiniBand NIC per GPU, achieved
    reserved_gib: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation


@dataclass(frozen=True)
class SavedTensors:
    """Elements one transformer layer keeps for backward, per token, in units of a dimension:
    `norm` x hidden (sharded by SP; `layernorm` instead for LayerNorm blocks), `heads` x (heads x
    head dim) and `kv` x (KV heads x head dim) and `ffn` x ffn size (sharded by TP; `plain_ffn`
    instead for an fc1 -> act -> fc2 MLP), `qk_norm` x (heads + KV heads) x head dim where queries
    and keys are normed (sharded by TP), `rotary` x head dim (not sharded). With CP, `gathered` x
    (heads x head dim) per token of the whole CP group and a `mask` of bytes per (local token,
    group token) pair."""

    norm: float
    heads: float
    kv: float
    ffn: float
    rotary: float
    gathered: float = 0.0
    mask: float = 0.0
    plain_ffn: float = 2.0  # the activation's input (fc1 output) and the fc2 input
    layernorm: float = 4.0  # per norm its input and normalised output
    qk_norm: float = 1.0


# Transformer Engine (GPU): LayerNormLinear keeps its input and normalised output (2 per norm);
# flash attention keeps q, k, v and its output, which is also the projection's input; the fused
# SwiGLU keeps the gate/up output (2 ffn) and the down projection its input (1 ffn); fused RoPE
# keeps only the shared angles; a q/k norm (TENorm) keeps its input, the fused RoPE takes its output.
TE_SAVED = SavedTensors(norm=4, heads=2, kv=2, ffn=3, rotary=0)
# The plain-torch backend (CPU), as measured by tests/test_planner.py: the RMSNorm keeps its input,
# normalised and scaled outputs (3 per norm); attention keeps q and k, v repeated to every query head,
# its output and the re-ordered output the projection takes; SwiGLU keeps gate/up, silu(gate) and
# up (4 ffn) and the down projection its input; cos and sin for q and k. With CP it gathers k and v
# of the whole group and keeps a boolean mask of the local queries against them. Its q/k RMSNorm
# keeps 3 per element as the other RMSNorms do; LayerNorm keeps its input and output (2 per norm).
LOCAL_SAVED = SavedTensors(norm=6, heads=3, kv=0, ffn=5, rotary=4, gathered=2, mask=1, qk_norm=3)
# Selective recompute (core attention): only attention's inputs stay (q, k, v) with the output.
SELECTIVE_SAVED = {"te": TE_SAVED,
                   "local": SavedTensors(norm=6, heads=2, kv=2, ffn=5, rotary=4, qk_norm=3)}
SAVED = {"te": TE_SAVED, "local": LOCAL_SAVED}
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Workload:
    """What one step trains: packed sequences of `seq_length` tokens, `image_fraction` of them
    image tokens from pages of `page_grid` patches (T, H, W; default: a Letter page at 144 DPI as
    the family's processor sizes it, `letter_page_grid`); samples of `sample_length` tokens
    (default: one per sequence, the costliest attention)."""

    seq_length: int
    global_batch: int
    micro_batch: int = 1
    sample_length: int | None = None
    image_fraction: float = 0.9
    page_grid: tuple[int, int, int] | None = None
    params_bytes: int = 2  # 2: bf16 with fp32 main weights; 4: fp32
    fp8: bool = False

    def segment_lengths(self) -> np.ndarray:
        length = min(self.sample_length or self.seq_length, self.seq_length)
        full, rest = divmod(self.seq_length, length)
        return np.array([length] * full + ([rest] if rest else []), dtype=np.float64)

    def image_grids(self, config: VLConfig) -> np.ndarray:
        """Pages of one sequence, as many as its image tokens need."""
        grid = np.array(self.page_grid or letter_page_grid(config), dtype=np.int64)
        tokens = int(grid.prod()) // config.vision.spatial_merge_size**2
        pages = math.floor(self.image_fraction * self.seq_length / tokens + 1e-9)
        return np.tile(grid, (pages, 1))


def letter_page_grid(config: VLConfig) -> tuple[int, int, int]:
    """Patches (T, H, W) of a Letter page rendered at 144 DPI (1224 x 1584 px) with each side rounded
    to the family's merged-token size: (1, 88, 114), ~2.5K tokens, with Qwen2.5-VL's 28 px;
    (1, 76, 100), 1.9K tokens, with Qwen3-VL's 32 px."""
    v = config.vision
    side = v.merged_token_px
    return (1, round(1224 / side) * v.spatial_merge_size, round(1584 / side) * v.spatial_merge_size)


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float
    gpu: GpuSpec = GpuSpec()

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Layout:
    tp: int
    cp: int
    pp: int
    dp: int
    recompute: str = "none"
    distributed_optimizer: bool = True

    @property
    def sequence_parallel(self) -> bool:
        return self.tp > 1

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(tensor_parallel=self.tp, pipeline_parallel=self.pp, context_parallel=self.cp,
                              sequence_parallel=self.sequence_parallel)

    def arguments(self) -> list[str]:
        """`mmprolong train` arguments of this layout, every choice explicit (they override a recipe)."""
        args = ["--tensor-model-parallel-size", str(self.tp), "--context-parallel-size", str(self.cp),
                "--pipeline-model-parallel-size", str(self.pp),
                "--sequence-parallel" if self.sequence_parallel else "--no-sequence-parallel",
                "--use-distributed-optimizer" if self.distributed_optimizer else "--no-use-distributed-optimizer",
                "--overlap-grad-reduce", "--recompute-granularity", self.recompute]
        if self.recompute == "full":
            args += ["--recompute-method", "uniform", "--recompute-num-layers", "1"]
        return args


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU on the busiest pipeline stage (`stage`)."""

    stage: int
    weights: float
    gradients: float
    optimizer: float
    activations: float  # language model layers, all micro-batches in flight
    vision: float
    deepstack: float  # the deepstack features riding to the first language layers
    logits: float  # kept until the loss's backward, which frees them before any layer is rebuilt
    rebuilt: float  # full recompute: the one layer being rebuilt in backward
    workspace: float  # the largest gradient in flight
    reserved: float

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.vision + self.deepstack
                + max(self.logits, self.rebuilt) + self.workspace + self.reserved)


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    memory: Memory
    step_seconds: float
    tflops_per_gpu: float  # model FLOPs (no recompute), as the training log reports
    fits: bool


# ---- parameters -----------------------------------------------------------------------------

@dataclass(frozen=True)
class StageParameters:
    """Parameters one GPU holds on a pipeline stage (TP shards)."""

    language: float
    vision: float

    @property
    def total(self) -> float:
        return self.language + self.vision


def language_layer_parameters(config: VLConfig, tp: int) -> float:
    t = config.text
    qkv = (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
    sharded = qkv * (t.hidden_size + int(t.qkv_bias)) + t.num_attention_heads * t.head_dim * t.hidden_size \
        + 3 * t.hidden_size * t.intermediate_size
    replicated = 2 * t.hidden_size + (2 * t.head_dim if t.qk_norm else 0)  # the two norms, q/k norms per head
    return sharded / tp + replicated


def _norm_parameters(normalization: str, width: int) -> int:
    return 2 * width if normalization == "LayerNorm" else width  # LayerNorm has a bias


def vision_parameters(config: VLConfig, tp: int) -> float:
    """Patch embedding (and its bias), position grid, blocks, merger and deepstack mergers; the
    norms, the patch embedding, the position grid and row-parallel biases are replicated over the
    vision TP group."""
    v = config.vision
    h, f, m = v.hidden_size, v.intermediate_size, v.merger_hidden_size
    fc1 = (2 if v.gated_mlp else 1) * f  # gate and up, or fc1
    block_sharded = 3 * h * (h + 1) + h * h + fc1 * (h + 1) + f * h
    block_replicated = 2 * _norm_parameters(v.normalization, h) + h + h  # norms, proj and fc2 biases
    merger_sharded = m * (m + 1) + m * v.out_hidden_size
    levels = config.deepstack_levels
    # the merger norms each patch; a deepstack merger norms each group of merge x merge patches
    merger_norms = _norm_parameters(v.normalization, h) + levels * _norm_parameters(v.normalization, m)
    embedding = v.patch_dim * h + (h if v.patch_embed_bias else 0) + v.num_position_embeddings * h
    return (embedding + v.depth * (block_sharded / tp + block_replicated)
            + (1 + levels) * (merger_sharded / tp + v.out_hidden_size) + merger_norms)


def stage_parameters(config: VLConfig, tp: int, pp: int, stage: int) -> StageParameters:
    t = config.text
    layers = t.num_layers // pp
    language = layers * language_layer_parameters(config, tp)
    embedding = t.vocab_size * t.hidden_size / tp
    first, last = stage == 0, stage == pp - 1
    if first:
        language += embedding
    if last:
        language += t.hidden_size  # final norm
        if not (t.tie_word_embeddings and first):
            language += embedding  # the output layer, or the tied copy Megatron keeps on the last stage
    return StageParameters(language, vision_parameters(config, tp) if first else 0.0)


# ---- memory ---------------------------------------------------------------------------------

def _layer_bytes(saved: SavedTensors, hidden: int, heads_width: int, kv: int, ffn: int, head_dim: int, tp: int,
                 sp: bool, element: int, tokens: float, cp: int = 1, gated: bool = True, layernorm: bool = False,
                 qk_norm: bool = False) -> float:
    """Bytes one layer keeps for `tokens` tokens on one rank (tokens / CP of a sequence);
    `heads_width` is heads x head dim (the hidden size unless the head dim is explicit)."""
    norm = saved.layernorm if layernorm else saved.norm
    mlp = saved.ffn if gated else saved.plain_ffn
    qk = saved.qk_norm * (heads_width + kv) if qk_norm else 0.0
    per_token = (norm * hidden / (tp if sp else 1) + (saved.heads * heads_width + saved.kv * kv + mlp * ffn + qk
                 + saved.gathered * heads_width * cp) / tp + saved.rotary * head_dim)
    mask = saved.mask * tokens * tokens * cp if cp > 1 else 0.0
    return per_token * tokens * element + mask


def deepstack_bytes(config: VLConfig, workload: Workload, layout: Layout) -> float:
    """The deepstack features of one micro-batch on the first stage: [tokens / CP (/ TP with SP),
    micro batch, levels, hidden] in the activation dtype, kept from the embedding until the
    backward of language layer `levels - 1` (zeros at text rows, so dense)."""
    rows = workload.seq_length / layout.cp / (layout.tp if layout.sequence_parallel else 1)
    return rows * workload.micro_batch * config.deepstack_levels * config.text.hidden_size * workload.params_bytes


def estimate_memory(config: VLConfig, workload: Workload, layout: Layout, backend: str = "te",
                    reserved_gib: float = 0.0) -> Memory:
    """Memory per GPU of the busiest pipeline stage."""
    stages = [_stage_memory(config, workload, layout, backend, reserved_gib, stage) for stage in range(layout.pp)]
    return max(stages, key=lambda memory: memory.total)


def _stage_memory(config, workload, layout, backend, reserved_gib, stage) -> Memory:
    t, v = config.text, config.vision
    tp, cp, pp, sp = layout.tp, layout.cp, layout.pp, layout.sequence_parallel
    act_bytes = workload.params_bytes
    params = stage_parameters(config, tp, pp, stage).total
    weights = params * workload.params_bytes
    gradients = params * 4
    optimizer_bytes = (12 if workload.params_bytes == 2 else 8) * params
    optimizer = optimizer_bytes / layout.dp if layout.distributed_optimizer else optimizer_bytes

    microbatches = workload.global_batch // layout.dp
    in_flight = min(pp - stage, microbatches)
    tokens = workload.micro_batch * workload.seq_length / cp
    layers = t.num_layers // pp
    kv = t.num_key_value_heads * t.head_dim
    saved = (SELECTIVE_SAVED if layout.recompute == "selective" else SAVED)[backend]
    dims = (t.hidden_size, t.num_attention_heads * t.head_dim, kv, t.intermediate_size, t.head_dim, tp, sp,
            act_bytes, tokens, cp)
    if layout.recompute == "full":
        kept = t.hidden_size / (tp if sp else 1) * tokens * act_bytes  # each layer's input
        rebuilt = _layer_bytes(SAVED[backend], *dims, qk_norm=t.qk_norm)
    else:
        kept = _layer_bytes(saved, *dims, qk_norm=t.qk_norm)
        rebuilt = 0.0
    activations = in_flight * layers * kept
    workspace = 2 * t.intermediate_size / tp * tokens * act_bytes  # gradient of the gate/up output

    vision = deepstack = 0.0
    if stage == 0:
        grids = workload.image_grids(config)
        patches = float(grids.prod(1).sum()) / cp * workload.micro_batch if len(grids) else 0.0
        if v.depth and patches:
            # windows and frames are local to the rank: k and v count as local heads, no mask
            local = SAVED[backend]
            local = dataclasses.replace(local, heads=local.heads + local.gathered, gathered=0, mask=0)
            block = _layer_bytes(local, v.hidden_size, v.hidden_size, v.hidden_size, v.intermediate_size, v.head_dim,
                                 tp, False, act_bytes, patches, gated=v.gated_mlp,
                                 layernorm=v.normalization == "LayerNorm")
            kept_block = v.hidden_size * patches * act_bytes if layout.recompute == "full" else block
            levels = config.deepstack_levels
            # per merger: norm input and output per patch (a deepstack merger's per group, as
            # wide), 3 x merged width per merged token; the block output holds the tapped
            # outputs beside the last one until the mergers' backward
            mergers = (1 + levels) * 5 * v.hidden_size + levels * v.hidden_size
            if layout.recompute == "full":
                # each block's checkpoint also keeps the taps so far (1, 2, ... levels outputs)
                mergers += levels * (levels + 1) / 2 * v.hidden_size
            vision = in_flight * (v.depth * kept_block + (mergers + v.patch_dim) * patches * act_bytes)
            deepstack = in_flight * deepstack_bytes(config, workload, layout)
            if layout.recompute == "full":
                rebuilt = max(rebuilt, block)
    logits = 0.0
    if stage == pp - 1:
        logits = 4.0 * tokens * t.vocab_size / tp  # fp32 softmax kept by the cross entropy
    return Memory(stage, weights, gradients, optimizer, activations, vision, deepstack, logits, rebuilt, workspace,
                  reserved_gib * GIB)


# ---- time -----------------------------------------------------------------------------------

def step_flops(config: VLConfig, workload: Workload) -> dict[str, float]:
    """Training FLOPs of one sequence by kind of work (forward + backward)."""
    return flops.training_flops_by_kind(config, workload.segment_lengths(), workload.image_grids(config))


def estimate_step_seconds(config: VLConfig, workload: Workload, layout: Layout, cluster: Cluster) -> float:
    gpu, t = cluster.gpu, config.text
    work = step_flops(config, workload)
    per_gpu = layout.tp * layout.cp * layout.pp
    gemm_rate = (gpu.fp8_tflops * gpu.gemm_efficiency_fp8 if workload.fp8
                 else gpu.bf16_tflops * gpu.gemm_efficiency_bf16) * 1e12
    bf16_gemm = gpu.bf16_tflops * gpu.gemm_efficiency_bf16 * 1e12
    attention_rate = gpu.bf16_tflops * gpu.attention_efficiency * 1e12
    gemm = work["gemm"] / gemm_rate
    attention = work["attention"] / attention_rate
    vision = work["vision"] / bf16_gemm
    if layout.recompute == "full":  # one more forward of everything: 4/3 of forward + backward
        gemm, attention, vision = (x * 4 / 3 for x in (gemm, attention, vision))
    elif layout.recompute == "selective":  # core attention's forward again
        attention *= 4 / 3
    # one micro-batch on the slowest stage: the first also runs the vision encoder, over TP x CP
    compute = (gemm + attention) / per_gpu + vision / (layout.tp * layout.cp)

    tokens = workload.micro_batch * workload.seq_length / layout.cp
    layers = t.num_layers // layout.pp
    intra, inter = gpu.intra_node_gbs * 1e9, gpu.inter_node_gbs * 1e9
    tp_comm = 0.0
    if layout.tp > 1:  # SP: 2 all-gathers and 2 reduce-scatters forward, as many backward (and in recompute)
        collectives = 8 + (4 if layout.recompute == "full" else 0)
        tp_comm = collectives * layers * tokens * t.hidden_size * 2 * (layout.tp - 1) / layout.tp / intra
    cp_comm = 0.0
    if layout.cp > 1:  # ring: K and V forward, K, V and their gradients backward, hidden behind attention
        bandwidth = intra if layout.tp * layout.cp <= cluster.gpus_per_node else inter
        chunk = 2 * t.num_key_value_heads / layout.tp * t.head_dim * tokens * 2
        ring = 3 * (layout.cp - 1) * chunk * layers / bandwidth
        cp_comm = max(0.0, ring - attention / per_gpu)
    microbatch = compute + tp_comm + cp_comm
    microbatches = workload.global_batch // layout.dp
    pipeline = (microbatches + layout.pp - 1) * microbatch
    dp_comm = 0.0
    if layout.dp > 1:  # gradient reduce-scatter (or all-reduce) and, with the distributed optimizer, the gather
        bandwidth = intra if per_gpu * layout.dp <= cluster.gpus_per_node else inter
        params = max(stage_parameters(config, layout.tp, layout.pp, s).total for s in range(layout.pp))
        volume = params * (4 + workload.params_bytes if layout.distributed_optimizer else 8)
        dp_comm = max(0.0, volume * (layout.dp - 1) / layout.dp / bandwidth - 2 * microbatch / 3)
    pp_comm = 0.0
    if layout.pp > 1:
        pp_comm = 2 * (microbatches + layout.pp - 1) * tokens * t.hidden_size * 2 / inter
    return pipeline + dp_comm + pp_comm


# ---- layouts ----------------------------------------------------------------------------------

def candidate_layouts(config: VLConfig, workload: Workload, cluster: Cluster,
                      recompute: tuple[str, ...] = RECOMPUTE, distributed_optimizer: bool = True) -> list[Layout]:
    """Every layout the model, sequence and batch allow; TP stays within a node."""
    layouts = []
    gpus = cluster.gpus
    for tp in _divisors(cluster.gpus_per_node):
        for cp in _divisors(gpus // tp):
            for pp in _divisors(gpus // (tp * cp)):
                dp = gpus // (tp * cp * pp)
                if workload.global_batch % (dp * workload.micro_batch):
                    continue
                layout = Layout(tp, cp, pp, dp)
                try:
                    config.validate_parallel(layout.parallel_config())
                except ConfigError:
                    continue
                if workload.seq_length % (2 * cp * tp):  # zigzag CP halves, SP shards
                    continue
                layouts += [dataclasses.replace(layout, recompute=mode, distributed_optimizer=distributed_optimizer)
                            for mode in recompute]
    return layouts


def plan(config: VLConfig, workload: Workload, cluster: Cluster, recompute: tuple[str, ...] = RECOMPUTE,
         distributed_optimizer: bool = True) -> list[Estimate]:
    """Estimates of every candidate layout: those that fit first, fastest first."""
    if cluster.gpus < 1 or workload.seq_length < 1 or workload.global_batch < 1:
        raise ConfigError("nodes, GPUs per node, sequence length and global batch must be positive")
    bad = [mode for mode in recompute if mode not in RECOMPUTE]
    if bad:
        raise ConfigError(f"recompute must be among {', '.join(RECOMPUTE)}, got {', '.join(bad)}")
    model_flops = sum(step_flops(config, workload).values()) * workload.global_batch
    estimates = []
    for layout in candidate_layouts(config, workload, cluster, recompute, distributed_optimizer):
        memory = estimate_memory(config, workload, layout, "te", cluster.gpu.reserved_gib)
        seconds = estimate_step_seconds(config, workload, layout, cluster)
        estimates.append(Estimate(layout, memory, seconds, model_flops / seconds / cluster.gpus / 1e12,
                                  memory.total <= cluster.gpu_memory_gib * GIB))
    return sorted(estimates, key=lambda e: (not e.fits, e.step_seconds, e.memory.total))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---- report -----------------------------------------------------------------------------------

def training_arguments(estimate: Estimate, workload: Workload) -> list[str]:
    args = estimate.layout.arguments() + ["--seq-length", str(workload.seq_length), "--global-batch-size",
                                          str(workload.global_batch), "--micro-batch-size", str(workload.micro_batch)]
    args.append("--bf16" if workload.params_bytes == 2 else "--no-bf16")
    return args + ["--fp8-format", "hybrid" if workload.fp8 else "none"]


def format_report(name: str, estimates: list[Estimate], workload: Workload, cluster: Cluster, top: int = 10) -> str:
    """The table of layouts (those that fit, fastest first, at most `top`), then the best one as
    `mmprolong train` arguments and as the Slurm script's settings."""
    fitting = [e for e in estimates if e.fits]
    precision = "FP8 GEMMs" if workload.fp8 else ("BF16" if workload.params_bytes == 2 else "FP32")
    lines = [f"{name}: {workload.seq_length:,} tokens per sequence, global batch {workload.global_batch}, "
             f"{cluster.nodes} x {cluster.gpus_per_node} {cluster.gpu.name} ({cluster.gpu_memory_gib:g} GiB), "
             f"{precision}",
             f"{len(estimates)} layouts considered, {len(fitting)} fit in memory"]
    header = (f"{'TP':>3} {'CP':>3} {'PP':>3} {'DP':>4} {'recompute':>9} | {'states':>7} {'activ.':>7} "
              f"{'vision':>7} {'deepst.':>7} {'logits':>7} {'total':>7} GiB | {'step s':>8} {'TFLOP/s':>8}")
    shown = (fitting or estimates)[:top]
    if not fitting:
        lines.append("no layout fits; the smallest ones:")
        shown = sorted(estimates, key=lambda e: e.memory.total)[:top]
    lines += [header, "-" * len(header)]
    for e in shown:
        m, lay = e.memory, e.layout
        states = (m.weights + m.gradients + m.optimizer) / GIB
        lines.append(f"{lay.tp:>3} {lay.cp:>3} {lay.pp:>3} {lay.dp:>4} {lay.recompute:>9} | {states:7.1f} "
                     f"{m.activations / GIB:7.1f} {m.vision / GIB:7.1f} {m.deepstack / GIB:7.1f} {m.logits / GIB:7.1f} "
                     f"{m.total / GIB:7.1f}     | "
                     f"{e.step_seconds:8.2f} {e.tflops_per_gpu:8.0f}")
    if fitting:
        best = fitting[0]
        args = " ".join(training_arguments(best, workload))
        lines += ["", f"best: TP {best.layout.tp} x CP {best.layout.cp} x PP {best.layout.pp} x DP {best.layout.dp}, "
                      f"recompute {best.layout.recompute}: {best.memory.total / GIB:.1f} GiB per GPU "
                      f"(incl. {cluster.gpu.reserved_gib:g} GiB reserve), {best.step_seconds:.2f} s per step, "
                      f"{best.tflops_per_gpu:.0f} TFLOP/s per GPU",
                  "", "mmprolong train arguments:", f"  {args}",
                  "", "slurm/train.sbatch:",
                  f"  sbatch --nodes={cluster.nodes} --ntasks-per-node={cluster.gpus_per_node} "
                  f"--gres=gpu:{cluster.gpus_per_node} slurm/train.sbatch {args}"]
    return "\n".join(lines)
