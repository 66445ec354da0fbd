"""`mmprolong <verb>`: the command-line entry point."""

from __future__ import annotations

import argparse
import sys
import warnings

from megatron_mmprolong import errors
from megatron_mmprolong.cli import convert, data, evaluate, model, plan, synth_qa

TRAIN_HELP = "continued pretraining on Megatron-Core (mmprolong train --help)"

# Each verb's parser, in the order `mmprolong --help` lists them; each module holds its verbs'
# options next to their handlers.
VERBS = (
    model.add_model_info, model.add_check_parity, convert.add_convert, data.add_synth_docs, data.add_build_data,
    synth_qa.add_synth_qa, data.add_plan_data, plan.add_plan, data.add_inspect_data, evaluate.add_eval,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmprolong", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    # `train` takes Megatron-style arguments, parsed by megatron_mmprolong.train (main, below)
    verbs.add_parser("train", help=TRAIN_HELP, add_help=False)
    for add in VERBS:
        add(verbs)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from megatron_mmprolong.train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    try:
        return args.run(args)
    except errors.expected_errors() as err:
        return errors.report(f"mmprolong {args.verb}", err)
