"""Synthetic long documents with exact answers (`mmprolong synth-docs`), no model needed.

Every page carries a heading with its number, filler prose and one fact: an archive access code
or a shipment weight, about an entity named only on that page. Questions are page-anchored as in
MMProLong: `extract-single` (one fact, page named), `extract-multi` (codes from 2-3 pages),
`reasoning` (retrieve two weights, then add or compare). Pages are drawn with Pillow as PNG
files, or written as PDFs with PyMuPDF (`format="pdf"`), so both input paths get exercised.
`needle_docs` writes haystacks of chosen sizes with the asked-for page at chosen depths, for
`mmprolong eval needle`.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from megatron_mmprolong.errors import BadInput
from megatron_mmprolong.files import write_text_whole

COLORS = ("amber", "azure", "cobalt", "crimson", "ivory", "jade", "khaki", "lilac", "maroon", "ochre",
          "olive", "pearl", "rust", "saffron", "scarlet", "silver", "teal", "umber", "violet", "wheat")
ANIMALS = ("falcon", "heron", "otter", "lynx", "badger", "marten", "ibis", "gecko", "bison", "raven",
           "walrus", "tapir", "condor", "puffin", "jackal", "viper", "moose", "quail", "stoat", "yak")
WORDS = ("the", "report", "describes", "annual", "results", "of", "a", "regional", "office", "and", "its",
         "teams", "which", "reviewed", "several", "projects", "during", "period", "with", "careful", "notes",
         "on", "budget", "schedule", "risks", "quality", "staff", "training", "equipment", "logistics",
         "partners", "customers", "meetings", "were", "held", "to", "discuss", "plans", "for", "next",
         "quarter", "while", "maintenance", "continued", "as", "expected", "under", "standard", "procedures")


class SynthError(BadInput, ValueError):
    """Settings that cannot make the documents asked for."""


@dataclass(frozen=True)
class SynthConfig:
    docs: int = 4
    min_pages: int = 32
    max_pages: int = 50
    page_width: int = 1224  # US letter at 144 DPI
    page_height: int = 1584
    font_size: int = 22
    format: str = "png"  # "png" page images, or "pdf" (PyMuPDF)
    seed: int = 0

    def __post_init__(self):
        if not 4 <= self.min_pages <= self.max_pages:
            raise SynthError(f"--min-pages {self.min_pages} --max-pages {self.max_pages}: synthetic documents "
                             "need 4 <= min_pages <= max_pages (two facts of each kind)")
        if self.docs < 1:
            raise SynthError(f"--docs {self.docs}: write at least one document")
        if min(self.page_width, self.page_height, self.font_size) < 1:
            raise SynthError("--page-width, --page-height and --font-size must be positive")
        if self.format not in ("png", "pdf"):
            raise SynthError(f"format must be png or pdf, got {self.format!r}")


@dataclass(frozen=True)
class Fact:
    page: int  # 1-based
    kind: str  # "code" or "weight"
    entity: str
    value: str

    def sentence(self) -> str:
        if self.kind == "code":
            return f"The access code of the {self.entity} archive is {self.value}."
        return f"The {self.entity} shipment weighs {self.value} kg."


def synth_docs(out_dir: str | Path, config: SynthConfig = SynthConfig()) -> Path:
    """Write documents and `records.jsonl` (one record per task per document); returns its path."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SynthError(f"--out {out} is a file: give a folder (it receives the pages and records.jsonl)")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    lines = []
    for doc in range(config.docs):
        pages = rng.randint(config.min_pages, config.max_pages)
        facts = _facts(rng, pages)
        name = f"doc_{doc:04d}"
        document = _write_document(out, name, facts, config, rng)
        for task, question, answer, evidence in _questions(rng, facts):
            record = {"id": f"{name}-{task}", **document, "task": task, "question": question,
                      "answer": answer, "evidence_pages": evidence, "meta": {"synthetic": True, "doc": name}}
            lines.append(json.dumps(record))
    records = out / "records.jsonl"
    records.write_text("\n".join(lines) + "\n")
    (out / "synth_config.json").write_text(json.dumps(asdict(config), indent=1) + "\n")
    return records


def _facts(rng: random.Random, pages: int) -> list[Fact]:
    names = rng.sample([f"{c} {a}" for c in COLORS for a in ANIMALS], pages)
    facts = []
    for page, name in enumerate(names, start=1):
        entity = name.title()
        if page % 2:
            code = f"{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}-{rng.randint(1000, 9999)}"
            facts.append(Fact(page, "code", entity, code))
        else:
            facts.append(Fact(page, "weight", entity, str(rng.randint(100, 999))))
    return facts


def _questions(rng: random.Random, facts: list[Fact]):
    codes = [f for f in facts if f.kind == "code"]
    weights = [f for f in facts if f.kind == "weight"]
    single = rng.choice(codes)
    yield ("extract-single", single_question(single), single.value, [single.page])
    multi = sorted(rng.sample(codes, min(len(codes), rng.randint(2, 3))), key=lambda f: f.page)
    names = ", ".join(f.entity for f in multi[:-1]) + f" and {multi[-1].entity}"
    yield ("extract-multi",
           f"What are the access codes of the {names} archives? Answer in that order, separated by commas.",
           ", ".join(f.value for f in multi), [f.page for f in multi])
    a, b = sorted(rng.sample(weights, 2), key=lambda f: f.page)
    if rng.random() < 0.5:
        yield ("reasoning", f"What is the combined weight, in kg, of the {a.entity} and {b.entity} shipments?",
               str(int(a.value) + int(b.value)), [a.page, b.page])
    else:
        heavier = a if int(a.value) > int(b.value) else b
        yield ("reasoning", f"Which shipment is heavier, the {a.entity} or the {b.entity}?",
               heavier.entity, [a.page, b.page])


