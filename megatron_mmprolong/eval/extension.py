"""Context extension as in the paper (`mmprolong eval extend`): each test document is padded left
and right with pages of the other, unrelated documents up to a target length (e.g. 256K or 512K,
past the training window), without further training, and its question is asked again.

Padding shifts the document's pages, so evidence pages and "page N" in the question are
renumbered. PDF records are rendered to page images once (under OUT/pages). The padded records
go through the training dataset builder, answers are kept in OUT/answers.jsonl (a rerun
continues) and the score per length lands in OUT/extension.json.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megatron_mmprolong.data.build import BuildConfig, build_dataset
from megatron_mmprolong.data.chat import ChatTokenizer, load_tokenizer
from megatron_mmprolong.data.images import ImageError, ImageParams
from megatron_mmprolong.data.pdf import PdfError
from megatron_mmprolong.data.records import DocumentRecord
from megatron_mmprolong.eval.dataset_qa import EvalError, QAResult, answer_resumably, score
from megatron_mmprolong.eval.documents import PROMPT_TOKENS, PageTokens, page_images, pages_until, read_documents
from megatron_mmprolong.eval.output_dir import prepared_store
from megatron_mmprolong.files import write_text_whole


@dataclass(frozen=True)
class ExtensionConfig:
    tokenizer: str
    records: tuple[str, ...]
    lengths: tuple[int, ...] = (262144, 524288)
    dpi: int = 144
    seed: int = 0
    model_family: str = "qwen2_5_vl"  # the evaluated model's: its image processor makes the pages


def renumber_pages(question: str, shift: int) -> str:
    """'page 3' / 'pages 3 and 7' / 'Page 3' -> the same with every number shifted."""
    def shift_numbers(match):
        return re.sub(r"\d+", lambda n: str(int(n.group()) + shift), match.group())

    return re.sub(r"\b[Pp]ages?\s+\d+(?:\s*(?:,|and|to|-)\s*\d+)*", shift_numbers, question)


def extended_records(documents: list[DocumentRecord], pages: list[list[str]], lengths, page_tokens,
                     seed: int = 0) -> list[dict]:
    """One record per document and target length: its pages between pages of the others, half
    of the padding on each side."""
    rng = random.Random(seed)
    records = []
    for i, (document, own) in enumerate(zip(documents, pages)):
        pool = [p for j, other in enumerate(pages) if j != i for p in other]
        rng.shuffle(pool)
        own_tokens = sum(page_tokens(p) for p in own)
        for length in lengths:
            padding = pages_until(pool, 0, PROMPT_TOKENS + own_tokens, length, page_tokens)
            left, right = padding[:len(padding) // 2], padding[len(padding) // 2:]
            records.append({
                "id": f"{document.id}@{length}", "task": document.task, "answer": document.answer,
                "question": renumber_pages(document.question, len(left)), "pages": left + own + right,
                "evidence_pages": [p + len(left) for p in document.evidence_pages],
                "meta": {"extension": {"source": document.id, "length": length, "pages_before": len(left),
                                       "pages_after": len(right)}},
            })
    return records


def check_inputs(config: ExtensionConfig) -> list[DocumentRecord]:
    """The documents to extend; errors in them or in the tokenizer before a model loads."""
    load_tokenizer(config.tokenizer)
    documents = read_documents(config.records)
    if len(documents) < 2:
        raise EvalError("--records: context extension needs at least two documents (the others pad each one)")
    return documents


def prepare_extension(config: ExtensionConfig, out: Path, progress: bool = True) -> None:
    """Write (or reuse) the padded records and their dataset."""
    prefix = out / "data" / "extended"
    if Path(f"{prefix}.manifest.json").is_file():
        return
    documents = check_inputs(config)
    image = ImageParams.for_family(config.model_family)
    try:
        pages = [page_images(d, out / "pages", config.dpi) for d in documents]
        records = extended_records(documents, pages, config.lengths, PageTokens(image), config.seed)
    except (PdfError, ImageError) as err:
        raise EvalError(str(err)) from None
    write_text_whole(out / "records.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    build_dataset([out / "records.jsonl"], prefix, BuildConfig(
        tokenizer=config.tokenizer, seq_length=1024 * math.ceil(max(config.lengths) * 1.5 / 1024), dpi=config.dpi,
        tasks=tuple(sorted({r["task"] for r in records})), shard_size=8, model_family=config.model_family,
        image=image), progress=progress)


def run_extension_eval(model, config: ExtensionConfig, out_dir: str | Path, progress: bool = True,
                       writer: bool = True, barrier=lambda: None) -> dict:
    """Prepare (writer only), answer what is not answered yet, write OUT/extension.json."""
    out = Path(out_dir)
    store = prepared_store(out, config, "extension_config.json", "extended",
                           lambda c, o: prepare_extension(c, o, progress), writer, barrier)
    lengths = {json.loads(line)["id"]: json.loads(line)["meta"]["extension"]["length"]
               for line in (out / "records.jsonl").read_text().splitlines()}
    results = answer_resumably(model, store, ChatTokenizer(config.tokenizer), range(len(store)),
                               out / "answers.jsonl", "eval extend", progress, writer, barrier)
    report = extension_report(results, lengths, config)
    if writer:
        write_text_whole(out / "extension.json", json.dumps(report, indent=1) + "\n")
    return report


def extension_report(results: list[QAResult], lengths: dict[str, int], config: ExtensionConfig) -> dict:
    by_length = {}
    for length in config.lengths:
        mine = [r for r in results if lengths[r.id] == length]
        by_length[str(length)] = {**score(mine), "context_tokens": float(np.mean([r.context_tokens for r in mine]))
                                  if mine else None}
    return {"config": asdict(config), **score(results), "by_length": by_length,
            "results": [asdict(r) for r in results]}
