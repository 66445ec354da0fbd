"""`mmprolong synth-qa`: long-document VQA records written by a served (or in-process) VLM on
segments of real PDFs."""

from __future__ import annotations

import json

from megatron_mmprolong.cli.options import add_max_tokens_field


def _synth_qa(args) -> int:
    from megatron_mmprolong.data.images import ImageParams
    from megatron_mmprolong.data.synth_qa.documents import DocumentSettings, SynthQAError, parse_task_mix
    from megatron_mmprolong.data.synth_qa.pipeline import JournalOnly, SynthQAConfig, run_synth_qa
    from megatron_mmprolong.serving.endpoint import ChatEndpoint, EndpointConfig

    image = ImageParams(min_pixels=args.min_pixels, max_pixels=args.max_pixels, format=args.image_format)
    documents = DocumentSettings(args.min_pages, args.max_pages, tuple(args.document_pages), tuple(args.segment_pages),
                                 args.questions_per_document, parse_task_mix(args.tasks), args.seed, args.pdf_backend)
    config = SynthQAConfig(documents, args.dpi, image, args.prompt_file, args.max_tokens, args.temperature,
                           args.json_mode, args.max_answer_chars, args.verify, concurrency=args.concurrency,
                           workers=args.workers, part=None if args.part is None else tuple(args.part))
    if args.generator:
        from megatron_mmprolong.eval.hf_chat import TransformersChatBackend

        if not args.generator.startswith("hf:"):
            raise SynthQAError(f"--generator {args.generator!r}: expected hf:DIR (or --endpoint URL --model NAME)")
        generator = TransformersChatBackend(args.generator[3:], image.min_pixels, image.max_pixels)
    elif not args.model:
        raise SynthQAError("--endpoint and --offline need --model, the name the server serves")
    elif args.offline:
        generator = JournalOnly(args.model)
    else:
        generator = ChatEndpoint(EndpointConfig(args.endpoint, args.model, args.api_key_env, args.request_timeout,
                                                max_retries=args.max_retries, max_tokens_field=args.max_tokens_field),
                                 max_connections=args.concurrency)
        generator.check()  # unreachable, a wrong model or a refused key fail now, naming the URL
    summary = run_synth_qa(args.input, args.out, config, generator)
    print(json.dumps({k: summary[k] for k in ("documents", "requests", "accepted", "rejects", "tokens", "seconds")}))
    return 0



def add_synth_qa(verbs) -> None:
    """synth-qa and its generator, request and segment options."""
    synth_qa = verbs.add_parser("synth-qa", help="long-document VQA records from PDFs: a VLM (an OpenAI-compatible "
                                                 "server, or transformers in-process) writes QA on segments")
    synth_qa.add_argument("--input", nargs="+", required=True, help="PDF folders, PDF files and/or lists of PDF paths")
    synth_qa.add_argument("--out", required=True, help="output folder: records.jsonl, rejects.jsonl, summary.json, "
                                                       "answers.jsonl (the journal a rerun resumes from)")
    generator = synth_qa.add_mutually_exclusive_group(required=True)
    generator.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://gpu-node:8000/v1")
    generator.add_argument("--generator", metavar="hf:DIR", help="a transformers Qwen2.5-VL checkpoint in this process")
    generator.add_argument("--offline", action="store_true",
                           help="send nothing: write the outputs from the answers journaled under --model (the merge "
                                "of --part runs)")
    synth_qa.add_argument("--model", help="model name served by --endpoint (journal keys carry it)")
    synth_qa.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key")
    synth_qa.add_argument("--dpi", type=int, default=144)
    synth_qa.add_argument("--min-pixels", type=int, default=56 * 56)
    synth_qa.add_argument("--max-pixels", type=int, default=28 * 28 * 16384, help="cap per page (28*28 px per token)")
    synth_qa.add_argument("--image-format", choices=["png", "jpeg"], default="png",
                          help="how pages travel (jpeg: smaller requests)")
    synth_qa.add_argument("--pdf-backend", choices=["auto", "pymupdf", "pypdfium2"], default="auto")
    synth_qa.add_argument("--min-pages", type=int, default=20, help="shorter PDFs are filtered")
    synth_qa.add_argument("--max-pages", type=int, default=200, help="longer PDFs are filtered")
    synth_qa.add_argument("--document-pages", type=int, nargs=2, default=[32, 50], metavar=("MIN", "MAX"),
                          help="pages of the run each record keeps (shorter documents are used whole)")
    synth_qa.add_argument("--segment-pages", type=int, nargs=2, default=[8, 15], metavar=("MIN", "MAX"),
                          help="pages of the run the generator sees")
    synth_qa.add_argument("--questions-per-document", type=int, default=3)
    synth_qa.add_argument("--tasks", default="extract-single=0.4,extract-multi=0.4,reasoning=0.2", help="task mix")
    synth_qa.add_argument("--seed", type=int, default=0, help="choice of runs, segments and tasks")
    synth_qa.add_argument("--prompt-file", help="YAML replacing the project's prompts (same keys as prompts_v1.yaml)")
    synth_qa.add_argument("--max-tokens", type=int, default=1024, help="per generated reply")
    synth_qa.add_argument("--temperature", type=float, default=0.7, help="sent with a per-request seed")
    synth_qa.add_argument("--json-mode", action="store_true", help="send response_format json_object")
    synth_qa.add_argument("--max-answer-chars", type=int, default=400, help="longer answers are rejected")
    synth_qa.add_argument("--verify", action="store_true",
                          help="ask each accepted question again from its evidence pages alone; keep it if the "
                               "answers agree")
    synth_qa.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    synth_qa.add_argument("--workers", type=int, default=4, help="processes rendering pages (0: this one)")
    synth_qa.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    synth_qa.add_argument("--max-retries", type=int, default=5, help="retries on timeouts, 429 and 5xx")
    add_max_tokens_field(synth_qa)
    synth_qa.add_argument("--part", type=int, nargs=2, metavar=("INDEX", "COUNT"),
                          help="only every COUNT-th PDF from the INDEX-th, into OUT/parts/ (one Slurm array task); "
                               "a last run without --part adopts the parts' answers and writes the whole outputs")
    synth_qa.set_defaults(run=_synth_qa)
