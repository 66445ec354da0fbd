"""`mmprolong synth-docs | build-data | inspect-data | plan-data`: documents to an indexed
multimodal dataset, a look at it, and the training plan drawn from a mixture of them."""

from __future__ import annotations

import json
from pathlib import Path


def _synth_docs(args) -> int:
    from megatron_mmprolong.data.synth import SynthConfig, synth_docs

    config = SynthConfig(
        docs=args.docs, min_pages=args.min_pages, max_pages=args.max_pages, page_width=args.page_width,
        page_height=args.page_height, font_size=args.font_size, format=args.format, seed=args.seed,
    )
    print(json.dumps({"records": str(synth_docs(args.out, config))}))
    return 0


def _build_data(args) -> int:
    from megatron_mmprolong.config import VLConfig
    from megatron_mmprolong.data.build import BuildConfig, build_dataset
    from megatron_mmprolong.data.images import ImageParams
    from megatron_mmprolong.data.records import PAPER_TASKS

    extra = tuple(t for t in (args.extra_tasks or "").split(",") if t)
    model = VLConfig.from_preset_or_dir(args.model)
    config = BuildConfig(
        tokenizer=args.tokenizer, seq_length=args.seq_length, dpi=args.dpi, model_family=model.family,
        image=ImageParams.for_model(model.vision, args.min_pixels, args.max_pixels,
                                    format=args.image_format, jpeg_quality=args.jpeg_quality),
        pdf_backend=args.pdf_backend, overflow=args.overflow, page_label=args.page_label,
        system_prompt=args.system_prompt, tasks=(*PAPER_TASKS, "chat", *extra), seed=args.seed,
        shard_size=args.shard_size,
    )
    report = build_dataset(
        args.input, args.output_prefix, config, ocr_task=args.task, workers=args.workers,
        strict=args.strict, overwrite=args.overwrite, keep_shards=args.keep_shards,
        part=None if args.part is None else tuple(args.part),
    )
    print(json.dumps({k: v for k, v in vars(report).items()}, default=str))
    return 0


def _inspect_data(args) -> int:
    from megatron_mmprolong.data.chat import ChatTokenizer
    from megatron_mmprolong.data.inspect import decode_sample, length_histogram_png, summary
    from megatron_mmprolong.data.store import MultimodalStore, StoreError, verify_checksums

    if args.verify:
        print(f"checksums of {len(verify_checksums(args.prefix))} files match the manifest\n")
    store = MultimodalStore(args.prefix)
    wrong = [index for index in args.sample or () if not 0 <= index < len(store)]
    if wrong:
        raise StoreError(f"--sample {wrong[0]}: the dataset has {len(store)} samples (0 to {len(store) - 1})")
    if args.packing is not None and args.packing < 1:
        raise StoreError(f"--packing {args.packing}: give the sequence length to pack to, in tokens")
    print(summary(store))
    png = Path(args.histogram or f"{args.prefix}.lengths.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    print(f"\nlength histogram: {length_histogram_png(store, png)}")
    if args.packing:
        from megatron_mmprolong.data.inspect import packing_summary

        print("\n" + packing_summary(store, args.packing))
    if args.sample:
        tokenizer = ChatTokenizer(args.tokenizer or store.manifest["tokenizer"]["path"])
        for index in args.sample:
            print("\n" + decode_sample(store, index, tokenizer))
    return 0


def _plan_data(args) -> int:
    from megatron_mmprolong.data.packing import Alignment
    from megatron_mmprolong.data.plan import MixtureSpec, PlanConfig, make_plan

    alignment = Alignment(args.context_parallel_size, args.tensor_model_parallel_size,
                          args.sequence_parallel, args.fp8)
    config = PlanConfig(args.seq_length, args.global_batch_size, alignment, data_parallel=args.data_parallel_size)
    plan = make_plan(MixtureSpec.from_yaml(args.mixture), config)
    out = args.out or str(Path(args.mixture).with_suffix("")) + ".plan"
    plan.save(out)
    print(json.dumps({"plan": out, "digest": plan.digest(), **plan.summary}, indent=1))
    return 0



def add_synth_docs(verbs) -> None:
    """synth-docs: synthetic documents with exact-answer questions."""
    synth = verbs.add_parser("synth-docs", help="synthetic long documents with exact-answer questions")
    synth.add_argument("--out", required=True, help="output folder (pages and records.jsonl)")
    synth.add_argument("--docs", type=int, default=4)
    synth.add_argument("--min-pages", type=int, default=32)
    synth.add_argument("--max-pages", type=int, default=50)
    synth.add_argument("--page-width", type=int, default=1224, help="px (default: letter at 144 DPI)")
    synth.add_argument("--page-height", type=int, default=1584)
    synth.add_argument("--font-size", type=int, default=22)
    synth.add_argument("--format", choices=["png", "pdf"], default="png", help="page images, or PDFs (PyMuPDF)")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=_synth_docs)


