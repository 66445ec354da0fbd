"""Needle retrieval over long multimodal documents (`mmprolong eval needle`).

A grid of context lengths x needle depths: for each cell, synthetic documents (`needle_docs`)
sized to the length in tokens, whose question asks for the fact on the page at that depth, every
other page a distractor with a fact of its own. With `haystack` records (the user's own
documents, page images or PDFs) each haystack is instead a run of their pages, in document
order from a random start, with one rendered needle page inserted at the depth. Lengths past the training window measure context
extension without further training, as in the paper. The documents go through the same dataset
builder as training data, so the prompts are exactly those a trained model knows.

Everything lands in one output folder and a rerun continues: the documents and the dataset are
reused, answers already in `answers.jsonl` are not asked again. Results: `needle.json` (score
per cell, per length, per depth) and `needle.png` (the heat map).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from megatron_mmprolong.data.build import BuildConfig, build_dataset
from megatron_mmprolong.data.chat import ChatTokenizer
from megatron_mmprolong.data.images import ImageError, ImageParams, vision_tokens
from megatron_mmprolong.data.pdf import PdfError
from megatron_mmprolong.data.synth import (NeedleGrid, SynthConfig, needle_docs, needle_page, needle_page_image,
                                           single_question)
from megatron_mmprolong.eval.dataset_qa import EvalError, QAResult, answer_resumably
from megatron_mmprolong.eval.documents import (PAGE_LABEL_TOKENS, PROMPT_TOKENS, PageTokens, page_images,
                                                pages_until, read_documents)
from megatron_mmprolong.eval.output_dir import prepared_store
from megatron_mmprolong.files import written_whole, write_text_whole


@dataclass(frozen=True)
class NeedleConfig:
    tokenizer: str
    lengths: tuple[int, ...] = (2048, 4096, 8192)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    per_cell: int = 2
    page_width: int = 224
    page_height: int = 336
    font_size: int = 9
    train_length: int | None = None  # marked on the heat map; longer contexts are extension
    seed: int = 0
    haystack: tuple[str, ...] = ()  # document records whose pages surround the needle
    dpi: int = 144  # rendering of PDF haystack records
    metric: str = "exact_match"  # of the grid and heat map: exact_match or f1
    model_family: str = "qwen2_5_vl"  # the evaluated model's: its image processor makes the pages

    def __post_init__(self):
        if not self.lengths or min(self.lengths) <= PROMPT_TOKENS:
            raise EvalError(f"lengths must be above {PROMPT_TOKENS} tokens, got {self.lengths}")
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths):
            raise EvalError(f"depths must lie in [0, 1], got {self.depths}")
        if self.per_cell < 1:
            raise EvalError(f"per_cell must be at least 1, got {self.per_cell}")
        if self.metric not in ("exact_match", "f1"):
            raise EvalError(f"metric must be exact_match or f1, got {self.metric!r}")

    def tokens_per_page(self) -> int:
        return vision_tokens(self.page_height, self.page_width, ImageParams.for_family(self.model_family)) + PAGE_LABEL_TOKENS

    def pages(self) -> tuple[int, ...]:
        pages = tuple(max(1, round((n - PROMPT_TOKENS) / self.tokens_per_page())) for n in self.lengths)
        if len(set(pages)) != len(pages):
            raise EvalError(f"lengths {self.lengths} give the same page counts {pages} at "
                              f"{self.tokens_per_page()} tokens per page; space them further apart")
        return pages


def prepare_needle(config: NeedleConfig, out: Path, progress: bool = True) -> None:
    """Write (or reuse) the haystack documents and their dataset."""
    records = out / "docs" / "records.jsonl"
    if not records.is_file():
        synth = SynthConfig(page_width=config.page_width, page_height=config.page_height,
                            font_size=config.font_size, seed=config.seed)
        if config.haystack:
            haystack_docs(config, out, synth)
        else:
            needle_docs(out / "docs", NeedleGrid(config.pages(), tuple(config.depths), config.per_cell), synth)
    prefix = out / "data" / "needle"
    if not Path(f"{prefix}.manifest.json").is_file():
        seq_length = 1024 * math.ceil(max(config.lengths) * 1.5 / 1024)
        build = BuildConfig(tokenizer=config.tokenizer, seq_length=seq_length, shard_size=8,
                            model_family=config.model_family, image=ImageParams.for_family(config.model_family))
        build_dataset([records], prefix, build, progress=progress)


def haystack_docs(config: NeedleConfig, out: Path, synth: SynthConfig) -> Path:
    """One record per cell and repeat: pages of the `haystack` documents up to the length, a
    needle page inserted at the depth. Each record depends only on the seed and its cell."""
    documents = read_documents(config.haystack)
    if not documents:
        raise EvalError(f"{', '.join(config.haystack)}: no document records for the haystack")
    try:
        pool = [page for document in documents for page in page_images(document, out / "pages", config.dpi)]
    except (PdfError, ImageError) as err:
        raise EvalError(str(err)) from None
    page_tokens, lines = PageTokens(ImageParams.for_family(config.model_family)), []
    (out / "docs").mkdir(parents=True, exist_ok=True)
    for length in config.lengths:
        for depth in config.depths:
            for repeat in range(config.per_cell):
                name = f"needle-n{length:07d}-d{depth:.3f}-{repeat}"
                rng = random.Random(f"{config.seed}/{name}")
                pages = pages_until(pool, rng.randrange(len(pool)), PROMPT_TOKENS + config.tokens_per_page(), length,
                                    page_tokens)
                position = needle_page(len(pages) + 1, depth)
                fact, image = needle_page_image(rng, position, synth)
                needle = out / "docs" / f"{name}.png"
                image.save(needle)
                pages.insert(position - 1, str(needle))
                lines.append(json.dumps({
                    "id": name, "pages": pages, "task": "extract-single", "question": single_question(fact),
                    "answer": fact.value, "evidence_pages": [position],
                    "meta": {"needle": {"pages": len(pages), "depth": depth, "length": length}}}) + "\n")
    records = out / "docs" / "records.jsonl"
    write_text_whole(records, "".join(lines))
    return records


def run_needle_eval(model, config: NeedleConfig, out_dir: str | Path, progress: bool = True, writer: bool = True,
                    barrier=lambda: None) -> dict:
    """Build (or reuse) the haystacks, answer what is not answered yet, write the report and the heat map.

    With a Megatron model every rank of its world calls this; only the `writer` writes, and
    `barrier` keeps the others from reading before the writer has prepared, or after it has
    started to append."""
    out = Path(out_dir)
    store = prepared_store(out, config, "needle_config.json", "needle",
                           lambda c, o: prepare_needle(c, o, progress), writer, barrier)
    records = (out / "docs" / "records.jsonl").read_text().splitlines()
    cells = {json.loads(line)["id"]: json.loads(line)["meta"]["needle"] for line in records}
    results = answer_resumably(model, store, ChatTokenizer(config.tokenizer), range(len(store)),
                               out / "answers.jsonl", "eval needle", progress, writer, barrier)
    report = needle_report(results, cells, config)
    if writer:
        write_text_whole(out / "needle.json", json.dumps(report, indent=1) + "\n")
        heat_map_png(report, out / "needle.png")
    return report


def needle_report(results: list[QAResult], cells: dict[str, dict], config: NeedleConfig) -> dict:
    """Exact match and F1 overall and per length; `metric` per (length, depth) cell (`grid`, the
    heat map's) and per depth. Lengths are the targets, `context_tokens` the measured mean prompt
    length of each."""
    pages = {} if config.haystack else dict(zip(config.pages(), config.lengths))
    by_cell: dict[tuple[int, float], list[QAResult]] = {}
    for r in results:
        cell = cells[r.id]
        length = cell["length"] if "length" in cell else pages[cell["pages"]]
        by_cell.setdefault((length, cell["depth"]), []).append(r)
    lengths, depths = list(config.lengths), list(config.depths)

    def mean(rs, metric=config.metric):
        return float(np.mean([float(r.correct if metric == "exact_match" else r.f1) for r in rs])) if rs else None

    def column(length):
        return [r for d in depths for r in by_cell.get((length, d), [])]

    return {
        "lengths": lengths,
        "depths": depths,
        "train_length": config.train_length,
        "metric": config.metric,
        "exact_match": mean(results, "exact_match"),
        "f1": mean(results, "f1"),
        "samples": len(results),
        "grid": [[mean(by_cell.get((n, d), [])) for n in lengths] for d in depths],  # rows: depths
        "by_length": {str(n): {"exact_match": mean(column(n), "exact_match"), "f1": mean(column(n), "f1"),
                               "samples": len(column(n)),
                               "context_tokens": float(np.mean([r.context_tokens for r in column(n)])) if column(n) else None}
                      for n in lengths},
        "by_depth": {str(d): mean([r for n in lengths for r in by_cell.get((n, d), [])]) for d in depths},
    }


def heat_map_png(report: dict, path: str | Path, cell: int = 64) -> Path:
    """Depth (rows, top: first page) x length (columns) coloured from red (0) to green (1); a
    dashed line after the last length within the training window."""
    lengths, depths, grid = report["lengths"], report["depths"], report["grid"]
    font = ImageFont.load_default(size=12)
    left, top, bottom = 64, 36, 40
    width, height = left + cell * len(lengths) + 16, top + cell * len(depths) + bottom
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    metric = report.get("metric", "exact_match")
    draw.text((left, 8), f"needle {metric.replace('_', ' ')}: {report[metric]:.0%} of {report['samples']}",
              fill="black", font=font)
    for row, depth in enumerate(depths):
        y = top + row * cell
        draw.text((6, y + cell // 2 - 6), f"{depth:.0%}", fill="black", font=font)
        for col, score in enumerate(grid[row]):
            x = left + col * cell
            color = (200, 200, 200) if score is None else (int(220 * (1 - score)), int(190 * score), 60)
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=color)
            draw.text((x + 14, y + cell // 2 - 6), "-" if score is None else f"{score:.0%}", fill="white", font=font)
    for col, length in enumerate(lengths):
        draw.text((left + col * cell + 8, top + cell * len(depths) + 6), _short(length), fill="black", font=font)
    inside = [n for n in lengths if report["train_length"] and n <= report["train_length"]]
    if inside and len(inside) < len(lengths):
        x = left + len(inside) * cell - 1
        for y in range(top - 4, top + cell * len(depths) + 4, 8):
            draw.line([x, y, x, y + 4], fill="black", width=2)
    draw.text((left, height - 16), "context length (tokens); rows: needle depth", fill="black", font=font)
    with written_whole(path) as partial:
        image.save(partial, format="PNG")
    return Path(path)


def _short(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)
