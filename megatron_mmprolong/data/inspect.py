"""`mmprolong inspect-data PREFIX`: what a built dataset holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from megatron_mmprolong.data.store import MultimodalStore


def summary(store: MultimodalStore) -> str:
    m, samples, image = store.manifest, store.samples, store.image_params
    counts = m["counts"]
    lengths = np.asarray(samples["tokens"])
    lines = [
        f"dataset      {store.prefix}",
        f"model        {store.model_family}: {image.patch_size} px patches, {image.factor} px per token, "
        f"mean {list(image.mean)} std {list(image.std)}",
        f"tokenizer    {m['tokenizer']['path']} (vocab {m['tokenizer']['vocab_size']})",
        f"rendering    {m['image']['format']} at {m['image']['dpi']} dpi via {m['image']['pdf_backend']}, "
        f"{m['image']['min_pixels']}..{m['image']['max_pixels']} px",
        f"samples      {counts['samples']:,}   rejects {counts['rejects']:,} {m['rejects'] or ''}",
        f"tokens       {counts['tokens']:,} (vision {counts['vision_tokens']:,}, text {counts['text_tokens']:,}, "
        f"loss {counts['loss_tokens']:,})",
        f"images       {counts['images']:,}   pages dropped {counts['pages_dropped']:,}",
        f"checks       {_checks(m)}",
    ]
    if len(lengths):
        lines.append(f"length       min {lengths.min():,}  median {int(np.median(lengths)):,}  "
                     f"mean {int(lengths.mean()):,}  max {lengths.max():,}  (seq_length {m['seq_length']:,})")
    lines += ["", f"{'task':<18}{'samples':>10}{'tokens':>16}"]
    lines += [f"{task:<18}{v['samples']:>10,}{v['tokens']:>16,}" for task, v in m["per_task"].items()]
    lines += ["", f"{'length bin':<18}{'samples':>10}{'tokens':>16}"]
    lines += [f"{b['lo']:>7,}-{b['hi']:<10,}{b['samples']:>10,}{b['tokens']:>16,}" for b in m["per_length_bin"]]
    return "\n".join(lines)


def _checks(manifest: dict) -> str:
    integrity = manifest.get("integrity")
    if integrity is None:
        return (f"none as read (format {manifest['format_version']}, built before per-sample checksums): rebuild "
                "to have every sample checked; --verify checks the files whole")
    return (f"{integrity['algorithm']} of every sample and image, checked as they are read; the index files "
            f"on opening (format {manifest['format_version']}); --verify checks the files whole")


def packing_summary(store: MultimodalStore, seq_length: int, alignment=None) -> str:
    """How every sample once would pack at `seq_length`: ours (variable-length packs) against
    first-fit in stored order and padding each sample to seq_length."""
    from megatron_mmprolong.data.packing import Alignment, best_fit_decreasing, first_fit, packing_report

    alignment = alignment or Alignment()
    lengths = np.asarray(store.samples["tokens"], dtype=np.int64)
    fits = lengths <= seq_length
    lengths = lengths[fits]
    if not len(lengths):
        return f"packing at {seq_length:,}: no sample fits"
    report = packing_report(lengths, best_fit_decreasing(alignment.pad(lengths), alignment.capacity(seq_length)), seq_length, alignment)
    naive = len(first_fit(lengths, seq_length))
    return "\n".join([
        f"packing at {seq_length:,} tokens ({len(lengths):,} samples; {int((~fits).sum())} longer ones left out)",
        f"  ours (variable-length packs, multiple {alignment.multiple})  {report.efficiency:7.2%}  in {report.packs:,} packs",
        f"  same packs padded to seq_length          {report.fixed_bin_efficiency:7.2%}  (lower bound {report.lower_bound_packs:,} packs)",
        f"  first-fit in stored order, fixed length  {lengths.sum() / (naive * seq_length):7.2%}  in {naive:,} packs",
        f"  every sample padded to seq_length        {lengths.sum() / (len(lengths) * seq_length):7.2%}",
    ])


def length_histogram_png(store: MultimodalStore, path: str | Path, width: int = 900, height: int = 480) -> Path:
    """Bar chart of samples per length bin."""
    bins = store.manifest["per_length_bin"]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    left, bottom, top = 70, height - 70, 40
    draw.text((left, 10), f"{Path(store.prefix).name}: samples per length bin (tokens)", fill="black", font=font)
    peak = max([b["samples"] for b in bins] + [1])
    slot = (width - left - 20) / max(len(bins), 1)
    for i, b in enumerate(bins):
        x0 = left + i * slot + slot * 0.1
        bar = (bottom - top) * b["samples"] / peak
        draw.rectangle([x0, bottom - bar, x0 + slot * 0.8, bottom], fill=(70, 110, 180))
        draw.text((x0, bottom - bar - 16), str(b["samples"]), fill="black", font=font)
        label = f"<{b['hi'] // 1024}K" if b["hi"] >= 1024 else f"<{b['hi']}"
        draw.text((x0, bottom + 6), label, fill="black", font=font)
    draw.line([left, bottom, width - 20, bottom], fill="black")
    draw.text((10, top), f"{peak}", fill="black", font=font)
    path = Path(path)
    image.save(path)
    return path


def decode_sample(store: MultimodalStore, index: int, tokenizer) -> str:
    """The sample as text: image runs shown as markers, the loss tokens repeated at the end."""
    tokens = np.asarray(store.tokens[index])
    patch = store.image_params.patch_size
    grids = store.image_grids(index)
    pieces, run, image = [], [], 0
    i = 0
    while i < len(tokens):
        if tokens[i] == tokenizer.vision_start:
            end = i + 1
            while end < len(tokens) and tokens[end] != tokenizer.vision_end:
                end += 1
            pieces.append(tokenizer.decode(run))
            run = []
            t, h, w = grids[image]
            pieces.append(f"<image {image + 1}: {w * patch}x{h * patch} px, {end - i - 1} tokens>")
            image += 1
            i = end + 1
            continue
        run.append(int(tokens[i]))
        i += 1
    pieces.append(tokenizer.decode(run))
    mask = store.loss_mask(index)
    header = f"--- sample {index} ({store.ids[index]}, {store.task(index)}, {len(tokens)} tokens, {int(mask.sum())} with loss)"
    return "\n".join([header, "".join(pieces), "--- loss on: " + repr(tokenizer.decode(tokens[mask]))])