def add_build_data(verbs) -> None:
    """build-data: records or PDF folders to a dataset."""
    build = verbs.add_parser("build-data", help="records (JSONL) or PDF folders -> indexed multimodal dataset")
    build.add_argument("--input", nargs="+", required=True, help="JSONL record files and/or PDF folders")
    build.add_argument("--output-prefix", required=True)
    build.add_argument("--tokenizer", required=True, help="HF tokenizer directory (Qwen2.5-VL special tokens)")
    build.add_argument("--seq-length", type=int, default=131072)
    build.add_argument("--task", choices=["ocr-full", "ocr-needle"], help="what to build from PDF folders")
    build.add_argument("--extra-tasks", help="comma-separated task labels accepted besides the paper's")
    build.add_argument("--dpi", type=int, default=144)
    build.add_argument("--model", default="7b", metavar="PRESET|HF_DIR",
                       help="the model the data is for, whose image processor it follows (patch size, pixel bounds, "
                            "normalisation): a preset (7b, qwen3vl-8b, ...) or a checkpoint directory; default 7b "
                            "(Qwen2.5-VL)")
    build.add_argument("--min-pixels", type=int, help="pixels per page at least (default: the model processor's)")
    build.add_argument("--max-pixels", type=int, help="pixels per page at most (default: the model processor's)")
    build.add_argument("--image-format", choices=["png", "jpeg"], default="png")
    build.add_argument("--jpeg-quality", type=int, default=95)
    build.add_argument("--pdf-backend", choices=["auto", "pymupdf", "pypdfium2"], default="auto")
    build.add_argument("--overflow", choices=["skip", "drop-far-pages"], default="skip",
                       help="documents longer than --seq-length: reject, or drop pages far from the evidence")
    build.add_argument("--page-label", default="Page {n}:", help="text before each page image ('' for none)")
    build.add_argument("--system-prompt", default="You are a helpful assistant.")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--shard-size", type=int, default=16, help="records per resumable shard")
    build.add_argument("--workers", type=int, default=1)
    build.add_argument("--strict", action="store_true", help="fail if any input is rejected")
    build.add_argument("--overwrite", action="store_true")
    build.add_argument("--keep-shards", action="store_true")
    build.add_argument("--part", type=int, nargs=2, metavar=("INDEX", "COUNT"),
                       help="build only shards INDEX mod COUNT and stop before merging (one Slurm array task); "
                            "a last run without --part merges")
    build.set_defaults(run=_build_data)


def add_plan_data(verbs) -> None:
    """plan-data: a mixture to a packed, step-ordered plan."""
    plan = verbs.add_parser("plan-data", help="mixture YAML -> sampled, packed, step-ordered training plan")
    plan.add_argument("mixture")
    plan.add_argument("--seq-length", type=int, required=True)
    plan.add_argument("--global-batch-size", "--global-batch", type=int, required=True,
                      help="packed sequences per step")
    plan.add_argument("--context-parallel-size", type=int, default=1)
    plan.add_argument("--tensor-model-parallel-size", type=int, default=1)
    plan.add_argument("--sequence-parallel", action="store_true")
    plan.add_argument("--fp8", action="store_true", help="pad for FP8: samples to a multiple of 16, each pack to 16 rows per CP x TP rank")
    plan.add_argument("--data-parallel-size", type=int, help="report the compute utilisation for this many ranks")
    plan.add_argument("--out", help="plan path prefix (default: next to the mixture file)")
    plan.set_defaults(run=_plan_data)


def add_inspect_data(verbs) -> None:
    """inspect-data: summary, histogram, decoded samples, --verify."""
    inspect_ = verbs.add_parser("inspect-data", help="summary, histograms and decoded samples of a dataset")
    inspect_.add_argument("prefix")
    inspect_.add_argument("--histogram", help="PNG path (default PREFIX.lengths.png)")
    inspect_.add_argument("--sample", type=int, action="append", help="print sample N decoded (repeatable)")
    inspect_.add_argument("--tokenizer", help="default: the one the dataset was built with")
    inspect_.add_argument("--packing", type=int, metavar="SEQ_LENGTH", help="report how the samples pack")
    inspect_.add_argument("--verify", action="store_true",
                          help="read every file whole and compare it with the build's checksums (file sizes "
                               "are checked whenever a dataset opens)")
    inspect_.set_defaults(run=_inspect_data)
