"""A small data root in VTCBench-Wild's released layout, for the CPU demo and the tests: two
samples per split, each a question, its gold strings and one or two rendered JPEG pages that show
the context, with the card's `configs` naming the files (`layout="card"`), or the per-split
folders without a card (`layout="folders"`); and a stand-in judge for a loopback server.

Not the benchmark: use it to see the path work, then point --data-root at the real download.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

PAGE = (84, 112)  # px: 3 x 4 merged patches, 12 vision tokens (Qwen2.5-VL)
SAMPLES = {  # split -> (question, gold strings, context)
    "Retrieval": [
        ("What are all the special magic numbers for lively-ridge and demonic-heaven mentioned in the provided text?",
         ["9199619", "1202641"], "The magic number for lively-ridge is 9199619. For demonic-heaven: 1202641."),
        ("What is the special magic number for yielding-grain mentioned in the provided text?", ["6822442"],
         "One of the special magic numbers for yielding-grain is: 6822442."),
    ],
    "Reasoning": [
        ("Which character has been to Dresden?", ["Yuki"], "Yuki lives next to the Semper Opera House."),
        ("Which character has been to Helsinki?", ["Katie"], "Katie saw the Kiasma museum."),
    ],
    "Memory": [
        ("When did Caroline go to the LGBTQ support group?", ["7 May 2023"], "Caroline: I went on 7 May 2023."),
        ("What did Melanie paint recently?", ["a sunset"], "Melanie: I painted a sunset last week."),
    ],
}
CARD = """---
configs:
  - config_name: default
    data_files:
      - split: Retrieval
        path: data/Retrieval-*
      - split: Reasoning
        path: data/Reasoning-*
      - split: Memory
        path: data/Memory-*
---
A toy VTCBench-Wild in the released layout.
"""


def render_page(text: str, size: tuple[int, int] = PAGE) -> bytes:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((2, 2), text, fill="black")
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def split_rows(split: str) -> list[dict]:
    """The rows of a split as the release holds them (images as {bytes, path} structs)."""
    rows = []
    for i, (question, answers, context) in enumerate(SAMPLES[split]):
        pages = [render_page(context[:20]), render_page(context[20:])] if i == 0 else [render_page(context)]
        rows.append({"problem": question, "images": [{"bytes": p, "path": None} for p in pages], "answers": answers,
                     "_context": context, "_render_args": json.dumps({"dpi": 72}),
                     "_source": json.dumps({"question_id": f"{split}-{i}"})})
    return rows


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 1) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("problem", pa.string()), ("images", pa.list_(image)), ("answers", pa.list_(pa.string())),
                        ("_context", pa.string()), ("_render_args", pa.string()), ("_source", pa.string())])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


def write_toy_data_root(root: str | Path, layout: str = "card") -> Path:
    root = Path(root)
    for split in SAMPLES:
        name = f"data/{split}-00000-of-00001.parquet" if layout == "card" else f"{split}/test-00000-of-00001.parquet"
        write_parquet(root / name, split_rows(split))
    if layout == "card":
        (root / "README.md").write_text(CARD)
    return root


def stand_in_judge(body: dict) -> str:
    """A judge for a loopback server: "A" when the candidate's answer contains the standard answer
    (case aside), else "B"."""
    message = body["messages"][0]["content"]
    gold = message.split("<Standard Answer Begin>: ", 1)[1].split(" \n<Standard Answer End>", 1)[0]
    reply = message.split("<Candidate's Answer Begin>: ", 1)[1].split(" \n<Candidate's Answer End>", 1)[0]
    return "A" if gold.lower() in reply.lower() else "B"
