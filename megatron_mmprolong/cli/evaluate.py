"""`mmprolong eval qa | needle | extend | position-loss` (and the MMLongBench verbs of
cli/mmlongbench.py): a checkpoint answering questions, needles and long samples."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_mmprolong.cli import mmlongbench, video
from megatron_mmprolong.cli import vtcbench as vtcbench_verbs
from megatron_mmprolong.cli.eval_model import add_eval_model, eval_model, evaluated_config


def _eval_qa(args) -> int:
    from megatron_mmprolong import runtime
    from megatron_mmprolong.data.chat import ChatTokenizer
    from megatron_mmprolong.data.store import MultimodalStore
    from megatron_mmprolong.eval.dataset_qa import answer_resumably, select_samples, write_results

    store = MultimodalStore(args.data)
    store.check_fits(evaluated_config(args))
    tokenizer = ChatTokenizer(args.tokenizer or store.manifest["tokenizer"]["path"])
    indices = select_samples(store, args.tasks, args.limit)
    model, writer, barrier = eval_model(args)
    out = Path(args.out or Path(args.hf_dir or args.mcore_dir) / "eval_qa.json")
    log = out.with_name(out.name + ".answers.jsonl")  # a rerun after a kill continues from it
    results = answer_resumably(model, store, tokenizer, indices, log, "eval qa", writer=writer, barrier=barrier)
    if writer:
        print(json.dumps({"results": str(out), **write_results(results, out)}, indent=1))
        log.unlink()
    if args.mcore_dir:
        runtime.shutdown()
    return 0


def _eval_needle(args) -> int:
    from megatron_mmprolong.eval.needle import NeedleConfig, run_needle_eval

    tokenizer = Path(args.tokenizer or args.hf_dir).resolve() if args.tokenizer or args.hf_dir else None
    if tokenizer is None or not (tokenizer / "tokenizer.json").is_file():
        print(f"mmprolong eval: error: no tokenizer.json in {tokenizer or 'the arguments'}; pass --tokenizer",
              file=sys.stderr)
        return 2
    config = NeedleConfig(str(tokenizer), tuple(args.lengths), tuple(args.depths), args.per_cell, args.page_width,
                          args.page_height, args.font_size, args.train_length, args.seed,
                          tuple(str(Path(r).resolve()) for r in args.haystack or ()), args.dpi, args.metric,
                          evaluated_config(args).family)
    _check_files("--haystack", config.haystack)
    if not config.haystack:
        config.pages()  # errors in the settings before the model loads
    return _eval_into_folder(args, run_needle_eval, config, "needle_config.json",
                             ("metric", "exact_match", "f1", "samples", "by_length", "by_depth"))


def _eval_position_loss(args) -> int:
    from tqdm import tqdm

    from megatron_mmprolong import runtime
    from megatron_mmprolong.data.store import MultimodalStore
    from megatron_mmprolong.eval.position_loss import hf_scorer, position_loss, write_report

    if args.bucket_size < 1:
        from megatron_mmprolong.eval.dataset_qa import EvalError

        raise EvalError(f"--bucket-size {args.bucket_size}: must be at least 1 position")
    store = MultimodalStore(args.data)
    store.check_fits(evaluated_config(args))
    indices = [i for i in range(len(store)) if int(store.samples[i]["tokens"]) >= args.min_tokens][:args.limit]
    if not indices:
        print(f"mmprolong eval: error: {args.data} has no samples of {args.min_tokens} tokens or more", file=sys.stderr)
        return 2
    model, writer, _ = eval_model(args)
    score = model.token_scores if args.mcore_dir else hf_scorer(model)
    with tqdm(total=len(indices), unit="sample", desc="eval position-loss", disable=None if writer else True) as progress:
        report = position_loss(score, store, indices, args.bucket_size, progress)
    if writer:
        write_report(report, args.out)
        print(json.dumps({"out": args.out, **report}, indent=1))
    if args.mcore_dir:
        runtime.shutdown()
    return 0


def _eval_extend(args) -> int:
    from megatron_mmprolong.eval.extension import ExtensionConfig, check_inputs, run_extension_eval

    _check_files("--records", args.records)
    config = ExtensionConfig(str(Path(args.tokenizer).resolve()), tuple(str(Path(r).resolve()) for r in args.records),
                             tuple(args.lengths), args.dpi, args.seed, evaluated_config(args).family)
    check_inputs(config)
    return _eval_into_folder(args, run_extension_eval, config, "extension_config.json",
                             ("samples", "exact_match", "f1", "by_length"))


def _check_files(flag: str, paths) -> None:
    """Inputs read after the model loads are checked before it does."""
    from megatron_mmprolong.eval.dataset_qa import EvalError

    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise EvalError(f"{flag} {missing[0]}: no such file")


def _eval_into_folder(args, run, config, settings: str, keys) -> int:
    """needle and extend: the folder's settings checked before a model loads, `run` on every
    rank, rank 0 printing the report's `keys`."""
    from megatron_mmprolong import runtime
    from megatron_mmprolong.eval.output_dir import check_same_settings

    check_same_settings(Path(args.out) / settings, config, write=False)
    model, writer, barrier = eval_model(args)
    report = run(model, config, args.out, writer=writer, barrier=barrier)
    if writer:
        print(json.dumps({"out": args.out, **{k: report[k] for k in keys}}, indent=1))
    if args.mcore_dir:
        runtime.shutdown()
    return 0



