"""Where a run starts: it resumes from the folder it saves to, or starts from its initial weights.

- `--save S` holding a complete checkpoint (S/latest_checkpointed_iteration.txt): resume from it,
  whatever else the command line says (Megatron-LM's `--load S --save S`, without having to
  repeat the folder: a `--save` given twice, or after a batch script's own, cannot split them).
- otherwise `--pretrained-checkpoint P` (a converted checkpoint, or another run's folder: its
  latest checkpoint) gives the weights of a fresh start at iteration 0; without it, random ones.
- `--load L`: L equal to --save says the same as --save alone. Without --save, L is resumed from
  and nothing is saved (Megatron-LM's meaning). A converted checkpoint given as --load is the
  older spelling of --pretrained-checkpoint. Another run's folder as --load beside a different
  --save is refused: which one resumes would depend on the order of flags.

A resume is refused, in one line naming both values, when the checkpoint is of another model,
model family, M-RoPE base, parallel layout (TP x CP x PP) or data plan than the arguments give:
two runs sharing a folder must not continue each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_mmprolong.config import ConfigError, VLConfig
from megatron_mmprolong.convert.checkpoint_info import (
    checkpoint_config, iteration_dir, latest_iteration, read_info, resolve_checkpoint,
)
from megatron_mmprolong.training import arguments as A


class ResumeRefused(ConfigError):
    pass


@dataclass(frozen=True)
class StartPoint:
    resume: Path | None  # the training folder whose latest checkpoint this run continues
    iteration: int | None  # that checkpoint's iteration
    pretrained: Path | None  # the weights of a fresh start (a converted checkpoint or a run's folder)
    note: str | None = None  # a line for the log: how an older spelling was read

    @property
    def checkpoint(self) -> Path | None:
        """The checkpoint directory resumed from."""
        return None if self.resume is None else iteration_dir(self.resume, self.iteration)

    def describe(self, train_iters: int | None = None) -> str:
        of = f" of {train_iters}" if train_iters is not None else ""
        if self.resume is not None:
            return f"resuming from iteration {self.iteration}{of} ({self.checkpoint})"
        weights = f"the weights of {self.pretrained}" if self.pretrained else "random weights"
        return f"starting at iteration 0{of} from {weights}"


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def start_point(args: A.TrainArgs) -> StartPoint:
    save = Path(args.save) if args.save else None
    load = Path(args.load) if args.load else None
    pretrained = Path(args.pretrained_checkpoint) if args.pretrained_checkpoint else None
    note = None
    if load is not None and save is not None and _same(load, save):
        load = None
    if load is not None:
        loaded = latest_iteration(load)
        if loaded is not None and save is None:
            return StartPoint(load, loaded, pretrained)
        if loaded is not None:
            raise ResumeRefused(
                f"--load {load} is another run's folder and this run saves to --save {save}: a run resumes only from "
                f"the folder it saves to; give --save {load} to continue that run, or --pretrained-checkpoint {load} "
                f"to start a new one from its weights")
        if pretrained is not None and not _same(pretrained, load):
            raise ResumeRefused(f"--load {load} and --pretrained-checkpoint {pretrained} both name starting weights: "
                                "give one, as --pretrained-checkpoint")
        pretrained, note = load, f"--load {load} holds no training run: read as --pretrained-checkpoint {load}"
    if save is not None:
        iteration = latest_iteration(save)
        if iteration is not None:
            return StartPoint(save, iteration, pretrained, note)
    return StartPoint(None, None, pretrained, note)


def argument_model(args: A.TrainArgs, pretrained_config: VLConfig | None) -> VLConfig | None:
    """The model the arguments ask for, before any resume: the initial weights' config, else
    --hf-config, else an explicit --model; None when they leave it to the checkpoint."""
    if pretrained_config is not None:
        config = pretrained_config
    elif args.hf_config:
        config = VLConfig.from_hf_dir(args.hf_config)
    elif args.model:
        config = VLConfig.preset(args.model)
    else:
        return None
    return config.with_rotary_base(args.rotary_base) if args.rotary_base else config


def pretrained_config(start: StartPoint) -> VLConfig | None:
    """The config of the initial weights, where they are there to read (a resume may run after
    they were moved away: then the other arguments name the model)."""
    if start.pretrained is None or (start.resume is not None and not start.pretrained.exists()):
        return None
    return checkpoint_config(resolve_checkpoint(start.pretrained))


def model_name(config: VLConfig) -> str:
    """A preset's name where the architecture is one (M-RoPE base aside), else its family and size."""
    shape = _architecture(config)
    for name in VLConfig.preset_names():
        preset = VLConfig.preset(name)
        if _architecture(preset) == shape:
            return name
    t = config.text
    return f"{config.family} (hidden {t.hidden_size}, {t.num_layers} layers, vocabulary {t.vocab_size})"


def _architecture(config: VLConfig) -> tuple:
    """The shapes that make a checkpoint another model's (not the fields a converted config may
    carry differently from a preset, such as max_position_embeddings)."""
    t, v = config.text, config.vision
    return (config.family, t.vocab_size, t.hidden_size, t.num_layers, t.num_attention_heads, t.num_key_value_heads,
            t.head_dim, t.intermediate_size, t.tie_word_embeddings, v.depth, v.hidden_size, v.num_heads,
            v.intermediate_size, v.out_hidden_size, v.patch_size)


def check_resume(args: A.TrainArgs, start: StartPoint, wanted: VLConfig | None, plan_digest: str) -> VLConfig:
    """The resumed checkpoint's model config, after checking it against the arguments."""
    directory = start.checkpoint
    found = checkpoint_config(directory)
    info = read_info(directory) or {}

    def refuse(what: str, theirs, ours) -> None:
        raise ResumeRefused(f"{start.resume} holds a run of another {what}: {theirs} in its checkpoint "
                            f"{directory.name}, {ours} in this run's arguments; resume it with its own arguments, "
                            "or give this run another --save")

    if wanted is not None:
        if found.family != wanted.family:
            refuse("model family", found.family, wanted.family)
        if _architecture(found) != _architecture(wanted):
            refuse("model", model_name(found), model_name(wanted))
    base = args.rotary_base or (wanted.text.rope_theta if wanted is not None else None)
    if base is not None and float(base) != found.text.rope_theta:
        refuse("M-RoPE base (--rotary-base)", f"{found.text.rope_theta:g}", f"{float(base):g}")
    layout = info.get("parallel_layout")
    if layout:
        theirs = _layout(layout.get("tensor_parallel"), layout.get("context_parallel"), layout.get("pipeline_parallel"))
        ours = _layout(args.tensor_model_parallel_size, args.context_parallel_size, args.pipeline_model_parallel_size)
        if theirs != ours:
            refuse("parallel layout", theirs, ours)
    if info.get("plan_digest") and info["plan_digest"] != plan_digest:
        refuse("data plan", info["plan_digest"], plan_digest)
    return found


def _layout(tp, cp, pp) -> str:
    return f"TP{tp} x CP{cp} x PP{pp}"
