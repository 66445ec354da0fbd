"""The three benchmarks' released files, read and checked record by record: a bad record or a
missing video is named by its file and line (row of the parquet, item of a JSON list) with the
reason, before any model loads.

Video-MME (HF lmms-lab/Video-MME): videomme/test-00000-of-00001.parquet (video_id, duration,
domain, sub_category, url, videoID, question_id, task_type, question, options, answer), videos
unzipped from videos_chunked_*.zip as data/<videoID>.mp4 (or .MP4, .mkv; or under video/, where
VLMEvalKit puts them).
MLVU dev (HF MLVU/MVLU): MLVU/json/<N>_<task>.json lists (video, duration, question, candidates,
answer as candidate text, question_type), videos MLVU/video/<N>_<task>/<video>; tasks 1-7 are the
multiple-choice ones (M-avg).
LongVideoBench val (HF longvideobench/LongVideoBench): lvb_val.json (video_id, question,
candidates, correct_choice, duration_group, video_path, id, ...), videos videos/<video_path>.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_mmprolong.eval.dataset_qa import EvalError

BENCHMARKS = ("videomme", "mlvu", "lvb")
TITLES = {"videomme": "Video-MME", "mlvu": "MLVU", "lvb": "LongVideoBench"}
VIDEOMME_PARQUET = "videomme/test-00000-of-00001.parquet"
VIDEOMME_DURATIONS = ("short", "medium", "long")
MLVU_TASKS = ("1_plotQA", "2_needle", "3_ego", "4_count", "5_order", "6_anomaly_reco", "7_topic_reasoning")
LVB_JSON = "lvb_val.json"
LVB_DURATION_GROUPS = (15, 60, 600, 3600)
LETTERS = "ABCDE"


@dataclass(frozen=True)
class VideoQuestion:
    benchmark: str  # videomme, mlvu, lvb
    id: str
    source: str  # file and line, for messages
    video: Path
    question: str
    options: tuple[str, ...]  # as the reference shows them (Video-MME's carry their "A. " prefix)
    answer: str  # the right letter ("@" when the answer is none of the options: never scorable)
    group: str  # Video-MME duration, MLVU task, LongVideoBench duration group
    extra: dict[str, Any] = field(default_factory=dict)


def _need(record: Any, fields: dict[str, type | tuple[type, ...]], where: str) -> None:
    if not isinstance(record, dict):
        raise EvalError(f"{where}: a record must be an object, got {type(record).__name__}")
    for name, kind in fields.items():
        if name not in record:
            raise EvalError(f"{where}: no field {name!r}")
        if not isinstance(record[name], kind) or isinstance(record[name], bool):
            expected = kind.__name__ if isinstance(kind, type) else "a number"
            raise EvalError(f"{where}: field {name!r} is {type(record[name]).__name__}, expected {expected}")


def _strings(values: Any, name: str, where: str, counts: tuple[int, ...]) -> tuple[str, ...]:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise EvalError(f"{where}: field {name!r} must be a list of strings")
    if len(values) not in counts:
        raise EvalError(f"{where}: field {name!r} has {len(values)} options, expected {' or '.join(map(str, counts))}")
    return tuple(values)


def _video(path: Path, where: str) -> Path:
    if not path.is_file():
        raise EvalError(f"{where}: its video {path} is not there")
    return path


def _json_list(path: Path) -> list:
    if not path.is_file():
        raise EvalError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvalError(f"{path}: not JSON ({err})") from None
    if not isinstance(data, list):
        raise EvalError(f"{path}: expected a JSON list of questions")
    return data


def read_videomme(root: str | Path) -> list[VideoQuestion]:
    root = Path(root)
    path = root / VIDEOMME_PARQUET
    if not path.is_file():
        raise EvalError(f"{path}: no such file (Video-MME's questions, from the dataset's videomme/ folder)")
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises its own error types for damaged files
        raise EvalError(f"{path}: not a readable parquet file ({err})") from None
    fields = {k: str for k in ("videoID", "question_id", "duration", "question", "answer", "task_type")}
    questions = []
    for row_number, row in enumerate(rows, 1):
        where = f"{path} row {row_number}"
        _need(row, fields, where)
        options = _strings(row.get("options"), "options", where, (4,))
        if row["answer"] not in LETTERS[:4]:
            raise EvalError(f"{where}: answer {row['answer']!r} is not a letter A-D")
        if row["duration"] not in VIDEOMME_DURATIONS:
            raise EvalError(f"{where}: duration {row['duration']!r} is not one of {', '.join(VIDEOMME_DURATIONS)}")
        # the zips unpack into data/; VLMEvalKit flattens them into video/
        candidates = [root / folder / f"{row['videoID']}{ext}" for folder in ("data", "video")
                      for ext in (".mp4", ".MP4", ".mkv")]
        video = next((c for c in candidates if c.is_file()), candidates[0])
        questions.append(VideoQuestion("videomme", row["question_id"], where, _video(video, where), row["question"],
                                       options, row["answer"], row["duration"],
                                       {"task_type": row["task_type"], "domain": row.get("domain")}))
    return questions


def read_mlvu(root: str | Path) -> list[VideoQuestion]:
    root = Path(root)
    fields = {"video": str, "question": str, "answer": str, "question_type": str, "duration": (int, float)}
    questions = []
    for task in MLVU_TASKS:
        path = root / "MLVU" / "json" / f"{task}.json"
        for item, record in enumerate(_json_list(path), 1):
            where = f"{path} item {item}"
            _need(record, fields, where)
            candidates = _strings(record.get("candidates"), "candidates", where, (2, 3, 4, 5))
            # an answer outside the candidates (2 needle items) can never be right, as in the reference
            answer = LETTERS[candidates.index(record["answer"])] if record["answer"] in candidates else "@"
            video = _video(root / "MLVU" / "video" / task / record["video"], where)
            questions.append(VideoQuestion("mlvu", f"{task}/{item}", where, video, record["question"], candidates,
                                           answer, task, {"answer_text": record["answer"]}))
    return questions


def read_lvb(root: str | Path) -> list[VideoQuestion]:
    root = Path(root)
    path = root / LVB_JSON
    fields = {"id": str, "question": str, "correct_choice": int, "duration_group": int, "video_path": str}
    questions = []
    for item, record in enumerate(_json_list(path), 1):
        where = f"{path} item {item}"
        _need(record, fields, where)
        candidates = _strings(record.get("candidates"), "candidates", where, (2, 3, 4, 5))
        if not 0 <= record["correct_choice"] < len(candidates):
            raise EvalError(f"{where}: correct_choice {record['correct_choice']} is outside its "
                            f"{len(candidates)} candidates")
        if record["duration_group"] not in LVB_DURATION_GROUPS:
            raise EvalError(f"{where}: duration_group {record['duration_group']} is not one of "
                            f"{', '.join(map(str, LVB_DURATION_GROUPS))}")
        video = _video(root / "videos" / record["video_path"], where)
        questions.append(VideoQuestion("lvb", record["id"], where, video, record["question"], candidates,
                                       LETTERS[record["correct_choice"]], str(record["duration_group"]),
                                       {"question_category": record.get("question_category")}))
    return questions


READERS = {"videomme": read_videomme, "mlvu": read_mlvu, "lvb": read_lvb}


def read_benchmark(name: str, root: str | Path) -> list[VideoQuestion]:
    if not Path(root).is_dir():
        raise EvalError(f"{root}: the {TITLES[name]} folder is not there")
    return READERS[name](root)
