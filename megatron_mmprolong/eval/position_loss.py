"""Loss and next-token accuracy by position over long held-out sequences
(`mmprolong eval position-loss`): does the model use the far context?

Each sample of a dataset runs through the model once (transformers, or this project's model on a
Megatron checkpoint at TP x CP x PP); every text token after the first is
scored against the model's prediction from everything before it (image placeholders and vision
markers are not predicted), and the per-token results are summed into buckets of
`bucket_size` positions. A model that uses long context keeps its loss falling with position;
one that does not flattens out, or rises past its training window.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from megatron_mmprolong.convert.parity import hf_token_types
from megatron_mmprolong.data.pixels import decoder, sample_pixels
from megatron_mmprolong.data.store import MultimodalStore
from megatron_mmprolong.files import write_text_whole, written_whole


def hf_scorer(model, chunk: int = 4096):
    """Per-position (loss, correct) of a transformers model: `score(ids [1, n], pixels, grids)` ->
    float64 [n - 1] losses and bool [n - 1] hits, for predicting token p + 1 from tokens <= p. The
    output layer runs on `chunk` positions at a time: [128K, vocab] fp32 logits would be ~80 GB."""
    dtype = next(model.parameters()).dtype

    @torch.no_grad()
    def score(ids, pixels, grids):
        inputs = {"input_ids": ids}
        if len(grids):
            inputs |= {"pixel_values": torch.from_numpy(pixels).to(dtype), "image_grid_thw": torch.tensor(grids),
                       **hf_token_types(model, ids)}
        hidden = model.model(**inputs, use_cache=False)[0][0, :-1]
        target = ids[0, 1:].to(hidden.device)
        losses, hits = [], []
        for start in range(0, len(target), chunk):
            logits = model.lm_head(hidden[start:start + chunk]).float()
            part = target[start:start + chunk]
            losses.append(torch.nn.functional.cross_entropy(logits, part, reduction="none").double().cpu())
            hits.append((logits.argmax(-1) == part).cpu())
        return torch.cat(losses), torch.cat(hits)

    return score


def position_loss(score, store: MultimodalStore, indices, bucket_size: int, progress=None) -> dict:
    """`score`: `hf_scorer(model)` or a MegatronGenerator's `token_scores`."""
    special = store.manifest["tokenizer"]["special_tokens"]
    not_predicted = torch.tensor([special["image_pad"], special["vision_start"], special["vision_end"],
                                  special.get("video_pad", special["image_pad"])])
    decode = decoder("pil")
    buckets = -(-max(int(store.samples[i]["tokens"]) for i in indices) // bucket_size)
    loss_sum, correct, count = (torch.zeros(buckets, dtype=torch.float64) for _ in range(3))
    for index in indices:
        ids = torch.from_numpy(np.asarray(store.tokens[index], dtype=np.int64))[None]
        pixels, grids = sample_pixels(store, index, decode)
        losses, hits = score(ids, pixels, grids)
        scored = ~torch.isin(ids[0, 1:], not_predicted)
        bucket = (torch.arange(1, ids.shape[1]) // bucket_size)[scored]  # position of the predicted token
        loss_sum += torch.bincount(bucket, losses[scored], minlength=buckets)
        correct += torch.bincount(bucket, hits[scored].double(), minlength=buckets)
        count += torch.bincount(bucket, minlength=buckets).double()
        if progress is not None:
            progress.update(1)
    return {
        "bucket_size": bucket_size,
        "samples": len(indices),
        "buckets": [{"start": b * bucket_size, "end": (b + 1) * bucket_size, "tokens": int(count[b]),
                     "loss": float(loss_sum[b] / count[b]) if count[b] else None,
                     "accuracy": float(correct[b] / count[b]) if count[b] else None} for b in range(buckets)],
    }


def line_plot_png(report: dict, path: str | Path, width: int = 720, height: int = 360) -> Path:
    """Loss by position bucket as a line plot."""
    points = [(b["start"], b["loss"]) for b in report["buckets"] if b["loss"] is not None]
    font = ImageFont.load_default(size=12)
    left, right, top, bottom = 56, 16, 28, 36
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), f"loss by position ({report['samples']} samples, buckets of {report['bucket_size']} tokens)",
              fill="black", font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    if points:
        x_max = max(report["buckets"][-1]["end"], 1)
        y_min, y_max = min(p[1] for p in points), max(p[1] for p in points)
        span = (y_max - y_min) or 1.0

        def xy(x, y):
            return (left + (width - left - right) * x / x_max,
                    height - bottom - (height - top - bottom) * (y - y_min) / span)

        draw.line([xy(*p) for p in points], fill=(30, 90, 200), width=2)
        for p in points:
            cx, cy = xy(*p)
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=(30, 90, 200))
        draw.text((4, top), f"{y_max:.2f}", fill="black", font=font)
        draw.text((4, height - bottom - 12), f"{y_min:.2f}", fill="black", font=font)
        draw.text((width - right - 60, height - bottom + 6), f"{x_max:,}", fill="black", font=font)
    draw.text((left, height - bottom + 6), "0", fill="black", font=font)
    with written_whole(path) as partial:
        image.save(partial, format="PNG")
    return Path(path)


def write_report(report: dict, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_whole(out / "position_loss.json", json.dumps(report, indent=1) + "\n")
    line_plot_png(report, out / "position_loss.png")
