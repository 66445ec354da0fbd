"""A small data root in MMLongBench's released layout, for the CPU demo and the tests: two
document-QA samples per dataset (every answer format) and two MM-NIAH samples per task, at 8K,
with page images rendered here that show the facts, and the answers known; and a stand-in judge
(`stand_in_judge`) that grades by exact match, for a loopback server.

Not the benchmark: use it to see the path work, then point --data-root at the real download.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from megatron_mmprolong.eval.mmlongbench.data import NIAH_DEPTHS
from megatron_mmprolong.eval.mmlongbench.metrics import normalize

PAGE = (84, 112)  # px: 3 x 4 merged patches, 12 vision tokens
DOC_QA = {  # (question, answer, answer_format)
    "longdocurl": [("How many boats left?", "12", "Integer"), ("What share was exported?", "0.25", "Float")],
    "mmlongdoc": [("Who signed the report?", "Amber Gecko", "String"), ("What is on page 9?", "Not answerable", "None")],
    "slidevqa": [("Which two fruits are listed?", '["apple", "banana"]', "List"), ("What year?", "2019", "Integer")],
}
NIAH = {  # (question, answer): counting answers list the needles per image, choice answers index the options
    "retrieval-text": [("What is the secret word?", "blue cat"), ("What does the key open?", "the red door")],
    "counting-text": [("How many needles are in each image?", [1, 2]), ("How many stars are in each image?", [0, 3])],
    "reasoning-text": [("Which boat left first?", "the green one"), ("Who arrived last?", "the pilot")],
    "retrieval-image": [("Which of the following images appears in the document?", 1),
                        ("Which image shows the harbour?", 2)],
    "counting-image": [("How many times does this image appear: <image>?", [2]),
                       ("How often is this image shown: <image>?", [1])],
    "reasoning-image": [("Which image follows the harbour?", 0), ("Which image shows the night?", 2)],
}


def render_page(path: Path, text: str, size: tuple[int, int] = PAGE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((4, 4), text, fill="black")
    image.save(path)
    return path


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_toy_data_root(root: str | Path) -> Path:
    root = Path(root)
    images = root / "mmlb_image"
    for dataset, questions in DOC_QA.items():
        records = []
        for i, (question, answer, answer_format) in enumerate(questions):
            doc, other = f"{dataset}doc{i}", f"{dataset}neg{i}"  # two pages of its own, one negative page
            pages = [f"{dataset}/{doc}/{doc}_page{p}.png" for p in (0, 1)] + [f"{dataset}/{other}/{other}_page0.png"]
            for page in pages:
                render_page(images / page, f"{page.rsplit('/', 1)[1]}: {answer}")
            records.append({"id": f"{dataset}_{i}", "doc_name": doc, "question": question, "answer": answer,
                            "answer_format": answer_format, "page_list": pages, "ans_page_list": [1]})
        write_jsonl(root / "mmlb_data" / "documentQA" / f"{dataset}_K8.jsonl", records)
    for task, questions in NIAH.items():
        records = []
        for i, (question, answer) in enumerate(questions):
            haystack = f"mm-niah/{task}/{i}.png"
            render_page(images / haystack, f"haystack {i}")
            record = {"id": f"{task}-{i}", "ctxs": [{"text": "A harbour at dawn. <image> Boats leave early."},
                                                     {"text": f"The answer: {answer}."}],
                      "image_list": [haystack], "question": question, "answer": answer}
            extra = {"retrieval-image": ("choices_image", 3), "reasoning-image": ("choices_image", 3),
                     "counting-image": ("needle_image_list", 1)}.get(task)
            if extra:
                record[extra[0]] = [f"mm-niah/{task}/{i}-{extra[0]}{c}.png" for c in range(extra[1])]
                for c, path in enumerate(record[extra[0]]):
                    render_page(images / path, f"option {c}")
            records.append(record)
        write_jsonl(root / "mmlb_data" / "NIAH" / f"{task}_test_K8_dep{NIAH_DEPTHS[task]}.jsonl", records)
    return root


def stand_in_judge(body: dict) -> str:
    """A judge for a loopback server: 1 point when the student's answer equals the reference
    after normalising; for lists, the reference items the answer contains, in the reply format
    the harness reads."""
    message = body["messages"][0]["content"]
    case = message.rsplit("[Current Case]", 1)[1]
    reference = case.split("<Standard Answer>: ", 1)[1].split("\n", 1)[0]
    student = case.split("<Student Answer>: ", 1)[1].split("\n", 1)[0]
    if "student_answer_count" in message.rsplit("[Current Case]", 1)[0]:
        items = json.loads(reference)
        given = [s for s in student.replace(" and ", ",").split(",") if s.strip()]
        covered = sum(normalize(str(item)) in normalize(student) for item in items)
        return f'[Rationale]: compared.\n[JSON]:\n{{"student_answer_count": {len(given)}, "covered_count": {covered}}}'
    return f"[Scoring Rationale]: compared.\n[Score]: {int(normalize(student) == normalize(reference))} points"
