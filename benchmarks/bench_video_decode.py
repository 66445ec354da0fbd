"""Frame decoding of `eval video`: sampled frames/s with 1 and 2 workers (videos decoded at once)
against decoding every frame of the same videos, printed as a ratio (same run, same inputs).

Inputs: counter videos encoded here (H.264, 30 fps, a keyframe every 2 s as web video has,
640x360), sampled by the protocol (1 fps; frames resized to the token budget's size) and decoded
into a fresh frame cache each time. "Every frame" decodes the whole stream to RGB at full size,
as a reader without seeking does.

    python benchmarks/bench_video_decode.py [--videos 4] [--seconds 60] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def decode_every_frame(path: Path) -> int:
    import av

    frames = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            frame.to_ndarray(format="rgb24")
            frames += 1
    return frames


def main() -> None:
    from megatron_mmprolong.data.images import ImageParams
    from megatron_mmprolong.eval.video.decode import FrameCache, probe
    from megatron_mmprolong.eval.video.sampling import SamplingConfig, plan_frames
    from megatron_mmprolong.eval.video.toy_data import write_counter_video

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-video-"))
    try:
        videos = [write_counter_video(work / f"v{n}.mp4", args.seconds, args.fps, (640, 360), gop=2 * args.fps)
                  for n in range(args.videos)]
        image = ImageParams.for_family("qwen2_5_vl")
        plans = []
        for video in videos:
            meta = probe(video)
            plans.append((video, plan_frames(meta, SamplingConfig(), image), meta.avg_fps))
        sampled = sum(len(plan.indices) for _, plan, _ in plans)

        began = time.perf_counter()
        every = sum(decode_every_frame(v) for v in videos)
        every_seconds = time.perf_counter() - began
        report = {"videos": args.videos, "seconds_each": args.seconds, "fps": args.fps, "sampled_frames": sampled,
                  "every_frame": {"frames": every, "seconds": round(every_seconds, 2),
                                  "sampled_frames_per_s": round(sampled / every_seconds, 1)}}
        for workers in args.workers:
            cache = work / f"cache{workers}"
            began = time.perf_counter()
            FrameCache(cache).fill(plans, workers)
            seconds = time.perf_counter() - began
            report[f"workers_{workers}"] = {"seconds": round(seconds, 2),
                                            "sampled_frames_per_s": round(sampled / seconds, 1),
                                            "speedup_vs_every_frame": round(every_seconds / seconds, 2)}
            shutil.rmtree(cache)
        print(json.dumps(report, indent=1))
        for workers in args.workers:
            print(f"{workers} worker(s): {report[f'workers_{workers}']['speedup_vs_every_frame']:.2f}x the sampled "
                  "frames/s of decoding every frame")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
