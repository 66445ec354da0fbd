"""Option groups that several verbs share, and the parity verdict their tolerances decide."""

from __future__ import annotations

import json
import sys


def parallel_config(args):
    from megatron_mmprolong.config import ParallelConfig

    return ParallelConfig(
        tensor_parallel=args.tp, pipeline_parallel=args.pp,
        vision_tensor_parallel=getattr(args, "vision_tp", None),
        decoder_first_pipeline_num_layers=getattr(args, "decoder_first_pipeline_num_layers", None),
    )


def judge(report: dict, args) -> int:
    """Print a parity report with its verdict; the exit status says whether it passed."""
    report["atol"] = args.atol
    report["min_top1_agreement"] = args.min_top1
    report["passed"] = report["max_abs_logit_diff"] <= args.atol and report["top1_agreement"] >= args.min_top1
    print(json.dumps(report, indent=2))
    if not report["passed"]:
        cause = report.get("known_difference") or f"the logits differ beyond --atol {args.atol} / --min-top1 {args.min_top1}"
        print(f"mmprolong {args.verb}: failed: {cause}", file=sys.stderr)
    return 0 if report["passed"] else 1


def add_layout(parser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor model parallel size (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline model parallel size (default 1)")


def add_first_stage(parser) -> None:
    parser.add_argument("--decoder-first-pipeline-num-layers", type=int, metavar="N",
                        help="decoder layers on the first (vision) pipeline stage, as in training (default: "
                             "--pp divides the layers evenly)")


def add_tolerances(parser) -> None:
    parser.add_argument(
        "--atol", type=float, default=1e-3,
        help="largest allowed |logit difference| (default 1e-3; tiny models agree to ~1e-6, "
             "deep fp32 models accumulate ~1e-4 from summation order)",
    )
    parser.add_argument(
        "--min-top1", type=float, default=0.99,
        help="smallest allowed fraction of positions with the same argmax (default 0.99)",
    )


def add_max_tokens_field(parser) -> None:
    parser.add_argument("--max-tokens-field", choices=["auto", "max_tokens", "max_completion_tokens"], default="auto",
                        help="how requests to the endpoints name the reply's token limit; auto: max_tokens, and "
                             "max_completion_tokens once a server refuses max_tokens (hosted reasoning models)")


def add_score_options(parser) -> None:
    parser.add_argument("--judge-endpoint", help="OpenAI-compatible base URL of the LLM judge of document-QA replies "
                                                 "(MMLongBench v1.1's metric; without it, rule-based scores only)")
    parser.add_argument("--judge-model", help="model name served by --judge-endpoint")
    parser.add_argument("--judge-api-key-env", metavar="VAR", help="environment variable holding the judge's API key")
    parser.add_argument("--judge-prompt-file", help="YAML replacing the project's judge prompts (same keys as "
                                                    "eval/mmlongbench/judge_prompts_v1.yaml)")
    parser.add_argument("--judge-concurrency", type=int, default=8, help="judge requests in flight")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--max-retries", type=int, default=5, help="retries on timeouts, 429 and 5xx")
    parser.add_argument("--max-failed", type=int, default=10,
                        help="samples (and judge requests) that may fail after their retries before the run stops; "
                             "they are named, the exit status is 1, and a rerun sends them again")
    add_max_tokens_field(parser)
    parser.add_argument("--train-length", type=int, help="the training window in tokens, dashed on scores.png")
    parser.add_argument("--compare", metavar="OTHER_DIR", help="overlay another run's scores on scores.png")