def single_question(fact: Fact) -> str:
    """The page-anchored question whose answer is `fact.value`."""
    if fact.kind == "code":
        return f"According to page {fact.page}, what is the access code of the {fact.entity} archive?"
    return f"According to page {fact.page}, how many kg does the {fact.entity} shipment weigh?"


@dataclass(frozen=True)
class NeedleGrid:
    """Haystack sizes (pages) x needle depths (0: first page, 1: last page), `per_cell` each."""

    pages: tuple[int, ...]
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    per_cell: int = 2

    def __post_init__(self):
        most = len(COLORS) * len(ANIMALS)
        if not self.pages or not all(1 <= p <= most for p in self.pages):
            raise ValueError(f"needle haystacks need 1 to {most} pages (one distinct entity per page), got {self.pages}")
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"needle depths must lie in [0, 1], got {self.depths}")
        if self.per_cell < 1:
            raise ValueError("per_cell must be at least 1")


def needle_page(pages: int, depth: float) -> int:
    return 1 + round(depth * (pages - 1))


def needle_docs(out_dir: str | Path, grid: NeedleGrid, config: SynthConfig = SynthConfig()) -> Path:
    """One document per grid cell and repeat, asking for the fact on the page at the cell's depth;
    every other page is a distractor with its own fact. Each document depends only on the seed and
    its cell, so a grid of some of the lengths holds the same documents. Writes `records.jsonl`;
    returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for pages in grid.pages:
        for depth in grid.depths:
            for repeat in range(grid.per_cell):
                name = f"needle-p{pages:04d}-d{depth:.3f}-{repeat}"
                rng = random.Random(f"{config.seed}/{name}")
                facts = _facts(rng, pages)
                needle = facts[needle_page(pages, depth) - 1]
                document = _write_document(out, name, facts, config, rng)
                lines.append(json.dumps({
                    "id": name, **document, "task": "extract-single", "question": single_question(needle),
                    "answer": needle.value, "evidence_pages": [needle.page],
                    "meta": {"synthetic": True, "needle": {"pages": pages, "depth": depth}}}))
    records = out / "records.jsonl"
    write_text_whole(records, "\n".join(lines) + "\n")
    return records


def _page_lines(fact: Fact, rng: random.Random, config: SynthConfig) -> list[str]:
    chars_per_line = max(20, int(config.page_width / (config.font_size * 0.55)) - 4)
    rows = max(4, (config.page_height - 3 * config.font_size) // int(config.font_size * 1.5) - 2)
    lines = [f"Section {fact.page}", ""]
    fact_row = rng.randint(2, max(2, rows - 1))
    while len(lines) < rows:
        if len(lines) == fact_row:
            lines.append(fact.sentence())
            continue
        words, line = [], ""
        while len(line) < chars_per_line - 12:
            words.append(rng.choice(WORDS))
            line = " ".join(words)
        lines.append(line.capitalize() + ".")
    lines.append(f"- {fact.page} -")
    return lines


def _write_document(out: Path, name: str, facts: list[Fact], config: SynthConfig, rng: random.Random) -> dict:
    page_lines = [_page_lines(f, rng, config) for f in facts]
    step = int(config.font_size * 1.5)
    if config.format == "pdf":
        import pymupdf

        scale = 72 / 144  # page size is given in pixels at 144 DPI
        doc = pymupdf.open()
        for lines in page_lines:
            page = doc.new_page(width=config.page_width * scale, height=config.page_height * scale)
            for row, text in enumerate(lines):
                page.insert_text((config.font_size * scale * 2, (config.font_size * 2 + row * step) * scale),
                                 text, fontsize=config.font_size * scale)
        path = out / f"{name}.pdf"
        doc.save(path, garbage=0, deflate=True, no_new_id=True)
        doc.close()
        return {"pdf": path.name}
    folder = out / name
    folder.mkdir(exist_ok=True)
    paths = []
    for number, lines in enumerate(page_lines, start=1):
        path = folder / f"page_{number:03d}.png"
        _render_page(lines, config).save(path)
        paths.append(str(path.relative_to(out)))
    return {"pages": paths}


def _render_page(lines: list[str], config: SynthConfig) -> Image.Image:
    image = Image.new("RGB", (config.page_width, config.page_height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=config.font_size)
    step = int(config.font_size * 1.5)
    for row, text in enumerate(lines):
        draw.text((config.font_size * 2, config.font_size * 2 + row * step), text, fill="black", font=font)
    return image


def needle_page_image(rng: random.Random, page: int, config: SynthConfig) -> tuple[Fact, Image.Image]:
    """A page stating one access code among filler text, to insert as page `page` of someone
    else's document; returns its fact and image."""
    fact = replace(_facts(rng, 1)[0], page=page)  # page 1 of _facts states a code
    return fact, _render_page(_page_lines(fact, rng, config), config)
