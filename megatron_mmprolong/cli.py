"""`mmprolong <verb>`: the command-line entry point."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
import warnings


def _model_info(args) -> int:
    from megatron_mmprolong import runtime
    from megatron_mmprolong.config import VLConfig
    from megatron_mmprolong.model.builder import build_model, count_parameters

    config = VLConfig.preset(args.preset) if args.preset else VLConfig.from_hf_dir(args.hf_dir)
    runtime.initialize()
    counts = count_parameters(build_model(config, meta=True))
    t, v = config.text, config.vision
    report = {
        "source": args.preset or str(args.hf_dir),
        "family": config.display_name,
        "hf_architecture": config.hf_architecture,
        **counts,
        "language_config": {
            "layers": t.num_layers, "hidden_size": t.hidden_size, "heads": t.num_attention_heads,
            "kv_heads": t.num_key_value_heads, "head_dim": t.head_dim, "ffn": t.intermediate_size,
            "vocab": t.vocab_size, "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section),
            "mrope_interleaved": t.mrope_interleaved, "qkv_bias": t.qkv_bias, "qk_norm": t.qk_norm,
            "tied_embeddings": t.tie_word_embeddings,
        },
        "vision_config": {
            "blocks": v.depth, "hidden_size": v.hidden_size, "heads": v.num_heads,
            "ffn": v.intermediate_size, "gated_mlp": v.gated_mlp, "normalization": v.normalization,
            "patch_px": v.patch_size, "px_per_token": v.merged_token_px, "window_px": v.window_size,
            "full_attention_blocks": list(v.fullatt_block_indexes),
            "deepstack_blocks": list(v.deepstack_visual_indexes),
        },
    }
    print(json.dumps(report, indent=2))
    return 0


def _check_parity(args) -> int:
    import torch

    from megatron_mmprolong import runtime
    from megatron_mmprolong.config import VLConfig
    from megatron_mmprolong.convert.hf_loader import load_hf_weights
    from megatron_mmprolong.convert.parity import run_parity
    from megatron_mmprolong.convert.transformers_model import hf_model_class
    from megatron_mmprolong.model.builder import build_model

    config = VLConfig.from_hf_dir(args.hf_dir)
    runtime.initialize(seed=args.seed)
    model = build_model(config, backend="local")
    load_hf_weights(model, args.hf_dir)
    model.eval()
    reference = hf_model_class(config).from_pretrained(
        args.hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return _judge(run_parity(model, reference, config, seed=args.seed), args)


def _judge(report: dict, args) -> int:
    """Print a parity report with its verdict; the exit status says whether it passed."""
    report["atol"] = args.atol
    report["min_top1_agreement"] = args.min_top1
    report["passed"] = report["max_abs_logit_diff"] <= args.atol and report["top1_agreement"] >= args.min_top1
    print(json.dumps(report, indent=2))
    if not report["passed"]:
        cause = report.get("known_difference") or f"the logits differ beyond --atol {args.atol} / --min-top1 {args.min_top1}"
        print(f"mmprolong {args.verb}: failed: {cause}", file=sys.stderr)
    return 0 if report["passed"] else 1


def _parallel(args):
    from megatron_mmprolong.config import ParallelConfig

    return ParallelConfig(
        tensor_parallel=args.tp, pipeline_parallel=args.pp,
        vision_tensor_parallel=getattr(args, "vision_tp", None),
        decoder_first_pipeline_num_layers=getattr(args, "decoder_first_pipeline_num_layers", None),
    )


def _hf_to_mcore(args) -> int:
    from megatron_mmprolong.config import torch_dtype
    from megatron_mmprolong.convert.hf_to_mcore import hf_to_mcore

    report = hf_to_mcore(
        args.hf_dir, args.out, _parallel(args),
        dtype=None if args.dtype == "auto" else torch_dtype(args.dtype),
        overwrite=args.overwrite, workers=args.workers,
    )
    print(json.dumps(_summary(report)))
    return 0


def _mcore_to_hf(args) -> int:
    from megatron_mmprolong.config import torch_dtype
    from megatron_mmprolong.convert.checkpoint_info import resolve_checkpoint
    from megatron_mmprolong.convert.mcore_to_hf import mcore_to_hf

    report = mcore_to_hf(
        resolve_checkpoint(args.mcore_dir), args.out, hf_template=args.hf_template,
        dtype=None if args.dtype == "auto" else torch_dtype(args.dtype),
        overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
    )
    print(json.dumps(_summary(report)))
    return 0


def _summary(report) -> dict:
    return {
        "out": str(report.out_dir), "tensors": report.tensors, "gigabytes": round(report.bytes / 1e9, 3),
        "seconds": round(report.seconds, 2), "gb_per_s": round(report.bytes / 1e9 / max(report.seconds, 1e-9), 3),
    }


def _verify(args) -> int:
    import torch.distributed as dist

    from megatron_mmprolong.config import VLConfig
    from megatron_mmprolong.convert.checkpoint_info import checkpoint_config, resolve_checkpoint
    from megatron_mmprolong.convert.hf_checkpoint import HFCheckpoint
    from megatron_mmprolong.convert.verify import verify_checkpoint, verify_spawned
    from megatron_mmprolong.runtime import launch_env

    parallel = _parallel(args)
    args.mcore_dir = str(resolve_checkpoint(args.mcore_dir))
    # every rank would fail the same way: check the inputs and the layout before starting them
    checkpoint_config(args.mcore_dir, hf_template=args.hf_dir).validate_parallel(parallel)
    VLConfig.from_hf_dir(args.hf_dir)
    HFCheckpoint(args.hf_dir).close()
    if launch_env().launcher == "single" and args.tp * args.pp > 1:
        report = verify_spawned(args.hf_dir, args.mcore_dir, parallel, args.seed)
    else:
        report = verify_checkpoint(args.hf_dir, args.mcore_dir, parallel, args.seed)
        if dist.get_rank() != 0:
            passed = report["max_abs_logit_diff"] <= args.atol and report["top1_agreement"] >= args.min_top1
            return 0 if passed else 1
    return _judge(report, args)


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


def _load_hf_model(hf_dir: str, dtype: str):
    import torch

    from megatron_mmprolong.config import VLConfig, torch_dtype
    from megatron_mmprolong.convert.transformers_model import hf_model_class

    dtype = torch_dtype(dtype) if dtype != "auto" else torch.float32
    return hf_model_class(VLConfig.from_hf_dir(hf_dir)).from_pretrained(hf_dir, dtype=dtype).eval()


def _evaluated_config(args):
    """The config of the checkpoint --hf-dir or --mcore-dir names (read before any model loads)."""
    from megatron_mmprolong.config import VLConfig
    from megatron_mmprolong.convert.checkpoint_info import checkpoint_config, resolve_checkpoint

    return VLConfig.from_hf_dir(args.hf_dir) if args.hf_dir else checkpoint_config(resolve_checkpoint(args.mcore_dir))


def _eval_model(args):
    """(model, writes output, barrier): transformers for --hf-dir; this project's model at TP x CP
    x PP for --mcore-dir, on every rank of a torchrun world of that many ranks, rank 0 writing."""
    if args.hf_dir:
        return _load_hf_model(args.hf_dir, args.dtype), True, lambda: None
    import torch.distributed as dist

    from megatron_mmprolong.config import ConfigError, ParallelConfig
    from megatron_mmprolong.convert.checkpoint_info import resolve_checkpoint
    from megatron_mmprolong.eval.megatron_generate import MegatronGenerator
    from megatron_mmprolong.runtime import launch_env

    world, ranks = launch_env().world_size, args.tp * args.cp * args.pp
    if world != ranks:
        raise ConfigError(f"--tp {args.tp} x --cp {args.cp} x --pp {args.pp} needs {ranks} ranks, this run has "
                          f"{world}: torchrun --nproc-per-node {ranks} -m megatron_mmprolong.cli eval ...")
    parallel = ParallelConfig(tensor_parallel=args.tp, context_parallel=args.cp, pipeline_parallel=args.pp,
                              decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers)
    dtype = "bf16" if args.dtype == "auto" else args.dtype
    model = MegatronGenerator.from_checkpoint(resolve_checkpoint(args.mcore_dir), parallel, dtype)
    return model, dist.get_rank() == 0, dist.barrier


def _eval_qa(args) -> int:
    from megatron_mmprolong import runtime
    from megatron_mmprolong.data.chat import ChatTokenizer
    from megatron_mmprolong.data.store import MultimodalStore
    from megatron_mmprolong.eval.dataset_qa import answer_resumably, select_samples, write_results

    store = MultimodalStore(args.data)
    store.check_fits(_evaluated_config(args))
    tokenizer = ChatTokenizer(args.tokenizer or store.manifest["tokenizer"]["path"])
    indices = select_samples(store, args.tasks, args.limit)
    model, writer, barrier = _eval_model(args)
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
                          _evaluated_config(args).family)
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
    store.check_fits(_evaluated_config(args))
    indices = [i for i in range(len(store)) if int(store.samples[i]["tokens"]) >= args.min_tokens][:args.limit]
    if not indices:
        print(f"mmprolong eval: error: {args.data} has no samples of {args.min_tokens} tokens or more", file=sys.stderr)
        return 2
    model, writer, _ = _eval_model(args)
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
                             tuple(args.lengths), args.dpi, args.seed, _evaluated_config(args).family)
    check_inputs(config)
    return _eval_into_folder(args, run_extension_eval, config, "extension_config.json",
                             ("samples", "exact_match", "f1", "by_length"))


def _check_files(flag: str, paths) -> None:
    """Inputs read after the model loads are checked before it does."""
    from megatron_mmprolong.eval.dataset_qa import EvalError

    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise EvalError(f"{flag} {missing[0]}: no such file")


def _mmlongbench_judge(args):
    """The judge of document-QA replies, when --judge-endpoint names one (checked now)."""
    if not args.judge_endpoint:
        return None
    from megatron_mmprolong.eval.dataset_qa import EvalError
    from megatron_mmprolong.eval.mmlongbench.judge import load_judge_prompts
    from megatron_mmprolong.eval.mmlongbench.run import Judge
    from megatron_mmprolong.serving.endpoint import ChatEndpoint, EndpointConfig

    if not args.judge_model:
        raise EvalError("--judge-endpoint needs --judge-model, the name the judge's server serves")
    prompts = load_judge_prompts(args.judge_prompt_file)
    backend = ChatEndpoint(EndpointConfig(args.judge_endpoint, args.judge_model, args.judge_api_key_env,
                                          args.request_timeout, max_retries=args.max_retries,
                                          max_tokens_field=args.max_tokens_field),
                           max_connections=args.judge_concurrency)
    backend.check()
    return Judge(backend, prompts, args.judge_concurrency, args.max_failed)


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
    if args.endpoint and not args.model:
        print("mmprolong eval: error: --endpoint needs --model, the name the server serves", file=sys.stderr)
        return 2
    tokenizer = args.tokenizer or args.hf_dir
    if args.mcore_dir and not tokenizer:
        print("mmprolong eval: error: --mcore-dir needs --tokenizer (the checkpoint's tokenizer)",
              file=sys.stderr)
        return 2
    family = "qwen2_5_vl" if args.endpoint else _evaluated_config(args).family
    image = ImageParams.for_family(family, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    config = MMLongBenchConfig(source, args.page_labels, args.max_new_tokens, args.max_samples, args.seed,
                               image.min_pixels, image.max_pixels, family)
    root = DataRoot.open(args.data_root)
    work = pairs(datasets, args.lengths, tokenizer)
    config = recorded_form(args.out, config)  # the assistant turn's form an endpoint run recorded
    check_same_settings(Path(args.out) / SETTINGS, config, write=False)
    released(root, work, config)  # bad data fails before a model loads
    judge = _mmlongbench_judge(args)
    writer, barrier, concurrency = True, lambda: None, 1
    if args.endpoint:
        from megatron_mmprolong.serving.endpoint import ChatEndpoint, EndpointConfig

        backend = ChatEndpoint(EndpointConfig(args.endpoint, args.model, args.api_key_env, args.request_timeout,
                                              max_retries=args.max_retries, max_tokens_field=args.max_tokens_field),
                               max_connections=args.concurrency)
        backend.check()
        concurrency = args.concurrency
    elif args.hf_dir:
        from megatron_mmprolong.config import torch_dtype
        from megatron_mmprolong.eval.hf_chat import TransformersChatBackend

        backend = TransformersChatBackend(args.hf_dir, image.min_pixels, image.max_pixels,
                                          None if args.dtype == "auto" else torch_dtype(args.dtype))
    else:
        from megatron_mmprolong.data.chat import ChatTokenizer
        from megatron_mmprolong.eval.hf_chat import LocalChatBackend

        model, writer, barrier = _eval_model(args)
        backend = LocalChatBackend(model, ChatTokenizer(tokenizer), image, source, in_thread=False)
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


def _eval_into_folder(args, run, config, settings: str, keys) -> int:
    """needle and extend: the folder's settings checked before a model loads, `run` on every
    rank, rank 0 printing the report's `keys`."""
    from megatron_mmprolong import runtime
    from megatron_mmprolong.eval.output_dir import check_same_settings

    check_same_settings(Path(args.out) / settings, config, write=False)
    model, writer, barrier = _eval_model(args)
    report = run(model, config, args.out, writer=writer, barrier=barrier)
    if writer:
        print(json.dumps({"out": args.out, **{k: report[k] for k in keys}}, indent=1))
    if args.mcore_dir:
        runtime.shutdown()
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


