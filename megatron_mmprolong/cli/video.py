"""`mmprolong eval video`: Video-MME, MLVU (multiple choice, M-avg) and LongVideoBench (val) as the
paper ran them, on transformers, a Megatron checkpoint or a served model."""

from __future__ import annotations

import sys
from pathlib import Path

from megatron_mmprolong.cli.eval_model import (
    add_endpoint_options, add_eval_model, eval_model, evaluated_config, judge_backend, model_tokenizer, served_model,
)
from megatron_mmprolong.cli.options import add_max_tokens_field


def _eval_video(args) -> int:
    from megatron_mmprolong import runtime
    from megatron_mmprolong.data.images import ImageParams
    from megatron_mmprolong.eval.output_dir import check_same_settings
    from megatron_mmprolong.eval.video.run import (
        SETTINGS, FailedQuestions, VideoEvalConfig, plan_videos, read_questions, report_failure, run_video_eval,
    )
    from megatron_mmprolong.eval.video.sampling import SamplingConfig, SamplingError

    tokenizer = model_tokenizer(args)
    try:
        sampling = SamplingConfig(args.fps, args.max_frames, args.max_video_tokens, frame_rule=args.frame_rule,
                                  token_floor=args.token_floor)
    except SamplingError as err:
        print(f"mmprolong eval: error: {err}", file=sys.stderr)
        return 2
    family = args.family if args.endpoint else evaluated_config(args).family
    source = args.model if args.endpoint else Path(args.hf_dir or args.mcore_dir).resolve().name
    config = VideoEvalConfig(source, family, sampling, args.max_new_tokens)
    questions = read_questions({"videomme": args.videomme_root, "mlvu": args.mlvu_root, "lvb": args.lvb_root},
                               args.max_samples)
    check_same_settings(Path(args.out) / SETTINGS, config, write=False)
    plan_videos(questions, config)  # bad data fails before a model loads
    judge = judge_backend(args) if args.judge_endpoint else None
    writer, barrier, concurrency = True, lambda: None, 1
    if args.endpoint:
        backend, concurrency = served_model(args), args.concurrency
    else:
        from megatron_mmprolong.data.chat import ChatTokenizer
        from megatron_mmprolong.eval.video.requests import LocalVideoBackend

        model, writer, barrier = eval_model(args)
        device = "cpu"  # a Megatron model moves its inputs to its own device
        if args.hf_dir:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            model = model.to(device)
        backend = LocalVideoBackend(model, ChatTokenizer(tokenizer), ImageParams.for_family(family), source, family,
                                    device, in_thread=bool(args.hf_dir))
    status = 0
    try:
        run_video_eval(backend, questions, config, args.out, args.frame_cache, bool(args.endpoint), concurrency,
                       writer, barrier, args.max_failed, args.decode_workers, judge if writer else None)
    except FailedQuestions as err:
        status = report_failure(err)
    if args.mcore_dir:
        runtime.shutdown()
    return status


def add_video(kinds) -> None:
    bench = kinds.add_parser("video", help="long-video multiple choice as the paper reports it: Video-MME, MLVU "
                                           "(M-avg) and LongVideoBench (val) from their released files, 1 fps, at "
                                           "most 768 frames and 24,576 video tokens; on transformers, a Megatron "
                                           "checkpoint or an OpenAI-compatible server (vLLM)")
    add_eval_model(bench, endpoint=True)
    bench.add_argument("--videomme-root", help="Video-MME folder: videomme/test-00000-of-00001.parquet and data/ "
                                               "(the unzipped videos_chunked_*.zip)")
    bench.add_argument("--mlvu-root", help="MLVU dev folder holding MLVU/json/ and MLVU/video/")
    bench.add_argument("--lvb-root", help="LongVideoBench folder: lvb_val.json and videos/ (the untarred parts)")
    bench.add_argument("--out", required=True, help="output folder: predictions.jsonl (a rerun sends only what is "
                                                    "missing), scores.json, scores.png")
    bench.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video (the paper's 1)")
    bench.add_argument("--max-frames", type=int, default=768, help="at most this many frames a video (the paper's "
                                                                   "768)")
    bench.add_argument("--max-video-tokens", type=int, default=24576,
                       help="at most this many video tokens a video, as the model family counts them; the frame "
                            "size is derived from it (the paper's 24,576)")
    bench.add_argument("--frame-rule", choices=["floor", "round"], default="floor",
                       help="how the frame count is made even: floor (qwen-vl-utils >= 0.0.10, Qwen3-VL) or round "
                            "(qwen-vl-utils 0.0.8)")
    bench.add_argument("--token-floor", action="store_true",
                       help="the reference's 128 tokens per 2 frames at least, over --max-video-tokens (by default "
                            "the budget wins)")
    bench.add_argument("--family", choices=["qwen2_5_vl", "qwen3_vl"], default="qwen2_5_vl",
                       help="with --endpoint: whose processor sizes the frames")
    bench.add_argument("--max-samples", type=int, help="only the first N questions of each benchmark")
    bench.add_argument("--max-new-tokens", type=int, default=128, help="per reply")
    bench.add_argument("--tokenizer", help="the model's tokenizer, for --mcore-dir (default: the --hf-dir checkpoint's)")
    bench.add_argument("--frame-cache", help="folder of decoded frames, shared between runs (default: OUT/frames)")
    bench.add_argument("--decode-workers", type=int, default=2, help="videos decoded at once")
    add_endpoint_options(bench)
    bench.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    bench.add_argument("--max-retries", type=int, default=5, help="retries on timeouts, 429 and 5xx")
    bench.add_argument("--max-failed", type=int, default=10, help="questions that may fail after their retries "
                                                                  "before the run stops; a rerun sends them again")
    bench.add_argument("--judge-endpoint", help="OpenAI-compatible base URL of the LLM judge that reads MLVU replies "
                                                "the rule finds no letter in (VLMEvalKit's default for MLVU; without "
                                                "it such replies are wrong)")
    bench.add_argument("--judge-model", help="model name served by --judge-endpoint")
    bench.add_argument("--judge-api-key-env", metavar="VAR", help="environment variable holding the judge's API key")
    add_max_tokens_field(bench)
    bench.set_defaults(run=_eval_video)