def add_eval(verbs) -> None:
    """eval and its kinds, in the order --help lists them."""
    evaluate = verbs.add_parser("eval", help="evaluate a checkpoint")
    kinds = evaluate.add_subparsers(dest="kind", required=True, metavar="KIND")
    qa = kinds.add_parser("qa", help="answer a dataset's questions (greedy); exact match and F1")
    add_eval_model(qa)
    qa.add_argument("--data", required=True, help="dataset prefix (mmprolong build-data)")
    qa.add_argument("--tasks", nargs="+", help="only samples of these tasks (default: all)")
    qa.add_argument("--limit", type=int, help="at most this many samples")
    qa.add_argument("--tokenizer", help="default: the one the dataset was built with")
    qa.add_argument("--out", help="results JSON (default: eval_qa.json in the checkpoint directory)")
    qa.set_defaults(run=_eval_qa)

    needle = kinds.add_parser("needle", help="needle retrieval grid (lengths x depths) on synthetic or your own "
                                             "documents, with a heat map; lengths past the training window test extension")
    add_eval_model(needle)
    needle.add_argument("--out", required=True, help="output folder; a rerun continues what is there")
    needle.add_argument("--tokenizer", help="default: the HF checkpoint's own (needed with --mcore-dir)")
    needle.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072],
                        help="context lengths in tokens (default 8K to 128K)")
    needle.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="needle positions, 0 = first page, 1 = last page")
    needle.add_argument("--per-cell", type=int, default=2, help="documents per (length, depth) cell")
    needle.add_argument("--train-length", type=int, help="the training window, marked on the heat map")
    needle.add_argument("--page-width", type=int, default=1224, help="px (default: letter at 144 DPI)")
    needle.add_argument("--page-height", type=int, default=1584)
    needle.add_argument("--font-size", type=int, default=22)
    needle.add_argument("--seed", type=int, default=0)
    needle.add_argument("--haystack", nargs="+", metavar="RECORDS",
                        help="your document records (JSONL, page images or PDFs): their pages surround the needle "
                             "page instead of synthetic distractor pages")
    needle.add_argument("--dpi", type=int, default=144, help="rendering of PDF haystack records")
    needle.add_argument("--metric", choices=["exact_match", "f1"], default="exact_match",
                        help="score of the grid and heat map (both are reported per length)")
    needle.set_defaults(run=_eval_needle)

    extend = kinds.add_parser("extend", help="context extension: pad each document with the others' pages up to "
                                             "each length (past the training window) and ask its question again")
    add_eval_model(extend)
    extend.add_argument("--records", nargs="+", required=True, help="JSONL document records (pages or pdf) with answers")
    extend.add_argument("--tokenizer", required=True, help="Qwen2.5-VL tokenizer directory")
    extend.add_argument("--lengths", type=int, nargs="+", default=[262144, 524288], help="target lengths in tokens")
    extend.add_argument("--out", required=True, help="output folder; a rerun continues what is there")
    extend.add_argument("--dpi", type=int, default=144, help="PDF rendering resolution")
    extend.add_argument("--seed", type=int, default=0, help="order of the padding pages")
    extend.set_defaults(run=_eval_extend)

    by_position = kinds.add_parser("position-loss", help="loss and next-token accuracy by position bucket over a "
                                                         "dataset's long samples (JSON and a line plot)")
    add_eval_model(by_position)
    by_position.add_argument("--data", required=True, help="dataset prefix of held-out long samples")
    by_position.add_argument("--out", required=True, help="output folder (position_loss.json, position_loss.png)")
    by_position.add_argument("--bucket-size", type=int, default=4096, help="positions per bucket (default 4096)")
    by_position.add_argument("--min-tokens", type=int, default=0, help="only samples at least this long")
    by_position.add_argument("--limit", type=int, help="at most this many samples")
    by_position.set_defaults(run=_eval_position_loss)

    mmlongbench.add_mmlongbench(kinds)
    video.add_video(kinds)
    vtcbench_verbs.add_vtcbench(kinds)
