"""`mmprolong eval mmlongbench` and `mmprolong eval score`: MMLongBench document QA and MM-NIAH
on a model, a Megatron checkpoint or a served endpoint, and replies rescored."""

from __future__ import annotations

import sys
from pathlib import Path

from megatron_mmprolong.cli.eval_model import (
    add_endpoint_options, add_eval_model, evaluated_config, image_chat_backend, judge_backend, model_tokenizer,
)
from megatron_mmprolong.cli.options import add_score_options


def _mmlongbench_judge(args):
    """The judge of document-QA replies, when --judge-endpoint names one (checked now)."""
    if not args.judge_endpoint:
        return None
    from megatron_mmprolong.eval.mmlongbench.judge import load_judge_prompts
    from megatron_mmprolong.eval.mmlongbench.run import Judge

    prompts = load_judge_prompts(args.judge_prompt_file)
    return Judge(judge_backend(args), prompts, args.judge_concurrency, args.max_failed)


def _eval_mmlongbench(args) -> int:
    from megatron_mmprolong import runtime
    from megatron_mmprolong.data.images import ImageParams
    from megatron_mmprolong.eval.mmlongbench.data import DOC_DATASETS, NIAH_DATASETS, DataRoot
    from megatron_mmprolong.eval.mmlongbench.run import (
        SETTINGS, FailedSamples, MMLongBenchConfig, pairs, recorded_form, released, run_mmlongbench,
    )
    from megatron_mmprolong.eval.output_dir import check_same_settings

    datasets = args.datasets or [*(DOC_DATASETS if "docqa" in args.tasks else ()),
                                 *(NIAH_DATASETS if "niah" in args.tasks else ())]
    source = args.model if args.endpoint else str(Path(args.hf_dir or args.mcore_dir).resolve().name)
    tokenizer = model_tokenizer(args)
    family = "qwen2_5_vl" if args.endpoint else evaluated_config(args).family
    image = ImageParams.for_family(family, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    config = MMLongBenchConfig(source, args.page_labels, args.max_new_tokens, args.max_samples, args.seed,
                               image.min_pixels, image.max_pixels, family)
    root = DataRoot.open(args.data_root)
    work = pairs(datasets, args.lengths, tokenizer)
    config = recorded_form(args.out, config)  # the assistant turn's form an endpoint run recorded
    check_same_settings(Path(args.out) / SETTINGS, config, write=False)
    released(root, work, config)  # bad data fails before a model loads
    judge = _mmlongbench_judge(args)
    backend, writer, barrier, concurrency = image_chat_backend(args, image, tokenizer, source)
    status = 0
    try:
        run_mmlongbench(backend, root, work, config, args.out, tokenizer, judge, concurrency, writer, barrier,
                        args.train_length, args.compare, args.max_failed)
    except FailedSamples as err:  # the rest is scored; a rerun sends the failed ones again
        print(f"mmprolong eval: error: {err}", file=sys.stderr)
        status = 1
    if args.mcore_dir:
        runtime.shutdown()
    return status


def _eval_score(args) -> int:
    from megatron_mmprolong.eval.mmlongbench.run import FailedSamples, rescore

    try:
        rescore(args.predictions, args.out or Path(args.predictions).parent, _mmlongbench_judge(args),
                args.train_length, args.compare)
    except FailedSamples as err:
        print(f"mmprolong eval: error: {err}", file=sys.stderr)
        return 1
    return 0



def add_mmlongbench(kinds) -> None:
    """eval mmlongbench, then eval score."""
    bench = kinds.add_parser("mmlongbench", help="MMLongBench document QA (MMLongBench-Doc, LongDocURL, SlideVQA) and "
                                                 "MM-NIAH as the paper reports them, 8K-128K from the released files "
                                                 "and 256K/512K built from the 128K ones; on transformers, a Megatron "
                                                 "checkpoint or an OpenAI-compatible server (vLLM)")
    add_eval_model(bench, endpoint=True)
    bench.add_argument("--data-root", required=True, help="folder holding the unpacked mmlb_data/ and mmlb_image/")
    bench.add_argument("--out", required=True, help="output folder: predictions.jsonl (a rerun sends only what is "
                                                    "missing), judge.jsonl, scores.json, scores.png")
    bench.add_argument("--tasks", nargs="+", choices=["docqa", "niah"], default=["docqa", "niah"])
    bench.add_argument("--datasets", nargs="+", metavar="NAME",
                       help="only these: longdocurl mmlongdoc slidevqa retrieval-text counting-text reasoning-text "
                            "retrieval-image counting-image reasoning-image (default: all of --tasks)")
    bench.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32, 64, 128],
                       help="K tokens: 8 16 32 64 128 (released), 256 512 (document QA, built from the 128K files)")
    bench.add_argument("--max-samples", type=int, help="samples per file (default: the harness's 100 document-QA "
                                                       "and 50 MM-NIAH, shuffled with --seed)")
    bench.add_argument("--seed", type=int, default=42, help="the harness's sampling seed (and the padding order)")
    bench.add_argument("--page-labels", choices=["v1.0", "v1.1"], default="v1.1",
                       help='document-QA page labels, v1.1: "Document ID: <image>" (the default: the paper\'s '
                            'version and the harness\'s current code); v1.0: "Document ID (page N): <image>" (the '
                            'harness\'s first release)')
    bench.add_argument("--max-new-tokens", type=int, default=128, help="per reply (the harness's 128)")
    bench.add_argument("--tokenizer", help="the model's tokenizer: for --mcore-dir, and for counting 256K/512K "
                                           "contexts (default: the --hf-dir checkpoint's)")
    bench.add_argument("--min-pixels", type=int, help="image resizing of --hf-dir/--mcore-dir (default: the model "
                                                      "family's processor; Qwen2.5-VL's with --endpoint)")
    bench.add_argument("--max-pixels", type=int, help="(default: as --min-pixels)")
    add_endpoint_options(bench)
    add_score_options(bench)
    bench.set_defaults(run=_eval_mmlongbench)

    rescore = kinds.add_parser("score", help="rescore saved eval mmlongbench replies (rule-based, and the LLM judge "
                                             "with --judge-endpoint) without running the model")
    rescore.add_argument("--predictions", required=True, help="predictions.jsonl of an eval mmlongbench folder")
    rescore.add_argument("--out", help="folder for scores.json, scores.png, judge.jsonl (default: the predictions')")
    add_score_options(rescore)
    rescore.set_defaults(run=_eval_score)
