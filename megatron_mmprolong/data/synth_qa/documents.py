"""Which PDFs, and which pages of each, a synth-qa question is made from.

Inputs are PDF files, folders (searched recursively for *.pdf) and list files (one PDF path per
line, relative to the list). Exact duplicates are found by SHA-256 of the file; the first in
input order is kept. Each kept PDF is opened once: an unreadable, password-protected, too short
or too long one is filtered with its reason. For each question the seed, the file's hash and the
question's index decide (so parts of a Slurm array and reruns agree) the task, the run of
`document_pages` pages that becomes the training sample, and the segment of `segment_pages` pages
inside the run that the generator sees. Segments follow the document's sections: the PDF's outline
when it has one, else headings found in the text layer, else fixed windows.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from megatron_mmprolong.data.pdf import PdfError, open_pdf
from megatron_mmprolong.data.records import PAPER_TASKS
from megatron_mmprolong.errors import BadInput

QA_TASKS = PAPER_TASKS[:3]  # extract-single, extract-multi, reasoning


class SynthQAError(BadInput, ValueError):
    """Bad synth-qa settings or inputs, said in words."""


@dataclass(frozen=True)
class Section:
    title: str
    page: int  # first page, 1-based


@dataclass(frozen=True)
class PageRange:
    first: int  # 1-based, inclusive
    last: int

    @property
    def pages(self) -> list[int]:
        return list(range(self.first, self.last + 1))

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


@dataclass(frozen=True)
class DocumentSettings:
    """What decides the document side of every question (part of the journal keys)."""

    min_pages: int = 20
    max_pages: int = 200
    document_pages: tuple[int, int] = (32, 50)
    segment_pages: tuple[int, int] = (8, 15)
    questions_per_document: int = 3
    tasks: tuple[tuple[str, float], ...] = (("extract-single", 0.4), ("extract-multi", 0.4), ("reasoning", 0.2))
    seed: int = 0
    pdf_backend: str = "auto"

    def __post_init__(self):
        for name, (lo, hi) in (("document_pages", self.document_pages), ("segment_pages", self.segment_pages)):
            if not 1 <= lo <= hi:
                raise SynthQAError(f"--{name.replace('_', '-')} {lo} {hi}: need 1 <= MIN <= MAX")
        if self.segment_pages[0] > self.document_pages[1]:
            raise SynthQAError(f"--segment-pages {self.segment_pages[0]} is more than --document-pages "
                               f"{self.document_pages[1]}: a segment lies inside the document's run")
        if not 1 <= self.min_pages <= self.max_pages:
            raise SynthQAError(f"need 1 <= --min-pages <= --max-pages, got {self.min_pages} and {self.max_pages}")
        if self.questions_per_document < 1:
            raise SynthQAError("--questions-per-document must be at least 1")
        if not self.tasks or any(w < 0 for _, w in self.tasks) or sum(w for _, w in self.tasks) <= 0:
            raise SynthQAError(f"--tasks needs non-negative weights with a positive sum, got {dict(self.tasks)}")


@dataclass(frozen=True)
class QuestionPlan:
    pdf: str
    sha256: str
    index: int  # the question's number within its document
    task: str
    document_pages: int  # pages of the whole PDF
    run: PageRange  # the training sample's pages
    segment: PageRange  # the pages the generator sees
    segment_method: str  # "outline", "headings" or "fixed"
    sections: tuple[Section, ...]  # sections of the segment (the one it starts in first)

    @property
    def id(self) -> str:
        return f"{self.sha256[:16]}-q{self.index}"


@dataclass(frozen=True)
class Filtered:
    pdf: str
    reason: str  # unreadable, password-protected, too-short, too-long
    message: str


def parse_task_mix(text: str) -> tuple[tuple[str, float], ...]:
    """"extract-single=0.4,extract-multi=0.4,reasoning=0.2" -> ((task, weight), ...)."""
    mix = []
    for item in filter(None, (i.strip() for i in text.split(","))):
        task, _, weight = item.partition("=")
        if task not in QA_TASKS:
            raise SynthQAError(f"--tasks: unknown task {task!r} (choose from {', '.join(QA_TASKS)})")
        try:
            mix.append((task, float(weight)))
        except ValueError:
            raise SynthQAError(f"--tasks: {item!r} is not TASK=WEIGHT") from None
    return tuple(mix)


def list_pdfs(inputs: list[str | Path]) -> list[str]:
    """PDF paths, resolved, in input order (folders sorted)."""
    paths = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            paths += sorted(str(p.resolve()) for p in path.rglob("*") if p.suffix.lower() == ".pdf" and p.is_file())
        elif path.is_file() and path.suffix.lower() == ".pdf":
            paths.append(str(path.resolve()))
        elif path.is_file():
            try:
                lines = [line.strip() for line in path.read_text().splitlines()]
            except UnicodeDecodeError:
                raise SynthQAError(f"input {raw} is neither a PDF nor a text list of PDF paths") from None
            paths += [str((path.parent / line).resolve()) for line in lines if line and not line.startswith("#")]
        else:
            raise SynthQAError(f"input {raw} does not exist")
    if not paths:
        raise SynthQAError(f"no PDFs in {' '.join(map(str, inputs))}")
    return paths


def file_sha256(path: str) -> str | None:
    """SHA-256 of the file's bytes, or None when it cannot be read (filtered later, when opened)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def plan_document(path: str, sha256: str, settings: DocumentSettings) -> list[QuestionPlan] | Filtered:
    """Open the PDF once: its questions' plans, or why it is filtered."""
    try:
        doc = open_pdf(path, settings.pdf_backend)
    except PdfError as err:
        reason = "password-protected" if "password" in str(err) else "unreadable"
        return Filtered(path, reason, str(err))
    try:
        pages = doc.page_count
        if pages < settings.min_pages:
            return Filtered(path, "too-short", f"{pages} pages, fewer than --min-pages {settings.min_pages}")
        if pages > settings.max_pages:
            return Filtered(path, "too-long", f"{pages} pages, more than --max-pages {settings.max_pages}")
        draws = [_draw(settings, sha256, index, pages) for index in range(settings.questions_per_document)]
        outline = sorted({(page, title.strip()) for _, title, page in doc.outline() if title.strip() and page <= pages})
        if outline:
            sections, method = [Section(title, page) for page, title in outline], "outline"
        else:
            wanted = sorted({p for _, run, _ in draws for p in run.pages})
            sections, method = page_headings({p: _text(doc, p) for p in wanted}), "headings"
    finally:
        doc.close()
    plans = []
    for index, (task, run, rng) in enumerate(draws):
        segment, aligned = choose_segment(run, settings.segment_pages, [s.page for s in sections], pages, rng)
        plans.append(QuestionPlan(path, sha256, index, task, pages, run, segment, method if aligned else "fixed",
                                  segment_sections(sections, segment)))
    return plans


