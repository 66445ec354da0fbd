"""`mmprolong build-data`: records and PDFs -> the multimodal store (store.py).

Inputs are read and split into shards of `shard_size` records in input order; each shard is
built (in worker processes) into `PREFIX.build/shard-NNNNN/` and renamed into place when
complete, so a killed build resumes without redoing finished shards, and shard boundaries do
not depend on the number of workers: one worker or many, the merged output is byte-identical.
The final files are written under temporary names and the manifest comes last.

A build can be split over independent jobs (a Slurm array): `part=(i, n)` builds only the shards
whose index is i modulo n and stops before merging; a last run without `part` reuses every
finished shard and merges them into the same bytes a single run writes.

A finished shard's `done.json` records the fingerprint of its settings and records and the CRC-32
of each of its files: a kept shard is reused only when both still match, so a damaged one is built
again (and said so), never merged.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megatron_mmprolong.data.chat import DEFAULT_SYSTEM_PROMPT, ChatTokenizer, ImageSlot, encode_conversation, load_tokenizer
from megatron_mmprolong.data.images import ImageError, ImageParams, image_size, open_image, prepare_image, smart_resize, vision_tokens
from megatron_mmprolong.data.ocr import NoTextError, ocr_target, pdf_folder_records
from megatron_mmprolong.data.pdf import PdfError, open_pdf, resolve_backend
from megatron_mmprolong.data.records import (
    IMAGE_PLACEHOLDER,
    PAPER_TASKS,
    ChatRecord,
    DocumentRecord,
    RecordError,
    Source,
    read_jsonl,
)
from megatron_mmprolong.data import checksums
from megatron_mmprolong.data.sampling import default_bin_edges
from megatron_mmprolong.data.store import (
    FORMAT, FORMAT_VERSION, EncodedSample, StoreWriter, file_names, file_sha256, merge_stores,
)
from megatron_mmprolong.errors import BadInput, RunFailed
from megatron_mmprolong.files import write_text_whole

OVERFLOW_POLICIES = ("skip", "drop-far-pages")


class TooLongError(RecordError):
    pass


class BuildError(BadInput, RuntimeError):
    pass


class NoSamplesError(RunFailed, BuildError):
    """Every input was rejected: there is no dataset to write."""


REJECT_KINDS = ((TooLongError, "too-long"), (NoTextError, "no-text"), (RecordError, "bad-record"),
                (PdfError, "bad-pdf"), (ImageError, "bad-image"))


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the bytes of the output (worker count does not)."""

    tokenizer: str
    seq_length: int = 131072
    dpi: int = 144
    model_family: str = "qwen2_5_vl"  # whose processor `image` is (config/: a VLConfig family)
    image: ImageParams = field(default_factory=ImageParams)
    pdf_backend: str = "auto"
    overflow: str = "skip"
    page_label: str = "Page {n}:"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    tasks: tuple[str, ...] = (*PAPER_TASKS, "chat")
    bin_edges: tuple[int, ...] = ()  # default: 0 and powers of two from 1024 up to seq_length
    seed: int = 0
    shard_size: int = 16

    def __post_init__(self):
        if self.overflow not in OVERFLOW_POLICIES:
            raise BuildError(f"overflow policy must be one of {OVERFLOW_POLICIES}, got {self.overflow!r}")
        for flag, value in (("--seq-length", self.seq_length), ("--shard-size", self.shard_size), ("--dpi", self.dpi)):
            if value < 1:
                raise BuildError(f"{flag} {value}: must be at least 1")
        if not self.bin_edges:
            object.__setattr__(self, "bin_edges", tuple(default_bin_edges(self.seq_length)))
        if list(self.bin_edges) != sorted(set(self.bin_edges)) or self.bin_edges[0] != 0:
            raise BuildError(f"length bin edges must increase from 0, got {self.bin_edges}")


@dataclass
class BuildReport:
    prefix: str
    samples: int
    rejects: int
    tokens: int
    pages: int
    seconds: float
    shards_reused: int
    merged: bool = True  # False for a `part` run: shards only, no dataset yet


