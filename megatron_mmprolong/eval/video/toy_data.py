"""Small data roots in the released layouts of Video-MME, MLVU and LongVideoBench, with tiny
videos encoded here by PyAV (a few seconds, low resolution): each frame shows its number as text
and as the grey level of its top-left block (index x 4, up to 63 frames), so a decoded frame tells which it is.
For the CPU demo and the tests; the answers are known. Not the benchmarks.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = (112, 84)  # width, height px
BLOCK = 16  # px: the top-left block whose grey level is the frame index x 4


def counter_frame(index: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    image = Image.new("RGB", size, (20, 60, 120))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, BLOCK - 1, BLOCK - 1], fill=(index * 4,) * 3)
    draw.text((BLOCK + 6, size[1] // 2 - 6), f"frame {index}", fill="white")
    return np.asarray(image)


def frame_number(frame: np.ndarray, size: tuple[int, int] = SIZE) -> int:
    """The index a decoded counter frame shows (its block's grey level / 4), at any resize of it."""
    rows, cols = BLOCK * frame.shape[0] / size[1], BLOCK * frame.shape[1] / size[0]
    inner = frame[int(rows * 0.25):max(int(rows * 0.75), int(rows * 0.25) + 1),
                  int(cols * 0.25):max(int(cols * 0.75), int(cols * 0.25) + 1)]
    return int(round(float(inner.mean()) / 4))


def write_counter_video(path: Path, seconds: float = 4, fps: int = 8, size: tuple[int, int] = SIZE,
                        gop: int = 8) -> Path:
    """An H.264 mp4 of seconds x fps counter frames, a keyframe every `gop` frames."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"crf": "10", "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": "0"}
        for index in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(counter_frame(index, size), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# (question, options, right index, group)
VIDEOMME = [("What number does the first frame show?", ["0", "8", "16", "31"], 0, "short"),
            ("Which colour fills the background?", ["Red", "Blue", "Green", "White"], 1, "medium"),
            ("How many seconds does the video last?", ["1", "2", "4", "60"], 2, "long")]
MLVU = {"1_plotQA": ("What colour is the background?", ["Yellow", "Red", "Green", "Blue"], 3),
        "2_needle": ("Which word appears beside the number?", ["frame", "page", "slide", "shot"], 0),
        "3_ego": ("Where is the grey block?", ["bottom right", "top left", "centre", "bottom left"], 1),
        "4_count": ("How many frames a second?", ["2", "4", "8", "16"], 2),
        "5_order": ("In which order do the numbers come?", ["falling", "random", "rising", "none"], 2),
        "6_anomaly_reco": ("Is anything unusual?", ["no", "yes", "fire", "smoke"], 0),
        "7_topic_reasoning": ("What is the video about?", ["cooking", "counting", "sports", "news"], 1)}
LVB = [("Which text is shown?", ["frame N", "page N", "slide N", "shot N", "none"], 0, 15),
       ("What is the colour of the block at the start?", ["white", "black", "red", "blue"], 1, 60)]


def write_videomme_root(root: Path, videos: int = 2) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for n, (question, options, answer, duration) in enumerate(VIDEOMME):
        video_id = f"toyvid{n % videos}"
        if not (root / "data" / f"{video_id}.mp4").exists():  # a test may have put a video of its own there
            write_counter_video(root / "data" / f"{video_id}.mp4")
        rows.append({"video_id": f"{n % videos + 1:03d}", "duration": duration, "domain": "Knowledge",
                     "sub_category": "Humanity & History", "url": f"https://www.youtube.com/watch?v={video_id}",
                     "videoID": video_id, "question_id": f"{n % videos + 1:03d}-{n + 1}", "task_type": "Counting Problem",
                     "question": question, "options": [f"{'ABCD'[i]}. {o}" for i, o in enumerate(options)],
                     "answer": "ABCD"[answer]})
    (root / "videomme").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "videomme" / "test-00000-of-00001.parquet")
    return root


def write_mlvu_root(root: Path) -> Path:
    for task, (question, candidates, answer) in MLVU.items():
        video = f"{task.split('_', 1)[1]}_1.mp4"
        write_counter_video(root / "MLVU" / "video" / task / video)
        record = {"video": video, "duration": 4, "question": question, "candidates": candidates,
                  "answer": candidates[answer], "question_type": task.split("_", 1)[1]}
        path = root / "MLVU" / "json" / f"{task}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([record], indent=1))
    return root


def write_lvb_root(root: Path) -> Path:
    records = []
    for n, (question, candidates, answer, group) in enumerate(LVB):
        video_id = f"lvbtoy{n}"
        write_counter_video(root / "videos" / f"{video_id}.mp4")
        records.append({"video_id": video_id, "question": question, "question_wo_referring_query": question,
                        "candidates": candidates, "correct_choice": answer, "position": [0], "topic_category":
                        "NP-News-Programs", "question_category": "TOS", "level": "L1-Perception",
                        "id": f"{video_id}_0", "video_path": f"{video_id}.mp4", "subtitle_path": f"{video_id}_en.json",
                        "duration_group": group, "starting_timestamp_for_subtitles": 0, "duration": 4.0,
                        "view_count": 1})
    root.mkdir(parents=True, exist_ok=True)
    (root / "lvb_val.json").write_text(json.dumps(records, indent=1))
    return root


def right_letters() -> dict[str, str]:
    """Question text -> its right letter, for a scripted server that answers right."""
    right = {q: "ABCD"[a] for q, _, a, _ in VIDEOMME}
    right |= {q: "ABCD"[a] for q, _, a in MLVU.values()}
    right |= {q: "ABCDE"[a] for q, _, a, _ in LVB}
    return right
