"""Scores of saved replies: per dataset and length, the mean x 100 of the rule-based metric and,
for document QA, of the judge; "AVG" per length, the mean over the category's datasets; overall,
the mean of the 64K and 128K AVGs (and of 256K and 512K beyond the released lengths), as the
paper's tables report them. Printed as a table, plotted against length in scores.png.

A reply the server refused has no score; an empty reply is left out too, as the harness's API
runner leaves out empty outputs. Both are counted, as are replies cut at the length limit (those
are scored as they are).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from megatron_mmprolong.eval.dataset_qa import EvalError
from megatron_mmprolong.eval.mmlongbench.data import DOC_DATASETS, NIAH_DATASETS
from megatron_mmprolong.eval.mmlongbench.metrics import parsed_reply, rule_score
from megatron_mmprolong.files import write_text_whole, written_whole

CATEGORIES = {"docqa": ("MMLongBench document QA", DOC_DATASETS), "niah": ("MM-NIAH", NIAH_DATASETS)}
METRICS = ("judge", "rule")


def excluded(entry: dict[str, Any]) -> str | None:
    """Why a prediction has no score: "refused" (the backend answered with an error) or "empty"."""
    reply = entry["reply"]
    if reply.get("error"):
        return "refused"
    return "empty" if not parsed_reply(reply["text"]) else None


def _mean(values: list[float]) -> float | None:
    return 100 * sum(values) / len(values) if values else None


def _cell(entries: list[dict], verdicts: dict[str, float | None], judged: bool) -> dict[str, Any]:
    """One dataset at one length; with a judge, its mean over the replies it gave a verdict on
    and the number it refused (`judge_missing`)."""
    kept = [e for e in entries if excluded(e) is None]
    rules = [rule_score(e["dataset"], e["category"], e["reply"]["text"], e["answer"], e.get("answer_format"))
             for e in kept]
    verdicts_here = [verdicts[e["key"]] for e in kept if verdicts.get(e["key"]) is not None]
    return {"samples": len(entries), "scored": len(kept),
            "refused": sum(excluded(e) == "refused" for e in entries),
            "empty": sum(excluded(e) == "empty" for e in entries),
            "truncated": sum(e["reply"].get("finish_reason") == "length" for e in entries),
            "rule": _mean(rules), "judge": _mean(verdicts_here) if judged else None,
            "judge_missing": len(kept) - len(verdicts_here) if judged else 0}


def _average(values: list[float | None]) -> float | None:
    return sum(values) / len(values) if values and None not in values else None


def score_predictions(entries: list[dict], verdicts: dict[str, float | None] | None = None,
                      judge: dict | None = None) -> dict[str, Any]:
    """The report (scores.json) of prediction journal entries and the judge's verdicts by key."""
    verdicts = verdicts or {}
    report: dict[str, Any] = {"judge": judge, "categories": {}}
    for name, (title, datasets) in CATEGORIES.items():
        mine = [e for e in entries if e["category"] == name]
        if not mine:
            continue
        lengths = sorted({e["length"] for e in mine})
        judged = name == "docqa" and judge is not None
        table = {d: {str(n): _cell([e for e in mine if e["dataset"] == d and e["length"] == n], verdicts, judged)
                     for n in lengths if any(e["dataset"] == d and e["length"] == n for e in mine)}
                 for d in datasets if any(e["dataset"] == d for e in mine)}
        avg = {str(n): {m: _average([cells[str(n)][m] for cells in table.values() if str(n) in cells])
                        for m in METRICS} for n in lengths}
        spans = {"overall": ("64", "128"), "overall_beyond": ("256", "512")}
        report["categories"][name] = {
            "title": title, "lengths": lengths, "datasets": table, "avg": avg,
            **{key: {m: _average([avg[n][m] for n in pair]) if all(n in avg for n in pair) else None
                     for m in METRICS} for key, pair in spans.items()},
        }
    cells = [c for cat in report["categories"].values() for ds in cat["datasets"].values() for c in ds.values()]
    report["replies"] = {k: sum(c[k] for c in cells) for k in ("samples", "scored", "refused", "empty", "truncated")}
    return report


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(report: dict[str, Any]) -> str:
    """The paper's layout: datasets by length, AVG, overall; "judge / rule" where a judge scored."""
    blocks = []
    judge = report.get("judge")
    for name, cat in report["categories"].items():
        # a judge grades document QA; named even where it gave no verdict (those are counted below)
        judged = name == "docqa" and judge is not None
        metrics = METRICS if judged else ("rule",)
        width = 15 if judged else 7
        heading = ("LLM judge / rule-based" if judged else "rule-based" +
                   ("" if cat["title"].startswith("MM-NIAH") else "; no judge (--judge-endpoint)"))
        lines = [f"{cat['title']} ({heading})",
                 f"{'dataset':<16}" + "".join(f"{str(n) + 'K':>{width}}" for n in cat["lengths"])]

        def row(name, cells):
            values = [" / ".join(_figure(cells.get(str(n), {}).get(m)) for m in metrics) for n in cat["lengths"]]
            return f"{name:<16}" + "".join(f"{v:>{width}}" for v in values)

        lines += [row(d, cells) for d, cells in cat["datasets"].items()]
        lines.append(row("AVG", cat["avg"]))
        for key, label in (("overall", "overall (64K, 128K)"), ("overall_beyond", "overall (256K, 512K)")):
            if any(cat[key][m] is not None for m in metrics):
                lines.append(f"{label}: " + " / ".join(_figure(cat[key][m]) for m in metrics))
        blocks.append("\n".join(lines))
    counts = report["replies"]
    blocks.append(f"{counts['samples']} replies: {counts['scored']} scored, {counts['refused']} refused by the backend, "
                  f"{counts['empty']} empty, {counts['truncated']} cut at the length limit")
    doc = report["categories"].get("docqa")
    if judge is not None and doc is not None:
        cells = [c for ds in doc["datasets"].values() for c in ds.values()]
        missing, scored = sum(c["judge_missing"] for c in cells), sum(c["scored"] for c in cells)
        if missing:
            blocks[-1] += (f"\njudge {judge['model']}: {missing} of {scored} replies without a verdict (refused by the "
                           "judge, or failed after retries: a rerun asks again)")
    return "\n\n".join(blocks)


