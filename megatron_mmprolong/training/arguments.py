"""`mmprolong train` arguments: Megatron-LM's names and meanings, YAML recipes as defaults.

A recipe is a YAML mapping of the same names (dashes or underscores); command-line arguments
override it. Unknown keys, unknown arguments and conflicting values are errors. Every argument
that Megatron-Core consumes names its destination in `ARGUMENTS` (`target`), and a test checks
that each one arrives there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megatron_mmprolong.config import ConfigError, ParallelConfig, PrecisionConfig, VLConfig


class ArgumentError(ConfigError):
    pass


@dataclass
class TrainArgs:
    # model
    model: str | None = None  # None: tiny, unless a checkpoint or --hf-config gives the model
    hf_config: str | None = None
    rotary_base: float | None = None
    freeze_vision: bool = False
    freeze_merger: bool = False
    # parallel layout
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    vision_tensor_parallel_size: int | None = None
    decoder_first_pipeline_num_layers: int | None = None
    cp_comm_type: str = "p2p"
    hierarchical_context_parallel_sizes: tuple[int, ...] | None = None
    # data
    data_mix: str | None = None
    data_plan: str | None = None
    seq_length: int = 131072
    micro_batch_size: int = 1
    global_batch_size: int = 32
    num_workers: int = 2
    loader_prefetch_gib: float = 2.0
    image_backend: str = "pil"
    # length of training
    train_iters: int | None = None
    train_tokens: float | None = None
    seed: int = 1234
    # optimizer and schedule
    lr: float = 1e-5
    min_lr: float = 1e-6
    lr_warmup_fraction: float | None = None
    lr_warmup_iters: int = 0
    lr_decay_style: str = "cosine"
    lr_decay_iters: int | None = None
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    # precision
    bf16: bool = False
    fp8_format: str | None = None
    fp8_recipe: str = "delayed"
    fp8_dot_product_attention: bool = False
    # memory
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    # checkpoints and logging
    save: str | None = None
    load: str | None = None
    pretrained_checkpoint: str | None = None
    save_interval: int | None = None
    keep_last: int | None = None
    log_interval: int = 1
    tensorboard_dir: str | None = None
    # launch
    distributed_timeout_minutes: float = 30.0


@dataclass(frozen=True)
class Arg:
    name: str
    help: str
    target: str | None = None  # "transformer.x", "vision.x", "optimizer.x", "ddp.x", "scheduler.x", "plan.x", "model.x"
    choices: tuple | None = None


ARGUMENTS: tuple[Arg, ...] = (
    Arg("model", "model preset (3b, 7b, 32b, 72b, qwen3vl-2b/4b/8b/32b, tiny, tiny-1k, qwen3vl-tiny-1k, ...; "
                 "default tiny); a --pretrained-checkpoint or --hf-config gives the model instead, and a resume "
                 "is refused if its checkpoint is another model"),
    Arg("hf_config", "directory with a Qwen2.5-VL or Qwen3-VL config.json to take the model from"),
    Arg("rotary_base", "M-RoPE base (the recipe raises 1e6 to 4e6 for 128K)", "model.rope_theta"),
    Arg("freeze_vision", "do not train the vision blocks and patch embedding"),
    Arg("freeze_merger", "do not train the vision merger"),
    Arg("tensor_model_parallel_size", "tensor parallel size", "transformer.tensor_model_parallel_size"),
    Arg("pipeline_model_parallel_size", "pipeline parallel size", "transformer.pipeline_model_parallel_size"),
    Arg("context_parallel_size", "context parallel size", "transformer.context_parallel_size"),
    Arg("sequence_parallel", "sequence parallelism (needs TP > 1)", "transformer.sequence_parallel"),
    Arg("vision_tensor_parallel_size", "vision encoder TP (divides TP; default TP)", "vision.tensor_model_parallel_size"),
    Arg("decoder_first_pipeline_num_layers", "decoder layers on the first (vision) pipeline stage",
        "transformer.num_layers_in_first_pipeline_stage"),
    Arg("cp_comm_type", "Transformer Engine CP communication for packed sequences: p2p (ring), a2a (heads; "
        "TE >= 2.10), all_gather (K/V; TE >= 2.18) or a2a+p2p (a2a within groups, p2p across them; TE >= 2.19)",
        "transformer.cp_comm_type"),
    Arg("hierarchical_context_parallel_sizes", "with --cp-comm-type a2a+p2p: the a2a group size, then the p2p "
        "size (their product is the CP size)", "transformer.hierarchical_context_parallel_sizes"),
    Arg("data_mix", "mixture YAML (see `mmprolong plan-data`)"),
    Arg("data_plan", "precomputed plan prefix (instead of --data-mix)"),
    Arg("seq_length", "longest packed sequence in tokens", "plan.seq_length"),
    Arg("micro_batch_size", "packed sequences per micro-batch (packed THD batches: 1)"),
    Arg("global_batch_size", "packed sequences per step", "plan.global_batch"),
    Arg("num_workers", "data loader worker processes per rank"),
    Arg("loader_prefetch_gib", "host memory of the micro-batches a rank's loader holds ahead, all workers "
        "together (fewer items ahead, then fewer workers, to fit; at least one item)"),
    Arg("image_backend", "page image decoding", None, ("pil", "dali")),
    Arg("train_iters", "training steps (default: all steps of the plan)"),
    Arg("train_tokens", "token budget of the run (overrides the mixture's)"),
    Arg("seed", "random seed"),
    Arg("lr", "peak learning rate", "optimizer.lr"),
    Arg("min_lr", "final learning rate", "optimizer.min_lr"),
    Arg("lr_warmup_fraction", "warm-up as a fraction of the decay steps", "scheduler.lr_warmup_steps"),
    Arg("lr_warmup_iters", "warm-up steps (instead of --lr-warmup-fraction)", "scheduler.lr_warmup_steps"),
    Arg("lr_decay_style", "learning-rate decay", "scheduler.lr_decay_style", ("cosine", "linear", "constant", "WSD")),
    Arg("lr_decay_iters", "decay steps (default: --train-iters)", "scheduler.lr_decay_steps"),
    Arg("weight_decay", "AdamW weight decay", "optimizer.weight_decay"),
    Arg("adam_beta1", "Adam beta1", "optimizer.adam_beta1"),
    Arg("adam_beta2", "Adam beta2", "optimizer.adam_beta2"),
    Arg("adam_eps", "Adam epsilon", "optimizer.adam_eps"),
    Arg("clip_grad", "gradient norm clipping (0: off)", "optimizer.clip_grad"),
    Arg("use_distributed_optimizer", "shard optimizer state over data-parallel ranks", "optimizer.use_distributed_optimizer"),
    Arg("overlap_grad_reduce", "overlap the gradient all-reduce with backward", "ddp.overlap_grad_reduce"),
    Arg("bf16", "bfloat16 parameters and compute", "transformer.bf16"),
    Arg("fp8_format", "FP8 GEMMs (Transformer Engine)", "transformer.fp8", ("hybrid", "e4m3", "none")),
    Arg("fp8_recipe", "FP8 scaling", "transformer.fp8_recipe", ("delayed", "tensorwise", "blockwise", "mxfp8")),
    Arg("fp8_dot_product_attention", "FP8 attention (unpacked sequences only for training)",
        "transformer.fp8_dot_product_attention"),
    Arg("recompute_granularity", "activation recompute", "transformer.recompute_granularity",
        ("full", "selective", "none")),
    Arg("recompute_method", "full recompute method", "transformer.recompute_method", ("uniform", "block")),
    Arg("recompute_num_layers", "layers per recompute unit", "transformer.recompute_num_layers"),
    Arg("save", "checkpoint directory of this run: written, and resumed from when it holds a checkpoint"),
    Arg("load", "Megatron-LM's resume directory: the same as --save, or without --save a run's folder to "
                "resume from without saving (a converted checkpoint here is read as --pretrained-checkpoint)"),
    Arg("pretrained_checkpoint", "weights to start from when --save holds no checkpoint yet: a converted "
                                 "checkpoint or another run's --save folder (weights only)"),
    Arg("save_interval", "steps between checkpoints"),
    Arg("keep_last", "keep only the newest N complete checkpoints in --save (older ones are removed after "
                     "each save; default: keep all)"),
    Arg("log_interval", "steps between log lines"),
    Arg("tensorboard_dir", "TensorBoard folder: each run writes into a subfolder named after its --save"),
    Arg("distributed_timeout_minutes", "minutes a collective may wait for the other ranks before the run fails "
                                       "(process group and Megatron groups)"),
)


def _field_types() -> dict[str, str]:
    """Each argument's type: bool, int, float, str or tuple[int, ...] (TrainArgs' annotations, None aside)."""
    return {f.name: str(f.type).split("|")[0].strip() for f in dataclasses.fields(TrainArgs)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmprolong train",
        description="Long-context continued pretraining of Qwen2.5-VL on Megatron-Core. "
                    "A YAML recipe (--config) sets defaults; these arguments override it.",
    )
    parser.add_argument("--config", help="YAML recipe")
    parser.add_argument("--preflight-world-size", type=int, metavar="N",
                        help="check in this one process, starting no rank, that N ranks fit this run (TP x CP x PP, "
                             "the global batch over DP, the model, the data plan, the resume point, the --save "
                             "lock) and exit: 0 when it fits, 2 with one line saying why not")
    fields = _field_types()
    defaults = TrainArgs()
    for arg in ARGUMENTS:
        flag = "--" + arg.name.replace("_", "-")
        kind = fields[arg.name]
        if kind == "bool":  # --flag / --no-flag: a recipe's true can be turned off
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=arg.help)
            continue
        if kind.startswith("tuple"):  # a list of ints, as Megatron-LM takes it
            parser.add_argument(flag, type=int, nargs="+", default=None, metavar="N", help=arg.help)
            continue
        cast = {"int": int, "float": float}.get(kind, str)
        parser.add_argument(flag, type=cast, default=None, choices=arg.choices,
                            help=f"{arg.help} (default {getattr(defaults, arg.name)})")
    return parser


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    """Recipe, then command line; raises ArgumentError for unknown or conflicting values."""
    return parse_command(argv)[0]


def parse_command(argv: list[str] | None = None) -> tuple[TrainArgs, int | None]:
    """(the training arguments, --preflight-world-size or None): `parse_args` plus the one
    option that is no training argument (so no recipe key)."""
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    for argument in unknown:
        _refuse_removed(argument.lstrip("-").split("=")[0].replace("-", "_"), argument)
    if unknown:
        raise ArgumentError(f"unknown arguments: {' '.join(unknown)}")
    values: dict[str, Any] = {}
    if namespace.config:
        values.update(read_recipe(namespace.config))
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in vars(namespace).items()
                   if k not in ("config", "preflight_world_size") and v is not None})
    switchable = {a.name for a in ARGUMENTS if a.choices and "none" in a.choices}
    for name in switchable & values.keys():  # e.g. --fp8-format none over a recipe's hybrid
        values[name] = None if values[name] == "none" else values[name]
    args = TrainArgs(**values)
    validate(args)
    if namespace.preflight_world_size is not None and namespace.preflight_world_size < 1:
        raise ArgumentError("--preflight-world-size must be >= 1")
    return args, namespace.preflight_world_size


# arguments that existed once, with the reason they are gone
REMOVED = {
    "fp8_vision": "FP8 in the vision encoder was removed: Transformer Engine's FP8 GEMMs need every "
                  "dimension a multiple of 16, and the vision MLP of the 3B/7B models is 3420 wide and "
                  "the patch rows of a pack vary; the vision encoder runs in BF16",
    "no_load_optim": "--no-load-optim was removed: a resume from --save restores the optimizer; to start from "
                     "a checkpoint's weights only, give it as --pretrained-checkpoint with a new --save",
}


def _refuse_removed(name: str, where: str) -> None:
    if name in REMOVED:
        raise ArgumentError(f"{where}: {REMOVED[name]}")


def read_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_bytes()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ArgumentError(f"{path}: cannot read the recipe ({err})") from None
    if not isinstance(data, dict):
        raise ArgumentError(f"{path}: a recipe is a mapping of argument names to values")
    known = {a.name: a for a in ARGUMENTS}
    fields = _field_types()
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        _refuse_removed(name, f"{path}: {key}")
        if name not in known:
            raise ArgumentError(f"{path}: unknown recipe key {key!r}")
        arg = known[name]
        if arg.choices and value is not None and value not in arg.choices:
            raise ArgumentError(f"{path}: {key} must be one of {list(arg.choices)}, got {value!r}")
        value = _typed(path, key, value, fields[name])
        if name in ("data_mix", "data_plan", "hf_config", "save", "load", "pretrained_checkpoint",
                    "tensorboard_dir") and value:
            value = str(Path(value) if Path(value).is_absolute() else (path.parent / value))
        values[name] = value
    return values


def _typed(path: Path, key: str, value: Any, base: str) -> Any:
    """A recipe value as its argument's type (`_field_types`): a float written 1e-5 (YAML reads
    a string) becomes one; a value of another type is an ArgumentError."""
    if value is None or base == "str":
        return value
    if base.startswith("tuple"):
        if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
        raise ArgumentError(f"{path}: {key} must be a list of integers, got {value!r}")
    if base == "float" and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif isinstance(value, bool) == (base == "bool") and isinstance(value, int):
        return value
    raise ArgumentError(f"{path}: {key} must be a{'n' if base == 'int' else ''} {base}, got {value!r}")


def validate(args: TrainArgs) -> None:
    if (args.data_mix is None) == (args.data_plan is None):
        raise ArgumentError("give exactly one of --data-mix and --data-plan")
    if args.train_iters is not None and args.train_tokens is not None:
        raise ArgumentError("--train-iters and --train-tokens conflict: give one")
    if args.micro_batch_size != 1:
        raise ArgumentError("--micro-batch-size must be 1: a micro-batch is one packed sequence of up to --seq-length tokens")
    if args.lr < args.min_lr:
        raise ArgumentError(f"--lr {args.lr} is below --min-lr {args.min_lr}")
    if args.lr_warmup_iters and args.lr_warmup_fraction is not None:
        raise ArgumentError("--lr-warmup-iters and --lr-warmup-fraction conflict: give one")
    if args.lr_warmup_fraction is not None and not 0 <= args.lr_warmup_fraction < 1:
        raise ArgumentError("--lr-warmup-fraction must be in [0, 1)")
    if args.recompute_granularity == "full" and args.recompute_method is None:
        raise ArgumentError("--recompute-granularity full needs --recompute-method uniform or block")
    if args.save_interval is not None and args.save is None:
        raise ArgumentError("--save-interval needs --save")
    if args.keep_last is not None and (args.keep_last < 1 or args.save is None):
        raise ArgumentError("--keep-last needs --save and a value >= 1")
    if not args.distributed_timeout_minutes > 0:
        raise ArgumentError("--distributed-timeout-minutes must be > 0")
    if args.bf16 and args.fp8_format is None and args.fp8_dot_product_attention:
        raise ArgumentError("--fp8-dot-product-attention needs --fp8-format")
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                 "global_batch_size", "seq_length", "log_interval"):
        if getattr(args, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be >= 1")
    if not args.loader_prefetch_gib > 0:
        raise ArgumentError("--loader-prefetch-gib must be > 0")


def parallel_config(args: TrainArgs) -> ParallelConfig:
    return ParallelConfig(
        tensor_parallel=args.tensor_model_parallel_size,
        pipeline_parallel=args.pipeline_model_parallel_size,
        context_parallel=args.context_parallel_size,
        vision_tensor_parallel=args.vision_tensor_parallel_size,
        sequence_parallel=args.sequence_parallel,
        decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
        cp_comm_type=args.cp_comm_type,
        hierarchical_context_parallel_sizes=args.hierarchical_context_parallel_sizes,
    )


def precision_config(args: TrainArgs) -> PrecisionConfig:
    return PrecisionConfig(
        params_dtype="bf16" if args.bf16 else "fp32", fp8=args.fp8_format, fp8_recipe=args.fp8_recipe,
        fp8_attention=args.fp8_dot_product_attention,
    )


def transformer_overrides(args: TrainArgs) -> dict[str, Any]:
    """TransformerConfig fields beyond the layout and precision."""
    values: dict[str, Any] = dict(calculate_per_token_loss=True, variable_seq_lengths=True)
    if args.recompute_granularity == "selective":
        values.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif args.recompute_granularity == "full":
        values.update(recompute_granularity="full", recompute_method=args.recompute_method,
                      recompute_num_layers=args.recompute_num_layers or 1)
    return values


def optimizer_config(args: TrainArgs):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=precision_config(args).transformer_overrides()["params_dtype"],
        use_distributed_optimizer=args.use_distributed_optimizer,
    )


def ddp_config(args: TrainArgs):
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )


def scheduler_steps(args: TrainArgs, train_iters: int) -> dict[str, Any]:
    decay = args.lr_decay_iters or train_iters
    warmup = args.lr_warmup_iters or math.floor((args.lr_warmup_fraction or 0.0) * decay)
    return dict(lr_warmup_steps=warmup, lr_decay_steps=decay, lr_decay_style=args.lr_decay_style)


def model_config(args: TrainArgs, checkpoint_config: VLConfig | None = None) -> VLConfig:
    config = checkpoint_config or (
        VLConfig.from_hf_dir(args.hf_config) if args.hf_config else VLConfig.preset(args.model or "tiny")
    )
    return config.with_rotary_base(args.rotary_base) if args.rotary_base else config


def effective(args: TrainArgs) -> str:
    return json.dumps(dataclasses.asdict(args), indent=1, sort_keys=True)