def build_dataset(inputs: list[str | Path], output_prefix: str | Path, config: BuildConfig, *,
                  part: tuple[int, int] | None = None, **options) -> BuildReport:
    """Build under the prefix's lock (one writer per output; `output_lock.py`). A write the disk
    refuses is said in one line naming the path and the free space; the merge's staging copy is
    removed, the finished shards are kept for the rerun, and no manifest means no dataset."""
    from megatron_mmprolong.errors import output_error
    from megatron_mmprolong.output_lock import lock_prefix

    prefix = Path(output_prefix).resolve()
    with lock_prefix(prefix, part):
        try:
            return _build_dataset(inputs, output_prefix, config, part=part, **options)
        except Exception as err:
            refused = output_error(err, prefix, "dataset",
                                   f"no dataset was written; finished shards are kept in {prefix}.build/ "
                                   "for the same build-data to reuse once there is room")
            if refused is None:
                raise
            shutil.rmtree(Path(f"{prefix}.build") / "final", ignore_errors=True)
            Path(f"{prefix}.manifest.json.partial").unlink(missing_ok=True)
            raise refused from err


def _build_dataset(
    inputs: list[str | Path],
    output_prefix: str | Path,
    config: BuildConfig,
    *,
    ocr_task: str | None = None,
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    keep_shards: bool = False,
    progress: bool = True,
    part: tuple[int, int] | None = None,
) -> BuildReport:
    start = time.perf_counter()
    if part is not None and not 0 <= part[0] < part[1]:
        raise BuildError(f"part {part[0]} of {part[1]}: the index must be in [0, {part[1]})")
    prefix = str(Path(output_prefix).resolve())
    if Path(f"{prefix}.manifest.json").exists() and not overwrite:
        raise BuildError(f"{prefix}.manifest.json exists: a dataset is already there (pass --overwrite)")
    config = replace(config, tokenizer=str(Path(config.tokenizer).resolve()),
                     pdf_backend=_backend_name(config.pdf_backend))
    load_tokenizer(config.tokenizer)  # fail now, not in every worker
    items = _read_inputs(inputs, config, ocr_task)
    shards = [items[i:i + config.shard_size] for i in range(0, len(items), config.shard_size)]
    work_dir = Path(f"{prefix}.build")
    work_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    reused = 0
    mine = [i for i in range(len(shards)) if part is None or i % part[1] == part[0]]
    fingerprints = {index: _fingerprint(config, shards[index]) for index in mine}
    kept = _kept_shards({index: work_dir / f"shard-{index:05d}" for index in mine}, fingerprints, workers)
    for index in mine:
        shard = shards[index]
        directory = work_dir / f"shard-{index:05d}"
        if index in kept:
            reused += 1
        else:
            jobs.append((index, directory, fingerprints[index], [(str(s), r, i) for s, r, i in shard]))

    bar = tqdm(total=sum(len(shards[i]) for i in mine), unit="doc", desc="build-data", disable=not progress)
    bar.update(bar.total - sum(len(j[3]) for j in jobs))
    pages = tokens = 0
    for stats in _run(jobs, config, workers):
        pages += stats["pages"]
        tokens += stats["tokens"]
        bar.update(stats["items"])
        elapsed = max(bar.format_dict["elapsed"], 1e-9)
        bar.set_postfix_str(f"{pages / elapsed:.1f} pages/s, {tokens / elapsed:,.0f} tokens/s")
    bar.close()

    parts = [str(work_dir / f"shard-{i:05d}" / "part") for i in mine]
    rejects = sum(len(Path(f"{p}.rejects.jsonl").read_text().splitlines()) for p in parts)
    if part is not None:
        built = sum(len(shards[i]) for i in mine)
        return BuildReport(prefix, built - rejects, rejects, tokens, pages, time.perf_counter() - start, reused,
                           merged=False)
    if strict and rejects:
        raise BuildError(f"{rejects} inputs were rejected and --strict is set; see {work_dir}/shard-*/part.rejects.jsonl")
    if rejects == len(items):
        _all_rejected(parts, prefix, work_dir)
    report = _finalize(parts, prefix, config, inputs, ocr_task, work_dir)
    if not keep_shards:
        shutil.rmtree(work_dir)
    return BuildReport(prefix, report["counts"]["samples"], report["counts"]["rejects"],
                       report["counts"]["tokens"], pages, time.perf_counter() - start, reused)


def _all_rejected(parts: list[str], prefix: str, work_dir: Path) -> None:
    """Gather the reasons into PREFIX.rejects.jsonl (no dataset is written) and fail; the shards
    go, so that a rerun after fixing the inputs renders them again."""
    rejects = "".join(Path(f"{p}.rejects.jsonl").read_text() for p in parts)
    kinds = {}
    for line in rejects.splitlines():
        kind = json.loads(line)["kind"]
        kinds[kind] = kinds.get(kind, 0) + 1
    Path(f"{prefix}.rejects.jsonl").write_text(rejects)
    shutil.rmtree(work_dir)
    raise NoSamplesError(f"all {sum(kinds.values())} inputs were rejected ({', '.join(f'{k}: {n}' for k, n in kinds.items())}), "
                         f"no dataset written; the reason for each is in {prefix}.rejects.jsonl")


