"""Decoding the sampled frames with PyAV, once: frames are cached on disk keyed by the file (path,
size, modification time) and the frame plan (indices and size), written whole or not at all.

PyAV (`av` on PyPI) rather than torchcodec: its wheels bundle FFmpeg for Linux, macOS and Windows
and ask nothing of the installed torch, while torchcodec needs a system FFmpeg of a matching major
version and a build per torch release; both seek and decode with FFmpeg, so the speed is alike.

The keyframes are read from the packets first (demuxed, not decoded). Each wanted frame is then
decoded forward from the last keyframe before it: when that keyframe lies beyond the frame
decoded last, the decoder seeks to it instead of decoding the gap, so only the frames between a
wanted frame and its keyframe are decoded (at 1 fps with a keyframe every 2 s, about half of
them; at the 768-frame cap of a long video, a small share). A frame's index is its time x avg_fps
(rounded); only wanted frames are converted to RGB, by FFmpeg's swscale (bicubic) straight at
the planned size.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import numpy as np

from megatron_mmprolong.errors import BadInput
from megatron_mmprolong.eval.video.sampling import FramePlan, VideoMeta

class VideoError(BadInput, ValueError):
    """A video that cannot be read, named with the reason."""


def probe(path: str | Path) -> VideoMeta:
    """Frame count, average frame rate and size of the first video stream, from its headers
    (frame count from the container, else duration x rate)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise VideoError(f"{path}: the video stream has no frame rate")
            frames = stream.frames
            if not frames:
                seconds = (float(stream.duration * stream.time_base) if stream.duration
                           else container.duration / 1e6 if container.duration else 0)
                frames = int(round(seconds * float(rate)))
            if frames < 2:
                raise VideoError(f"{path}: the video has {frames} frame(s)")
            return VideoMeta(int(frames), float(rate), stream.codec_context.height, stream.codec_context.width)
    except (av.FFmpegError, OSError) as err:
        raise VideoError(f"{path}: cannot be read as a video ({err})") from None


def keyframe_indices(container, stream, avg_fps: float) -> np.ndarray:
    """Frame indices of the stream's keyframes, from its packets (demuxed, not decoded)."""
    base, start = stream.time_base, stream.start_time or 0
    found = [float((packet.pts - start) * base) for packet in container.demux(stream)
             if packet.is_keyframe and packet.pts is not None]
    container.seek(0, stream=stream, backward=True, any_frame=False)
    return np.unique(np.rint(np.asarray(found or [0.0]) * avg_fps).astype(np.int64))


def decode_frames(path: str | Path, plan: FramePlan, avg_fps: float, counts: dict | None = None) -> np.ndarray:
    """The plan's frames, uint8 [n, height, width, 3] in RGB; a frame the stream lacks (its end
    is shorter than its header says) repeats the last one decoded. `counts` gets the number of
    frames decoded ("decoded")."""
    import av

    wanted = np.asarray(plan.indices)
    out = np.zeros((len(wanted), plan.height, plan.width, 3), dtype=np.uint8)
    filled = 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            base, start = stream.time_base, stream.start_time or 0
            keyframes = keyframe_indices(container, stream, avg_fps)
            # the keyframe each wanted frame is decoded from
            entry = keyframes[np.maximum(np.searchsorted(keyframes, wanted, side="right") - 1, 0)]
            current = -1  # index of the frame decoded last
            decoded = 0
            while filled < len(wanted):
                if entry[filled] > current:  # a keyframe lies between: seek to it, skip what is before
                    seconds = Fraction(int(entry[filled])) / Fraction(avg_fps)
                    container.seek(start + int(seconds / base), stream=stream, backward=True, any_frame=False)
                for frame in container.decode(stream):
                    decoded += 1
                    current = current + 1 if frame.pts is None else int(round(float((frame.pts - start) * base)
                                                                                 * avg_fps))
                    if current < wanted[filled]:
                        continue
                    image = frame.to_ndarray(format="rgb24", width=plan.width, height=plan.height,
                                             interpolation="BICUBIC")
                    while filled < len(wanted) and wanted[filled] <= current:
                        out[filled] = image
                        filled += 1
                    if filled == len(wanted) or entry[filled] > current:
                        break
                else:  # the stream ended before its header's frame count
                    if filled == 0:
                        raise VideoError(f"{path}: no frame could be decoded")
                    out[filled:] = out[filled - 1]
                    filled = len(wanted)
            if counts is not None:
                counts["decoded"] = decoded
    except av.FFmpegError as err:
        raise VideoError(f"{path}: decoding failed ({err})") from None
    return out


class FrameCache:
    """Decoded frames on disk under `root`, one .npy per (file, plan)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, video: str | Path, plan: FramePlan) -> Path:
        stat = Path(video).stat()
        key = hashlib.sha256(repr((str(Path(video).resolve()), stat.st_size, stat.st_mtime_ns, plan.indices,
                                   plan.height, plan.width)).encode()).hexdigest()[:24]
        return self.root / key[:2] / f"{key}.npy"

    def frames(self, video: str | Path, plan: FramePlan, avg_fps: float) -> np.ndarray:
        """The plan's frames: read from the cache, or decoded and written whole."""
        path = self.path(video, plan)
        if path.is_file():
            return np.load(path, mmap_mode="r")
        frames = decode_frames(video, plan, avg_fps)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".partial", delete=False) as handle:
            np.save(handle, frames)
        os.replace(handle.name, path)
        return frames

    def fill(self, videos: list[tuple[str | Path, FramePlan, float]], workers: int = 1) -> None:
        """Decode what the cache lacks, `workers` videos at a time (FFmpeg releases the GIL)."""
        todo = [v for v in videos if not self.path(v[0], v[1]).is_file()]
        if workers <= 1:
            for video in todo:
                self.frames(*video)
            return
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda v: self.frames(*v), todo))