def _plan_layouts(args) -> int:
    from megatron_mmprolong.config import VLConfig
    from megatron_mmprolong.training import planner

    config = VLConfig.from_hf_dir(args.hf_config) if args.hf_config else VLConfig.preset(args.preset)
    name = f"{config.display_name} from {args.hf_config}" if args.hf_config else f"{config.display_name} {args.preset}"
    workload = planner.Workload(
        seq_length=args.seq_length, global_batch=args.global_batch_size, micro_batch=args.micro_batch_size,
        sample_length=args.sample_length, image_fraction=args.image_fraction, page_grid=tuple(args.page_grid) if args.page_grid else None,
        params_bytes=2, fp8=args.fp8)
    cluster = planner.Cluster(args.nodes, args.gpus_per_node, args.gpu_memory)
    estimates = planner.plan(config, workload, cluster, tuple(args.recompute.split(",")),
                             distributed_optimizer=not args.no_distributed_optimizer)
    print(planner.format_report(name, estimates, workload, cluster, args.top))
    return 0 if any(e.fits for e in estimates) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmprolong", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs.add_parser("train", help="continued pretraining on Megatron-Core (mmprolong train --help)", add_help=False)

    info = verbs.add_parser(
        "model-info", help="parameter counts of a preset or HF config, built on the meta device"
    )
    source = info.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="3b, 7b, 32b, 72b (Qwen2.5-VL), qwen3vl-2b, qwen3vl-4b, qwen3vl-8b, "
                                         "qwen3vl-32b, or a tiny one (tiny, qwen3vl-tiny, ...)")
    source.add_argument("--hf-dir", help="directory with a Qwen2.5-VL or Qwen3-VL config.json")
    info.set_defaults(run=_model_info)

    parity = verbs.add_parser(
        "check-parity",
        help="compare logits with transformers on text + images + video, alone and packed (fp32, CPU)",
    )
    parity.add_argument("--hf-dir", required=True, help="Hugging Face Qwen2.5-VL or Qwen3-VL checkpoint directory")
    parity.add_argument("--seed", type=int, default=0, help="seed of the random sample (default 0)")
    _add_tolerances(parity)
    parity.set_defaults(run=_check_parity)

    convert = verbs.add_parser("convert", help="HF <-> Megatron-Core distributed checkpoints")
    directions = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    to_mcore = directions.add_parser("hf-to-mcore", help="HF safetensors -> torch_dist checkpoint (streaming)")
    to_mcore.add_argument("--hf-dir", required=True)
    to_mcore.add_argument("--out", required=True, help="output directory (refused if it exists)")
    _add_layout(to_mcore)
    to_mcore.add_argument("--vision-tp", type=int, default=None, help="vision tensor parallel size (default: --tp)")
    to_mcore.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                          help="stored dtype (default: the checkpoint's own)")
    to_mcore.add_argument("--workers", type=int, default=2, help="threads preparing tensors (default 2)")
    to_mcore.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    to_mcore.set_defaults(run=_hf_to_mcore)

    to_hf = directions.add_parser("mcore-to-hf", help="torch_dist checkpoint -> HF safetensors (streaming)")
    to_hf.add_argument("--mcore-dir", required=True,
                       help="a checkpoint, or a training --save directory (its latest checkpoint)")
    to_hf.add_argument("--out", required=True, help="output directory (refused if it exists)")
    to_hf.add_argument("--hf-template", default=None,
                       help="HF directory whose tokenizer/processor/generation files are copied")
    to_hf.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"])
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size (default 5)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    to_hf.set_defaults(run=_mcore_to_hf)

    verify = directions.add_parser(
        "verify", help="load the Megatron checkpoint at --tp/--pp and compare logits with the HF one"
    )
    verify.add_argument("--hf-dir", required=True)
    verify.add_argument("--mcore-dir", required=True,
                        help="a checkpoint, or a training --save directory (its latest checkpoint)")
    _add_layout(verify)
    _add_first_stage(verify)
    verify.add_argument("--seed", type=int, default=0)
    _add_tolerances(verify)
    verify.set_defaults(run=_verify)

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
    _add_max_tokens_field(synth_qa)
    synth_qa.add_argument("--part", type=int, nargs=2, metavar=("INDEX", "COUNT"),
                          help="only every COUNT-th PDF from the INDEX-th, into OUT/parts/ (one Slurm array task); "
                               "a last run without --part adopts the parts' answers and writes the whole outputs")
    synth_qa.set_defaults(run=_synth_qa)

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

    layouts = verbs.add_parser("plan", help="parallel layouts that fit a model and sequence length on a cluster: "
                                            "memory per GPU, step time, ready-to-paste arguments")
    source = layouts.add_mutually_exclusive_group()
    source.add_argument("--preset", default="7b", help="a model preset: 3b, 7b, 32b, 72b (Qwen2.5-VL), qwen3vl-2b, "
                                                       "qwen3vl-4b, qwen3vl-8b, qwen3vl-32b (Qwen3-VL); default 7b")
    source.add_argument("--hf-config", help="directory with a Qwen2.5-VL or Qwen3-VL config.json")
    layouts.add_argument("--seq-length", type=int, default=131072)
    layouts.add_argument("--global-batch-size", type=int, default=32, help="packed sequences per step")
    layouts.add_argument("--micro-batch-size", type=int, default=1)
    layouts.add_argument("--gpus-per-node", type=int, default=8)
    layouts.add_argument("--gpu-memory", type=float, default=80, help="GiB per GPU")
    layouts.add_argument("--nodes", type=int, default=1)
    layouts.add_argument("--fp8", action="store_true", help="FP8 GEMMs (Transformer Engine, H100)")
    layouts.add_argument("--recompute", default="none,selective,full",
                         help="activation recompute options to consider, comma-separated")
    layouts.add_argument("--no-distributed-optimizer", action="store_true")
    layouts.add_argument("--sample-length", type=int,
                         help="tokens per packed sample (default: one sample per sequence, the costliest attention)")
    layouts.add_argument("--image-fraction", type=float, default=0.9, help="share of image tokens")
    layouts.add_argument("--page-grid", type=int, nargs=3, metavar=("T", "H", "W"),
                         help="patches per page image (default: a Letter page at 144 DPI as the model's processor "
                              "sizes it: 1 88 114, ~2.5K tokens, for Qwen2.5-VL; 1 76 100, 1.9K tokens, for Qwen3-VL)")
    layouts.add_argument("--top", type=int, default=10, help="layouts to list")
    layouts.set_defaults(run=_plan_layouts)

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

    evaluate = verbs.add_parser("eval", help="evaluate a checkpoint")
    kinds = evaluate.add_subparsers(dest="kind", required=True, metavar="KIND")
    qa = kinds.add_parser("qa", help="answer a dataset's questions (greedy); exact match and F1")
    _add_eval_model(qa)
    qa.add_argument("--data", required=True, help="dataset prefix (mmprolong build-data)")
    qa.add_argument("--tasks", nargs="+", help="only samples of these tasks (default: all)")
    qa.add_argument("--limit", type=int, help="at most this many samples")
    qa.add_argument("--tokenizer", help="default: the one the dataset was built with")
    qa.add_argument("--out", help="results JSON (default: eval_qa.json in the checkpoint directory)")
    qa.set_defaults(run=_eval_qa)

    needle = kinds.add_parser("needle", help="needle retrieval grid (lengths x depths) on synthetic or your own "
                                             "documents, with a heat map; lengths past the training window test extension")
    _add_eval_model(needle)
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
    _add_eval_model(extend)
    extend.add_argument("--records", nargs="+", required=True, help="JSONL document records (pages or pdf) with answers")
    extend.add_argument("--tokenizer", required=True, help="Qwen2.5-VL tokenizer directory")
    extend.add_argument("--lengths", type=int, nargs="+", default=[262144, 524288], help="target lengths in tokens")
    extend.add_argument("--out", required=True, help="output folder; a rerun continues what is there")
    extend.add_argument("--dpi", type=int, default=144, help="PDF rendering resolution")
    extend.add_argument("--seed", type=int, default=0, help="order of the padding pages")
    extend.set_defaults(run=_eval_extend)

    by_position = kinds.add_parser("position-loss", help="loss and next-token accuracy by position bucket over a "
                                                         "dataset's long samples (JSON and a line plot)")
    _add_eval_model(by_position)
    by_position.add_argument("--data", required=True, help="dataset prefix of held-out long samples")
    by_position.add_argument("--out", required=True, help="output folder (position_loss.json, position_loss.png)")
    by_position.add_argument("--bucket-size", type=int, default=4096, help="positions per bucket (default 4096)")
    by_position.add_argument("--min-tokens", type=int, default=0, help="only samples at least this long")
    by_position.add_argument("--limit", type=int, help="at most this many samples")
    by_position.set_defaults(run=_eval_position_loss)

    bench = kinds.add_parser("mmlongbench", help="MMLongBench document QA (MMLongBench-Doc, LongDocURL, SlideVQA) and "
                                                 "MM-NIAH as the paper reports them, 8K-128K from the released files "
                                                 "and 256K/512K built from the 128K ones; on transformers, a Megatron "
                                                 "checkpoint or an OpenAI-compatible server (vLLM)")
    _add_eval_model(bench, endpoint=True)
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
    bench.add_argument("--model", help="model name served by --endpoint")
    bench.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the endpoint's API key")
    bench.add_argument("--concurrency", type=int, default=4, help="requests in flight to --endpoint")
    _add_score_options(bench)
    bench.set_defaults(run=_eval_mmlongbench)

    rescore = kinds.add_parser("score", help="rescore saved eval mmlongbench replies (rule-based, and the LLM judge "
                                             "with --judge-endpoint) without running the model")
    rescore.add_argument("--predictions", required=True, help="predictions.jsonl of an eval mmlongbench folder")
    rescore.add_argument("--out", help="folder for scores.json, scores.png, judge.jsonl (default: the predictions')")
    _add_score_options(rescore)
    rescore.set_defaults(run=_eval_score)
    return parser