# ---- inputs ------------------------------------------------------------------------------------

def _read_inputs(inputs, config: BuildConfig, ocr_task: str | None) -> list[tuple[Source, object, int]]:
    items = []
    for path in map(Path, inputs):
        if path.is_dir():
            if ocr_task is None:
                raise BuildError(f"{path} is a folder: pass --task ocr-full or ocr-needle to build OCR samples from its PDFs")
            entries = pdf_folder_records(path, ocr_task)
        elif path.is_file():
            entries = list(read_jsonl(path, config.tasks))
        else:
            raise BuildError(f"input {path} does not exist")
        items += [(source, record, len(items) + k) for k, (source, record) in enumerate(entries)]
    if not items:
        raise BuildError(f"no input records in {', '.join(map(str, inputs))}")
    return items


def _backend_name(name: str) -> str:
    try:
        return resolve_backend(name)
    except PdfError:
        return name  # no renderer: only PDF inputs fail, each as a reject


def _fingerprint(config: BuildConfig, shard) -> str:
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True, default=str).encode())
    for source, record, index in shard:
        digest.update(f"{source}|{index}|{record!r}".encode())
    return digest.hexdigest()


def _shard_done(directory: Path, fingerprint: str) -> bool:
    """A finished shard of these settings and records whose files are as its build wrote them;
    a damaged one (or one kept by a build that recorded no content checksums) is said so."""
    done = directory / "done.json"
    try:
        entry = json.loads(done.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(entry, dict) or entry.get("fingerprint") != fingerprint:
        return False
    files = entry.get("files")
    if not isinstance(files, dict) or set(files) != set(_shard_files()):
        print(f"mmprolong build-data: {directory} was kept by a build that recorded no checksums of its files; "
              "building it again", file=sys.stderr, flush=True)
        return False
    for name, expected in files.items():
        path = directory / name
        if not path.is_file() or checksums.file_crc32(path) != expected:
            print(f"mmprolong build-data: {path} differs from the checksum recorded when the shard was built (the file "
                  "changed since); building it again", file=sys.stderr, flush=True)
            return False
    return True


def _shard_files() -> list[str]:
    return [path.name for path in file_names("part")]


def _kept_shards(directories: dict[int, Path], fingerprints: dict[int, str], workers: int) -> set[int]:
    """The shards to reuse; their files are read in `workers` threads (zlib's CRC releases the GIL)."""
    candidates = [i for i, d in directories.items() if (d / "done.json").is_file()]
    if not candidates:
        return set()
    with ThreadPoolExecutor(max(1, min(workers, len(candidates)))) as pool:
        done = pool.map(lambda i: _shard_done(directories[i], fingerprints[i]), candidates)
        return {i for i, ok in zip(candidates, done) if ok}


# ---- shards ------------------------------------------------------------------------------------

def _run(jobs, config: BuildConfig, workers: int):
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _build_shard(config, *job)
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(_build_shard_star, [(config, *job) for job in jobs])


def _build_shard_star(args):
    return _build_shard(*args)


def _build_shard(config: BuildConfig, index: int, directory: Path, fingerprint: str, items) -> dict:
    tokenizer = load_tokenizer(config.tokenizer)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    writer = StoreWriter(partial / "part", list(config.tasks), list(config.bin_edges))
    stats = {"items": len(items), "pages": 0, "tokens": 0}
    for source, record, position in items:
        if isinstance(record, Exception):
            writer.reject(source, None, _kind(record), str(record))
            continue
        try:
            sample = encode_record(record, config, tokenizer)
        except (RecordError, PdfError, ImageError) as err:
            writer.reject(source, record.id, _kind(err), str(err))
            continue
        writer.add(sample, position)
        stats["pages"] += len(sample.images)
        stats["tokens"] += len(sample.tokens)
    writer.close()
    files = {name: checksums.file_crc32(partial / name) for name in _shard_files()}
    (partial / "done.json").write_text(json.dumps({"fingerprint": fingerprint, "index": index, "files": files}))
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    return stats


def _kind(error: Exception) -> str:
    return next((kind for cls, kind in REJECT_KINDS if isinstance(error, cls)), "bad-record")


# ---- one record -> one sample ----------------------------------------------------------------

def encode_record(record, config: BuildConfig, tokenizer: ChatTokenizer) -> EncodedSample:
    if isinstance(record, ChatRecord):
        return _encode_chat(record, config, tokenizer)
    if record.pdf is not None:
        doc = open_pdf(record.pdf, config.pdf_backend)
        try:
            return _encode_document(record, config, tokenizer, _PdfPages(doc, record, config.dpi))
        finally:
            doc.close()
    return _encode_document(record, config, tokenizer, _ImagePages(record.pages))


class _PdfPages:
    def __init__(self, doc, record: DocumentRecord, dpi: int):
        self.doc, self.dpi, self.path = doc, dpi, record.pdf
        first, last = record.page_range or (1, doc.page_count)
        if last > doc.page_count:
            raise RecordError(f"page_range ends at {last} but {record.pdf} has {doc.page_count} pages")
        self.numbers = list(range(first, last + 1))

    def size(self, number: int) -> tuple[int, int]:
        width, height = self.doc.page_size(number - 1)
        return round(height * self.dpi / 72), round(width * self.dpi / 72)

    def image(self, number: int):
        try:
            return self.doc.render(number - 1, self.dpi)
        except Exception as err:  # renderer-specific failures on damaged pages
            raise PdfError(f"page {number} of {self.path} cannot be rendered ({err})") from None

    def text(self, number: int) -> str:
        try:
            return self.doc.text(number - 1)
        except Exception as err:
            raise PdfError(f"page {number} of {self.path} has an unreadable text layer ({err})") from None


class _ImagePages:
    def __init__(self, paths):
        self.paths = list(paths)
        self.numbers = list(range(1, len(self.paths) + 1))

    def size(self, number: int) -> tuple[int, int]:
        return image_size(self.paths[number - 1])

    def image(self, number: int):
        return open_image(self.paths[number - 1])


def _encode_document(record: DocumentRecord, config: BuildConfig, tokenizer, pages) -> EncodedSample:
    question, answer, evidence = record.question, record.answer, record.evidence_pages
    if record.meta.get("text_layer"):
        question, answer, evidence = ocr_target(record, pages.numbers, pages.text, config.seed)
    outside = [p for p in evidence if p not in pages.numbers]
    if outside:
        raise RecordError(f"evidence page {outside[0]} is outside the document's pages "
                          f"{pages.numbers[0]}-{pages.numbers[-1]}")

    def encode(kept, tokens_of):
        parts = []
        for number in kept:
            if config.page_label:
                parts.append(config.page_label.format(n=number))
            parts.append(ImageSlot(tokens_of[number]))
        parts.append(question)
        return encode_conversation(tokenizer, [("user", parts), ("assistant", [answer])], config.system_prompt)

    planned = {}
    for number in pages.numbers:
        height, width = smart_resize(*pages.size(number), config.image)
        planned[number] = vision_tokens(height, width, config.image)
    kept = _fit(pages.numbers, planned, evidence, config, lambda k: len(encode(k, planned)[0]), record)
    images, grids, actual = [], [], {}
    for number in kept:
        data, grid = prepare_image(pages.image(number), config.image)
        images.append(data)
        grids.append(grid)
        actual[number] = grid[1] * grid[2] // config.image.merge_size**2
    refit = _fit(kept, actual, evidence, config, lambda k: len(encode(k, actual)[0]), record)
    if refit != kept:  # rendered sizes came out larger than planned
        images = [images[kept.index(n)] for n in refit]
        grids = [grids[kept.index(n)] for n in refit]
    ids, spans = encode(refit, actual)
    return EncodedSample(record.id, record.task, ids, spans, images, grids,
                         sum(actual[n] for n in refit), len(pages.numbers) - len(refit))


def _fit(numbers, tokens_of, evidence, config: BuildConfig, length_of, record) -> list[int]:
    """The pages to keep under the overflow policy (all of them when the sample fits)."""
    kept = list(numbers)
    total = length_of(kept)
    if total <= config.seq_length:
        return kept
    if config.overflow == "skip":
        raise TooLongError(f"needs {total} tokens, more than --seq-length {config.seq_length}")
    if not evidence:
        raise TooLongError(f"needs {total} tokens and has no evidence_pages to choose pages to drop")
    distance = {n: min(abs(n - e) for e in evidence) for n in kept}
    droppable = sorted((n for n in kept if n not in evidence), key=lambda n: (-distance[n], -n))
    for number in droppable:
        kept.remove(number)
        total -= tokens_of[number]  # lower bound of the saving; confirmed by re-encoding below
        if total <= config.seq_length and length_of(kept) <= config.seq_length:
            return kept
    total = length_of(kept)
    if total > config.seq_length:
        raise TooLongError(f"needs {total} tokens with only its evidence pages, more than --seq-length {config.seq_length}")
    return kept


def _encode_chat(record: ChatRecord, config: BuildConfig, tokenizer) -> EncodedSample:
    images, grids, tokens = [], [], []
    for path in record.images:
        data, grid = prepare_image(open_image(path), config.image)
        images.append(data)
        grids.append(grid)
        tokens.append(grid[1] * grid[2] // config.image.merge_size**2)
    turns, next_image = [], iter(tokens)
    for role, content in record.messages:
        pieces = content.split(IMAGE_PLACEHOLDER)
        parts = [pieces[0]]
        for piece in pieces[1:]:
            parts += [ImageSlot(next(next_image)), piece]
        turns.append((role, [p for p in parts if p != ""]))
    ids, spans = encode_conversation(tokenizer, turns, config.system_prompt)
    if len(ids) > config.seq_length:
        raise TooLongError(f"needs {len(ids)} tokens, more than --seq-length {config.seq_length}")
    return EncodedSample(record.id, record.task, ids, spans, images, grids, sum(tokens))


# ---- final files ------------------------------------------------------------------------------

def _finalize(parts, prefix: str, config: BuildConfig, inputs, ocr_task, work_dir: Path) -> dict:
    staging = work_dir / "final"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    staged = staging / Path(prefix).name
    merge_stores(parts, staged)
    manifest = _manifest(staged, config, inputs, ocr_task)
    Path(f"{prefix}.manifest.json").unlink(missing_ok=True)  # an old dataset stops being "finished" first
    for path in file_names(staged):
        os.replace(path, f"{prefix}{path.name[len(staged.name):]}")
    write_text_whole(f"{prefix}.manifest.json", json.dumps(manifest, indent=1) + "\n")  # whole or absent: it says "finished"
    return manifest


def _manifest(staged: Path, config: BuildConfig, inputs, ocr_task) -> dict:
    samples = np.load(f"{staged}.samples.npy")
    rejects = [json.loads(line) for line in Path(f"{staged}.rejects.jsonl").read_text().splitlines()]
    tokens = int(samples["tokens"].sum())
    vision = int(samples["vision_tokens"].sum())
    per_task = {}
    for index, task in enumerate(config.tasks):
        chosen = samples[samples["task"] == index]
        if len(chosen):
            per_task[task] = {"samples": len(chosen), "tokens": int(chosen["tokens"].sum())}
    edges = list(config.bin_edges)
    per_bin = [
        {"lo": lo, "hi": hi, "samples": int((samples["length_bin"] == i).sum()),
         "tokens": int(samples["tokens"][samples["length_bin"] == i].sum())}
        for i, (lo, hi) in enumerate(zip(edges, edges[1:]))
    ]
    kinds = {}
    for reject in rejects:
        kinds[reject["kind"]] = kinds.get(reject["kind"], 0) + 1
    build_config = asdict(config)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": Path(str(staged)).name,
        "model_family": config.model_family,
        "tokenizer": load_tokenizer(config.tokenizer).identity(),
        "image": {**build_config.pop("image"), "dpi": config.dpi, "pdf_backend": config.pdf_backend},
        "chat": {"system_prompt": config.system_prompt, "page_label": config.page_label},
        "seq_length": config.seq_length,
        "tasks": list(config.tasks),
        "length_bins": edges,
        "counts": {
            "samples": len(samples), "rejects": len(rejects), "images": int(samples["num_images"].sum()),
            "tokens": tokens, "vision_tokens": vision, "text_tokens": tokens - vision,
            "loss_tokens": int(samples["loss_tokens"].sum()), "pages_dropped": int(samples["pages_dropped"].sum()),
        },
        "per_task": per_task,
        "per_length_bin": per_bin,
        "rejects": kinds,
        "build_args": {"inputs": [str(Path(p).resolve()) for p in inputs], "ocr_task": ocr_task, **build_config},
        "sizes": {path.name[len(staged.name) + 1:]: path.stat().st_size for path in file_names(staged)},
        "checksums": {path.name[len(staged.name) + 1:]: file_sha256(path) for path in file_names(staged)},
        # checked by every reader: these files whole on opening, each sequence as it is read
        "integrity": {"algorithm": checksums.ALGORITHM, "sequences": checksums.SEQUENCES_FILE,
                      "files": {name: checksums.file_crc32(f"{staged}.{name}") for name in checksums.OPEN_FILES}},
    }
    manifest[checksums.MANIFEST_KEY] = checksums.manifest_digest(manifest)  # last: of everything above
    return manifest
