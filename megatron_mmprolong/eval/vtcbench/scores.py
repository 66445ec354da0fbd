"""Scores of saved VTCBench-Wild replies: per split the mean x 100 of its metric (containsAll for
Retrieval and Reasoning, the judge's verdict for Memory), and Overall, the mean over every scored
sample of the three splits (weighted by samples, as the paper and VLMEvalKit pool them). Printed
as the paper's row, written to scores.json and plotted as bars in scores.png.

Every sample counts (the benchmark's N): a reply the backend refused (a context over the server's
limit) and an empty reply score 0, and are counted. Only a Memory reply the judge gave no verdict
(it refused, or failed after the retries: a rerun asks again) is left out, and counted. Beside our
figure the table shows VLMEvalKit's rule (Retrieval: any gold string, case-sensitive; Reasoning:
containsAll, case-sensitive) where it differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from megatron_mmprolong.eval.dataset_qa import EvalError
from megatron_mmprolong.eval.vtcbench.data import SPLITS
from megatron_mmprolong.eval.vtcbench.judge import VERDICTS, verdict
from megatron_mmprolong.eval.vtcbench.metrics import contains_all, vlmevalkit_score
from megatron_mmprolong.files import write_text_whole, written_whole

RULE_SPLITS = ("Retrieval", "Reasoning")


def _mean(values: list[float]) -> float | None:
    return 100 * sum(values) / len(values) if values else None


def sample_scores(entry: dict, judged: dict[str, str | None] | None) -> tuple[float | None, float | None]:
    """(our score, VLMEvalKit's rule score) of one prediction in [0, 1]; None where there is none
    (Memory without a judge or without a verdict; VLMEvalKit's rule for Memory)."""
    reply = entry["reply"]
    text = "" if reply.get("error") else reply["text"]
    if entry["split"] in RULE_SPLITS:
        return contains_all(text, entry["answers"]), vlmevalkit_score(entry["split"], text, entry["answers"])
    if reply.get("error"):
        return 0.0, None
    if judged is None or judged.get(entry["key"]) is None:
        return None, None
    return VERDICTS.get(verdict(judged[entry["key"]]) or "C", 0.0), None


def score_predictions(entries: list[dict], judged: dict[str, str | None] | None = None,
                      judge: dict | None = None) -> dict[str, Any]:
    """The report (scores.json) of prediction journal entries and the judge's replies by key."""
    report: dict[str, Any] = {"judge": judge, "splits": {}}
    pooled, pooled_vk = [], []
    for split in SPLITS:
        mine = [e for e in entries if e["split"] == split]
        if not mine:
            continue
        scores = [sample_scores(e, judged) for e in mine]
        ours = [s for s, _ in scores if s is not None]
        vk = [v for _, v in scores if v is not None]
        cell = {"samples": len(mine), "scored": len(ours),
                "refused": sum(bool(e["reply"].get("error")) for e in mine),
                "empty": sum(not e["reply"].get("error") and not e["reply"]["text"].strip() for e in mine),
                "truncated": sum(e["reply"].get("finish_reason") == "length" for e in mine),
                "metric": "containsAll" if split in RULE_SPLITS else "judge",
                "score": _mean(ours), "vlmevalkit": _mean(vk) if split in RULE_SPLITS else None}
        if split == "Memory":
            replies = [judged.get(e["key"]) for e in mine if not e["reply"].get("error")] if judged is not None else []
            cell |= {"judge_missing": len(mine) - len(ours) if judged is not None else None,
                     "verdicts": {v: sum(verdict(r) == v for r in replies if r is not None) for v in VERDICTS}
                     | {"unreadable": sum(r is not None and verdict(r) is None for r in replies)}}
        report["splits"][split] = cell
        pooled += ours
        pooled_vk += ours if split == "Memory" else vk
    scored = [s for s in SPLITS if report["splits"].get(s, {}).get("score") is not None]
    report["overall"] = {"score": _mean(pooled), "vlmevalkit": _mean(pooled_vk), "samples": len(pooled),
                         "splits": scored, "complete": scored == list(SPLITS)
                         and not report["splits"]["Memory"].get("judge_missing")}
    report["replies"] = {k: sum(c[k] for c in report["splits"].values())
                         for k in ("samples", "scored", "refused", "empty", "truncated")}
    return report


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(report: dict[str, Any]) -> str:
    judge = report.get("judge")
    lines = ["VTCBench-Wild (Retrieval, Reasoning: containsAll, lower-cased, <think> removed; Memory: "
             + (f"LLM judge {judge['model']})" if judge else "no judge, pass --judge-endpoint)"),
             f"{'split':<12}{'samples':>8}{'score':>9}{'VLMEvalKit rule':>17}"]
    for split, cell in report["splits"].items():
        other = cell["vlmevalkit"]
        shown = _figure(other) if other is not None and other != cell["score"] else ""
        lines.append(f"{split:<12}{cell['samples']:>8}{_figure(cell['score']):>9}{shown:>17}")
    overall = report["overall"]
    label = "Overall" if overall["complete"] else "Overall*"
    other = overall["vlmevalkit"] if overall["vlmevalkit"] != overall["score"] else None
    lines.append(f"{label:<12}{overall['samples']:>8}{_figure(overall['score']):>9}"
                 f"{_figure(other) if other is not None else '':>17}")
    if not overall["complete"]:
        lines.append(f"* over {' + '.join(overall['splits']) or 'nothing'} only, not the paper's Overall (all three "
                     "splits, every Memory reply judged)")
    counts = report["replies"]
    lines.append(f"{counts['samples']} replies: {counts['refused']} refused by the backend and {counts['empty']} empty "
                 f"(scored 0), {counts['truncated']} cut at the length limit")
    memory = report["splits"].get("Memory")
    if memory and memory.get("judge_missing") is not None:
        v = memory["verdicts"]
        lines.append(f"judge verdicts on Memory: {v['A']} correct, {v['B']} incorrect, {v['C']} invalid, "
                     f"{v['unreadable']} unreadable (scored 0), {memory['judge_missing']} without a verdict "
                     "(refused, or failed after retries: a rerun asks again)")
    return "\n".join(lines)


def scores_png(report: dict[str, Any], path: str | Path, compare: dict[str, Any] | None = None,
               compare_name: str = "other") -> Path:
    """One bar per split and Overall (score x 100); the other run's bars beside them, hollow."""
    font = ImageFont.load_default(size=12)
    labels = [*report["splits"], "Overall"]
    values = [c["score"] for c in report["splits"].values()] + [report["overall"]["score"]]
    others = None
    if compare is not None:
        others = [compare.get("splits", {}).get(s, {}).get("score") for s in report["splits"]]
        others.append(compare.get("overall", {}).get("score"))
    left, top, bottom, slot, height = 48, 36, 60, 120, 340
    image = Image.new("RGB", (left + slot * len(labels) + 24, height), "white")
    draw = ImageDraw.Draw(image)
    y0, y1 = top, height - bottom
    draw.text((left, 8), "VTCBench-Wild (score x 100)", fill="black", font=font)
    draw.rectangle([left, y0, left + slot * len(labels), y1], outline="black")
    for tick in (0, 25, 50, 75, 100):
        y = y1 - (y1 - y0) * tick / 100
        draw.text((left - 26, y - 6), str(tick), fill="black", font=font)
    for i, label in enumerate(labels):
        x = left + slot * i + 20
        bars = [(values[i], True)] + ([(others[i], False)] if others is not None else [])
        for j, (value, solid) in enumerate(bars):
            if value is None:
                continue
            top_y = y1 - (y1 - y0) * value / 100
            box = [x + 42 * j, top_y, x + 42 * j + 36, y1]
            draw.rectangle(box, fill=(31, 119, 180) if solid else "white", outline=(31, 119, 180), width=2)
            draw.text((x + 42 * j, top_y - 14), f"{value:.1f}", fill="black", font=font)
        draw.text((x, y1 + 6), label, fill="black", font=font)
    note = "filled: this run" + (f"; hollow: {compare_name}" if compare is not None else "")
    draw.text((left, height - 20), note, fill="black", font=font)
    with written_whole(path) as partial:
        image.save(partial, format="PNG")
    return Path(path)


def write_scores(report: dict[str, Any], out: Path, compare_dir: str | Path | None = None) -> str:
    """scores.json and scores.png in `out`; returns the table."""
    compare = None
    if compare_dir is not None:
        other = Path(compare_dir) / "scores.json"
        if not other.is_file():
            raise EvalError(f"--compare {compare_dir}: no scores.json there (a folder of eval vtcbench)")
        compare = json.loads(other.read_text())
        if "splits" not in compare:
            raise EvalError(f"--compare {compare_dir}: its scores.json is not eval vtcbench's")
    out.mkdir(parents=True, exist_ok=True)
    write_text_whole(out / "scores.json", json.dumps(report, indent=1) + "\n")
    scores_png(report, out / "scores.png", compare, Path(compare_dir).name if compare_dir else "other")
    return format_table(report)