def _add_score_options(parser) -> None:
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
    _add_max_tokens_field(parser)
    parser.add_argument("--train-length", type=int, help="the training window in tokens, dashed on scores.png")
    parser.add_argument("--compare", metavar="OTHER_DIR", help="overlay another run's scores on scores.png")


def _add_max_tokens_field(parser) -> None:
    parser.add_argument("--max-tokens-field", choices=["auto", "max_tokens", "max_completion_tokens"], default="auto",
                        help="how requests to the endpoints name the reply's token limit; auto: max_tokens, and "
                             "max_completion_tokens once a server refuses max_tokens (hosted reasoning models)")


def _add_eval_model(parser, endpoint: bool = False) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-dir", help="Hugging Face Qwen2.5-VL or Qwen3-VL checkpoint, run with transformers")
    source.add_argument("--mcore-dir", help="Megatron checkpoint or training --save directory, run with this "
                                            "project's model at --tp x --cp x --pp (torchrun with that many ranks)")
    if endpoint:
        source.add_argument("--endpoint", help="OpenAI-compatible base URL of a served model (vllm serve ...), "
                                               "e.g. http://gpu-node:8000/v1; with --model")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size with --mcore-dir")
    parser.add_argument("--cp", type=int, default=1, help="context parallel size with --mcore-dir (long inputs)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size with --mcore-dir")
    _add_first_stage(parser)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                        help="parameter dtype; auto: fp32 with --hf-dir (the transformers reference), bf16 with "
                             "--mcore-dir (Transformer Engine's fused attention needs it; fp32 is refused at CP > 1 "
                             "and for prompts whose unfused attention scores exceed 8 GiB)")


def _add_first_stage(parser) -> None:
    parser.add_argument("--decoder-first-pipeline-num-layers", type=int, metavar="N",
                        help="decoder layers on the first (vision) pipeline stage, as in training (default: "
                             "--pp divides the layers evenly)")


def _add_layout(parser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor model parallel size (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline model parallel size (default 1)")


def _add_tolerances(parser) -> None:
    parser.add_argument(
        "--atol", type=float, default=1e-3,
        help="largest allowed |logit difference| (default 1e-3; tiny models agree to ~1e-6, "
             "deep fp32 models accumulate ~1e-4 from summation order)",
    )
    parser.add_argument(
        "--min-top1", type=float, default=0.99,
        help="smallest allowed fraction of positions with the same argmax (default 0.99)",
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # Megatron-style arguments, parsed by the training module
        from megatron_mmprolong.train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    from megatron_mmprolong import errors

    try:
        return args.run(args)
    except errors.expected_errors() as err:
        return errors.report(f"mmprolong {args.verb}", err)


if __name__ == "__main__":
    sys.exit(main())
