"""`mmprolong eval vtcbench` and `mmprolong eval vtcbench-score`: VTCBench-Wild on a model, a
Megatron checkpoint or a served endpoint, and saved replies rescored."""

from __future__ import annotations

import sys
from pathlib import Path

from megatron_mmprolong.cli.eval_model import (
    add_endpoint_options, add_eval_model, evaluated_config, image_chat_backend, judge_backend, model_tokenizer,
)
from megatron_mmprolong.cli.options import add_max_tokens_field

SPLITS = ("Retrieval", "Reasoning", "Memory")  # eval/vtcbench/data.py's, here for --help without imports


def _vtcbench_judge(args):
    """The judge of Memory replies, when --judge-endpoint names one (checked now)."""
    if not args.judge_endpoint:
        return None
    from megatron_mmprolong.eval.vtcbench.judge import load_judge_prompt
    from megatron_mmprolong.eval.vtcbench.run import Judge

    prompt = load_judge_prompt(args.judge_prompt_file)
    return Judge(judge_backend(args), prompt, args.judge_concurrency, args.max_failed)


def _eval_vtcbench(args) -> int:
    from megatron_mmprolong import runtime
    from megatron_mmprolong.data.images import ImageParams
    from megatron_mmprolong.eval.mmlongbench.run import FailedSamples
    from megatron_mmprolong.eval.output_dir import check_same_settings
    from megatron_mmprolong.eval.vtcbench.data import DataRoot
    from megatron_mmprolong.eval.vtcbench.run import (
        SETTINGS, VLMEVALKIT_PIXELS, VTCBenchConfig, plan, run_vtcbench,
    )

    tokenizer = model_tokenizer(args)
    source = args.model if args.endpoint else str(Path(args.hf_dir or args.mcore_dir).resolve().name)
    family = "qwen2_5_vl" if args.endpoint else evaluated_config(args).family
    low, high = VLMEVALKIT_PIXELS.get(family, (None, None))
    image = ImageParams.for_family(family, min_pixels=args.min_pixels or low, max_pixels=args.max_pixels or high)
    config = VTCBenchConfig(source, args.prompts, args.max_new_tokens, args.max_samples, image.min_pixels,
                            image.max_pixels, family)
    root = DataRoot.open(args.data_root)
    check_same_settings(Path(args.out) / SETTINGS, config, write=False)
    samples = plan(root, args.splits, config)  # bad data fails before a model loads
    judge = _vtcbench_judge(args)
    backend, writer, barrier, concurrency = image_chat_backend(args, image, tokenizer, source)
    status = 0
    try:
        run_vtcbench(backend, root, samples, config, args.out, judge, concurrency, writer, barrier, args.compare,
                     args.max_failed)
    except FailedSamples as err:  # the rest is scored; a rerun sends the failed ones again
        print(f"mmprolong eval: error: {err}", file=sys.stderr)
        status = 1
    if args.mcore_dir:
        runtime.shutdown()
    return status


def _eval_vtcbench_score(args) -> int:
    from megatron_mmprolong.eval.mmlongbench.run import FailedSamples
    from megatron_mmprolong.eval.vtcbench.run import rescore

    try:
        rescore(args.predictions, args.out or Path(args.predictions).parent, _vtcbench_judge(args), args.compare)
    except FailedSamples as err:
        print(f"mmprolong eval: error: {err}", file=sys.stderr)
        return 1
    return 0


def _add_judge_options(parser) -> None:
    parser.add_argument("--judge-endpoint", help="OpenAI-compatible base URL of the LLM judge of Memory replies "
                                                 "(the benchmark's: gpt-4o-mini); without it, Memory has no score")
    parser.add_argument("--judge-model", help="model name served by --judge-endpoint")
    parser.add_argument("--judge-api-key-env", metavar="VAR", help="environment variable holding the judge's API key")
    parser.add_argument("--judge-prompt-file", help="text replacing the benchmark's judge prompt, with $question, "
                                                    "$gold_answer and $llm_response")
    parser.add_argument("--judge-concurrency", type=int, default=8, help="judge requests in flight")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--max-retries", type=int, default=5, help="retries on timeouts, 429 and 5xx")
    parser.add_argument("--max-failed", type=int, default=10,
                        help="samples (and judge requests) that may fail after their retries before the run stops; "
                             "they are named, the exit status is 1, and a rerun sends them again")
    add_max_tokens_field(parser)
    parser.add_argument("--compare", metavar="OTHER_DIR", help="another run's scores beside these on scores.png")


def add_vtcbench(kinds) -> None:
    """eval vtcbench, then eval vtcbench-score."""
    bench = kinds.add_parser("vtcbench", help="VTCBench-Wild (Retrieval, Reasoning: containsAll; Memory: LLM judge; "
                                              "Overall weighted by samples) from the released parquet files; on "
                                              "transformers, a Megatron checkpoint or an OpenAI-compatible server")
    add_eval_model(bench, endpoint=True)
    bench.add_argument("--data-root", required=True, help="the folder `hf download --repo-type dataset "
                                                          "MLLM-CL/VTCBench --local-dir DIR` filled")
    bench.add_argument("--out", required=True, help="output folder: predictions.jsonl (a rerun sends only what is "
                                                    "missing), judge.jsonl, scores.json, scores.png")
    bench.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    bench.add_argument("--max-samples", type=int, help="the first N samples of each split (default: all)")
    bench.add_argument("--prompts", choices=["vlmevalkit", "official"], default="vlmevalkit",
                       help="instructions before the question: VLMEvalKit's (the default; the public numbers), or "
                            "the benchmark's run_wild.py, whose Retrieval and Reasoning texts are swapped")
    bench.add_argument("--max-new-tokens", type=int, default=2048,
                       help="per reply (VLMEvalKit's Qwen2-VL default; the benchmark's own runs: 192)")
    bench.add_argument("--tokenizer", help="the model's tokenizer, for --mcore-dir (default: the --hf-dir one)")
    bench.add_argument("--min-pixels", type=int, help="page resizing of --hf-dir/--mcore-dir (default: VLMEvalKit's "
                                                      "Qwen2.5-VL setting, 1280*28*28; other families: their "
                                                      "processor's); a served model resizes as its server does")
    bench.add_argument("--max-pixels", type=int, help="(default: 16384*28*28; as --min-pixels)")
    add_endpoint_options(bench)
    _add_judge_options(bench)
    bench.set_defaults(run=_eval_vtcbench)

    rescore = kinds.add_parser("vtcbench-score", help="rescore saved eval vtcbench replies (containsAll, and the "
                                                      "LLM judge of Memory with --judge-endpoint) without the model")
    rescore.add_argument("--predictions", required=True, help="predictions.jsonl of an eval vtcbench folder")
    rescore.add_argument("--out", help="folder for scores.json, scores.png, judge.jsonl (default: the predictions')")
    _add_judge_options(rescore)
    rescore.set_defaults(run=_eval_vtcbench_score)
