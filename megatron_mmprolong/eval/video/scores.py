"""Scores of saved replies: accuracy x 100 per benchmark and per group (Video-MME short / medium /
long, LongVideoBench duration groups 15 / 60 / 600 / 3600 s, MLVU tasks), printed beside the
paper's table, written to scores.json and drawn in scores.png.

MLVU's M-avg is the official one, the unweighted mean of its 7 task accuracies; VLMEvalKit's
pooled figure (all questions together) is printed beside it. A reply the backend refused has no
score and is counted; a reply without a letter is wrong, as in the reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from megatron_mmprolong.eval.video.answers import extract_letter
from megatron_mmprolong.eval.video.data import BENCHMARKS, LVB_DURATION_GROUPS, MLVU_TASKS, TITLES, VIDEOMME_DURATIONS
from megatron_mmprolong.files import write_text_whole, written_whole

GROUPS = {"videomme": VIDEOMME_DURATIONS, "mlvu": MLVU_TASKS, "lvb": tuple(map(str, LVB_DURATION_GROUPS))}
# The paper's rows (accuracy x 100): Qwen2.5-VL-7B and MMProLong
PAPER = {"videomme": (65.10, 67.78), "mlvu": (70.20, 73.55), "lvb": (60.43, 62.08)}


def _accuracy(entries: list[dict]) -> float | None:
    return 100 * sum(e["correct"] for e in entries) / len(entries) if entries else None


def score_entries(entries: list[dict], judged: dict[str, str] | None = None) -> dict[str, Any]:
    """Per benchmark: samples, scored, refused, accuracy, its groups and the primary score.
    `judged`: the judge's letter for replies the rule cannot read (by prediction key)."""
    judged = judged or {}
    report: dict[str, Any] = {"benchmarks": {}}
    for entry in entries:
        letter = extract_letter(entry["reply"]["text"], entry["options"]) or judged.get(entry.get("key"), "")
        entry["correct"] = not entry["reply"].get("error") and letter == entry["answer"]
    for name in BENCHMARKS:
        mine = [e for e in entries if e["benchmark"] == name]
        if not mine:
            continue
        scored = [e for e in mine if not e["reply"].get("error")]
        groups = {g: _accuracy([e for e in scored if e["group"] == g]) for g in GROUPS[name]}
        pooled = _accuracy(scored)
        cell = {"samples": len(mine), "scored": len(scored), "refused": len(mine) - len(scored),
                "truncated": sum(e["reply"].get("finish_reason") == "length" for e in mine),
                "judged": sum(e.get("key") in judged for e in mine),
                "accuracy": pooled, "groups": groups, "score": pooled}
        if name == "mlvu":
            present = [v for v in groups.values() if v is not None]
            cell["m_avg"] = sum(present) / len(present) if present else None  # official: mean of the tasks
            cell["m_avg_pooled"] = pooled  # VLMEvalKit's
            cell["score"] = cell["m_avg"]
        report["benchmarks"][name] = cell
    return report


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(report: dict[str, Any], model: str) -> str:
    lines = [f"{'benchmark':<16}{'Qwen2.5-VL-7B':>15}{'MMProLong':>11}{model[:24]:>26}   samples (scored)"]
    for name, cell in report["benchmarks"].items():
        base, ours = PAPER[name]
        lines.append(f"{TITLES[name]:<16}{base:>15.2f}{ours:>11.2f}{_figure(cell['score']):>26}   "
                     f"{cell['samples']} ({cell['scored']})")
    for name, cell in report["benchmarks"].items():
        groups = "  ".join(f"{g}: {_figure(v)}" for g, v in cell["groups"].items())
        lines.append(f"{TITLES[name]} by {'task' if name == 'mlvu' else 'duration'}: {groups}")
        if name == "mlvu":
            lines.append(f"MLVU M-avg {_figure(cell['m_avg'])} (mean of the tasks, official); pooled over questions "
                         f"{_figure(cell['m_avg_pooled'])} (VLMEvalKit)")
        if cell["refused"] or cell["truncated"]:
            lines.append(f"{TITLES[name]}: {cell['refused']} refused by the backend, {cell['truncated']} cut at the "
                         "length limit")
    return "\n".join(lines)


def scores_png(report: dict[str, Any], path: Path) -> None:
    """One panel per benchmark: a bar per group and the overall score, 0-100."""
    names = list(report["benchmarks"])
    panel_w, height, top, bottom = 360, 320, 40, 60
    image = Image.new("RGB", (max(1, len(names)) * panel_w, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for k, name in enumerate(names):
        cell = report["benchmarks"][name]
        bars = [*cell["groups"].items(), ("all", cell["score"])]
        left = k * panel_w + 30
        draw.text((left, 10), f"{TITLES[name]}: {_figure(cell['score'])}", fill="black", font=font)
        draw.line([(left, height - bottom), (left + panel_w - 50, height - bottom)], fill="black")
        width = (panel_w - 60) // len(bars)
        for i, (label, value) in enumerate(bars):
            x = left + i * width + 4
            if value is not None:
                y = height - bottom - int(value / 100 * (height - top - bottom))
                draw.rectangle([x, y, x + width - 8, height - bottom], fill="#4477aa" if label != "all" else "#cc6677")
            draw.text((x, height - bottom + 6 + 12 * (i % 2)), str(label)[:10], fill="black", font=font)
    with written_whole(path) as handle:
        image.save(handle, format="PNG")


def write_scores(report: dict[str, Any], out: Path, model: str) -> str:
    write_text_whole(out / "scores.json", json.dumps(report, indent=1) + "\n")
    scores_png(report, out / "scores.png")
    return format_table(report, model)