def _draw(settings: DocumentSettings, sha256: str, index: int, pages: int):
    """The question's task and run, and the generator that then picks its segment."""
    rng = random.Random(f"synth-qa:{settings.seed}:{sha256}:{index}")
    names, weights = zip(*settings.tasks)
    task = rng.choices(names, weights)[0]
    lo, hi = settings.document_pages
    length = rng.randint(lo, min(hi, pages)) if pages >= lo else pages  # shorter documents are used whole
    first = rng.randint(1, pages - length + 1)
    return task, PageRange(first, first + length - 1), rng


def _text(doc, page: int) -> str:
    try:
        return doc.text(page - 1)
    except Exception:  # a damaged text layer only costs the headings
        return ""


NUMBERED_HEADING = re.compile(r"^(?:\d{1,2}(?:\.\d{1,2}){0,3}\.?|[IVXLC]{1,6}\.)\s+[A-Z][^.]{1,60}$")  # 2.1 Methods
KEYWORD_HEADING = re.compile(r"^(?:chapter|section|part|appendix)\s+[\dIVXLC]{1,6}[A-Z]?[.:]?(?:\s[^.]{0,60})?$",
                             re.IGNORECASE)  # Chapter 3: Results
UPPERCASE_HEADING = re.compile(r"^[A-Z][A-Z&,:'\- ]{3,59}$")  # INTRODUCTION, MATERIALS AND METHODS
HEADINGS = (NUMBERED_HEADING, KEYWORD_HEADING, UPPERCASE_HEADING)


def page_headings(texts: dict[int, str], lines: int = 3) -> list[Section]:
    """Sections from the text layer: a numbered, keyword or upper-case heading among a page's
    first `lines` lines starts a section there. A line at the top of more than two pages is a
    running header, not a heading."""
    tops = {page: [line.strip() for line in text.replace("\r", "\n").split("\n") if line.strip()][:lines]
            for page, text in texts.items()}
    repeated = Counter(line for top in tops.values() for line in set(top))
    sections = []
    for page, top in sorted(tops.items()):
        title = next((line for line in top if repeated[line] <= 2 and any(h.match(line) for h in HEADINGS)), None)
        if title is not None:
            sections.append(Section(title, page))
    return sections


def choose_segment(run: PageRange, sizes: tuple[int, int], starts: list[int], last_page: int,
                   rng: random.Random) -> tuple[PageRange, bool]:
    """A segment of the run of `sizes` pages (fewer when the run is shorter) and whether it follows
    the sections (which start at pages `starts` of a `last_page`-page document): preferably whole
    sections (it starts where one starts and ends where the next begins or the document ends),
    else one that starts at a section, else a fixed window of the run."""
    lo, hi = min(sizes[0], len(run)), min(sizes[1], len(run))
    inside = sorted({p for p in starts if run.first <= p <= run.last})
    ends = {p - 1 for p in starts} | {last_page}
    whole = [(s, e) for s in inside for e in range(s + lo - 1, min(s + hi - 1, run.last) + 1) if e in ends]
    if whole:
        first, last = rng.choice(whole)
        return PageRange(first, last), True
    started = [s for s in inside if run.last - s + 1 >= lo]
    if started:
        first = rng.choice(started)
        return PageRange(first, first + rng.randint(lo, min(hi, run.last - first + 1)) - 1), True
    length = rng.randint(lo, hi)
    first = run.first + length * rng.randrange(len(run) // length)
    return PageRange(first, first + length - 1), False


def segment_sections(sections: list[Section], segment: PageRange, most: int = 12) -> tuple[Section, ...]:
    """The section the segment starts in, then those that start inside it (at most `most`)."""
    before = [s for s in sections if s.page < segment.first]
    inside = [s for s in sections if segment.first <= s.page <= segment.last]
    current = [before[-1]] if before and (not inside or inside[0].page > segment.first) else []
    return tuple(current + inside)[:most]