def primary(cells: dict[str, Any]) -> float | None:
    return cells["judge"] if cells.get("judge") is not None else cells.get("rule")


COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def scores_png(report: dict[str, Any], path: str | Path, train_length: int | None = None,
               compare: dict[str, Any] | None = None, compare_name: str = "other") -> Path:
    """Score (judge where there is one, else rule) against length, one line per dataset and a
    thick AVG line per category; the other run's lines dashed; a dashed line at the training length."""
    panels = list(report["categories"])
    font = ImageFont.load_default(size=12)
    panel_w, height, left, top, bottom = 420, 360, 48, 40, 110
    image = Image.new("RGB", (left + panel_w * len(panels) + 24, height), "white")
    draw = ImageDraw.Draw(image)
    for index, name in enumerate(panels):
        cat = report["categories"][name]
        other = (compare or {}).get("categories", {}).get(name)
        lengths = sorted(set(cat["lengths"]) | set(other["lengths"] if other else []))
        x0, x1, y0, y1 = left + index * panel_w, left + index * panel_w + panel_w - 40, top, height - bottom

        def x_of(k: float) -> float:
            span = math.log2(lengths[-1] / lengths[0]) or 1.0
            return x0 + (x1 - x0) * (math.log2(k / lengths[0]) / span if len(lengths) > 1 else 0.5)

        def y_of(score: float) -> float:
            return y1 - (y1 - y0) * score / 100

        draw.text((x0, 8), f"{cat['title']} (score x 100)", fill="black", font=font)
        draw.rectangle([x0, y0, x1, y1], outline="black")
        for tick in (0, 25, 50, 75, 100):
            draw.text((x0 - 26, y_of(tick) - 6), str(tick), fill="black", font=font)
        for k in lengths:
            draw.text((x_of(k) - 10, y1 + 4), f"{k}K", fill="black", font=font)
        if train_length:
            x = x_of(train_length / 1024) if lengths[0] <= train_length / 1024 <= lengths[-1] else None
            for y in range(int(y0), int(y1), 8) if x is not None else ():
                draw.line([x, y, x, y + 4], fill="gray", width=2)
        series = [(d, cells, COLORS[i % len(COLORS)], 2) for i, (d, cells) in enumerate(cat["datasets"].items())]
        series.append(("AVG", cat["avg"], (0, 0, 0), 4))
        for row, (label, cells, color, width) in enumerate(series):
            for run, dashed in ((cells, False), (_matching(other, label), True)):
                points = [(x_of(int(n)), y_of(v)) for n, c in sorted(run.items(), key=lambda kv: int(kv[0]))
                          if (v := primary(c)) is not None] if run else []
                _polyline(draw, points, color, width, dashed)
            draw.line([x0 + 4 + 140 * (row % 3), y1 + 30 + 16 * (row // 3) + 6,
                       x0 + 24 + 140 * (row % 3), y1 + 30 + 16 * (row // 3) + 6], fill=color, width=width)
            draw.text((x0 + 28 + 140 * (row % 3), y1 + 30 + 16 * (row // 3)), label, fill="black", font=font)
    notes = ["solid: this run"] + ([f"dashed: {compare_name}"] if compare else []) + \
            ([f"gray dashes: training length {train_length // 1024}K"] if train_length else [])
    draw.text((left, height - 18), "; ".join(notes), fill="black", font=font)
    with written_whole(path) as partial:
        image.save(partial, format="PNG")
    return Path(path)


def _matching(other: dict | None, label: str) -> dict | None:
    if other is None:
        return None
    return other["avg"] if label == "AVG" else other["datasets"].get(label)


def _polyline(draw, points, color, width, dashed: bool) -> None:
    segments = list(zip(points, points[1:]))
    for (ax, ay), (bx, by) in segments:
        if not dashed:
            draw.line([ax, ay, bx, by], fill=color, width=width)
            continue
        steps = max(1, int(math.hypot(bx - ax, by - ay) // 6))
        for s in range(0, steps, 2):
            f, g = s / steps, min(1.0, (s + 1) / steps)
            draw.line([ax + (bx - ax) * f, ay + (by - ay) * f, ax + (bx - ax) * g, ay + (by - ay) * g],
                      fill=color, width=width)
    for x, y in points:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline=color, fill="white" if dashed else color)


def write_scores(report: dict[str, Any], out: Path, train_length: int | None = None,
                 compare_dir: str | Path | None = None) -> str:
    """scores.json and scores.png in `out`; returns the table."""
    compare = None
    if compare_dir is not None:
        other = Path(compare_dir) / "scores.json"
        if not other.is_file():
            raise EvalError(f"--compare {compare_dir}: no scores.json there (a folder of eval mmlongbench)")
        compare = json.loads(other.read_text())
    out.mkdir(parents=True, exist_ok=True)
    write_text_whole(out / "scores.json", json.dumps(report, indent=1) + "\n")
    scores_png(report, out / "scores.png", train_length, compare, Path(compare_dir).name if compare_dir else "other")
    return format_table(report)
