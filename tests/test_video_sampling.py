"""eval video: the frame-sampling rule at the caps (frame count, frame times, token budget as each
family counts it), on hand-computed cases, and decoding of tiny counter videos encoded here."""

import numpy as np
import pytest

from megatron_mmprolong.data.images import ImageParams
from megatron_mmprolong.eval.video.sampling import (
    SamplingConfig, SamplingError, VideoMeta, frame_count, frame_indices, plan_frames, video_tokens,
)

QWEN25, QWEN3 = ImageParams.for_family("qwen2_5_vl"), ImageParams.for_family("qwen3_vl")


def test_the_families_count_tokens_in_their_patches():
    assert (QWEN25.patch_size, QWEN25.merge_size, QWEN25.temporal_patch_size) == (14, 2, 2)
    assert (QWEN3.patch_size, QWEN3.merge_size, QWEN3.temporal_patch_size) == (16, 2, 2)
    assert video_tokens(4, 56, 84, QWEN25) == 2 * 2 * 3 and video_tokens(4, 64, 96, QWEN3) == 2 * 2 * 3


@pytest.mark.parametrize("image", [QWEN25, QWEN3], ids=["qwen2.5-vl", "qwen3-vl"])
@pytest.mark.parametrize("size", [(720, 1280), (1080, 1920), (480, 640), (1280, 720), (360, 1920)])
def test_two_hours_at_1_fps_give_768_frames_within_the_token_budget(image, size):
    meta = VideoMeta(frames=2 * 3600 * 30, avg_fps=30.0, height=size[0], width=size[1])
    plan = plan_frames(meta, SamplingConfig(), image)
    assert len(plan.indices) == 768
    groups, rows, cols = plan.grid(image.patch_size)
    assert groups == 384 and plan.tokens == groups * rows * cols // 4 <= 24576
    assert plan.tokens > 24576 * 0.75  # the budget is spent, not wasted
    assert plan.height % image.factor == 0 and plan.width % image.factor == 0
    # frame times are the sampled frames' own: index / fps, first and last frame included
    assert plan.times == tuple(i / 30.0 for i in plan.indices)
    assert plan.indices[0] == 0 and plan.indices[-1] == meta.frames - 1
    assert plan.times[-1] == pytest.approx(7200 - 1 / 30)
    assert plan.group_times[0] == pytest.approx((plan.times[0] + plan.times[1]) / 2)


def test_the_reference_floor_breaks_the_budget_at_768_frames():
    meta = VideoMeta(frames=2 * 3600 * 30, avg_fps=30.0, height=720, width=1280)
    assert plan_frames(meta, SamplingConfig(token_floor=True), QWEN25).tokens > 24576
    assert plan_frames(meta, SamplingConfig(), QWEN25).tokens <= 24576


def test_short_videos_take_one_frame_a_second_and_their_times():
    # 10 s at 25 fps: 10 frames at 0, 27.67, ... -> round(linspace(0, 249, 10))
    meta = VideoMeta(frames=250, avg_fps=25.0, height=360, width=640)
    plan = plan_frames(meta, SamplingConfig(), QWEN25)
    assert plan.indices == (0, 28, 55, 83, 111, 138, 166, 194, 221, 249)
    assert plan.times == tuple(i / 25 for i in plan.indices)
    assert plan.sample_fps == pytest.approx(1.0) and plan.seconds_per_group == pytest.approx(2.0)


@pytest.mark.parametrize("frames, fps, rule, expected", [
    (191, 2.0, "floor", 94),  # 95.5 s -> 95.5 frames: floor to 94 (qwen-vl-utils >= 0.0.10)
    (191, 2.0, "round", 96),  # round to 96 (qwen-vl-utils 0.0.8)
    (216000, 30.0, "floor", 768), (216000, 30.0, "round", 768),  # 2 h: the cap
    (60, 30.0, "floor", 4), (60, 30.0, "round", 4),  # 2 s: at least 4 frames
    (3, 1.0, "floor", 2),  # a 3-frame video: at most its own frames, even
    (101, 1.0, "round", 100), (101, 1.0, "floor", 100),
])
def test_frame_count_rules(frames, fps, rule, expected):
    assert frame_count(frames, fps, SamplingConfig(frame_rule=rule)) == expected


def test_frame_indices_round_half_to_even_in_float32():
    assert frame_indices(5, 4).tolist() == [0, 1, 3, 4]  # 0, 1.333, 2.667, 4
    assert frame_indices(4, 3).tolist() == [0, 2, 3]  # 1.5 -> 2 (half to even)
    assert frame_indices(6, 3).tolist() == [0, 2, 5]  # 2.5 -> 2


def test_bad_settings_and_videos_are_refused():
    with pytest.raises(SamplingError, match="frame rule"):
        SamplingConfig(frame_rule="ceil")
    with pytest.raises(SamplingError, match="1 frames"):
        frame_count(1, 30.0, SamplingConfig())


def test_toy_videos_decode_to_the_planned_frames_once(tmp_path, monkeypatch):
    from megatron_mmprolong.eval.video import decode
    from megatron_mmprolong.eval.video.toy_data import frame_number, write_counter_video

    video = write_counter_video(tmp_path / "counter.mp4", seconds=6, fps=8, gop=8)
    meta = decode.probe(video)
    assert (meta.frames, meta.avg_fps, meta.height, meta.width) == (48, 8.0, 84, 112)
    plan = plan_frames(meta, SamplingConfig(), QWEN25)
    assert plan.indices == (0, 9, 19, 28, 38, 47)
    frames = decode.decode_frames(video, plan, meta.avg_fps)
    assert frames.shape == (6, plan.height, plan.width, 3)
    assert [frame_number(f) for f in frames] == list(plan.indices)
    sparse = write_counter_video(tmp_path / "keyframes.mp4", seconds=6, fps=8, gop=2)  # a keyframe every 2 frames
    assert [frame_number(f) for f in decode.decode_frames(sparse, plan, meta.avg_fps)] == list(plan.indices)
    counts = {}
    decode.decode_frames(sparse, plan, meta.avg_fps, counts)
    assert counts["decoded"] == 6 + 3  # from the keyframe before each: 0; 8-9; 18-19; 28; 38; 46-47
    decode.decode_frames(video, plan, meta.avg_fps, counts)
    assert counts["decoded"] == 1 + 2 + 4 + 5 + 7 + 8  # keyframes every 8 frames: 0; 8-9; 16-19; 24-28; 32-38; 40-47

    cache = decode.FrameCache(tmp_path / "cache")
    first = np.array(cache.frames(video, plan, meta.avg_fps))
    calls = []
    monkeypatch.setattr(decode, "decode_frames", lambda *a: calls.append(a))
    assert np.array_equal(cache.frames(video, plan, meta.avg_fps), first) and not calls  # from the cache
    assert not list((tmp_path / "cache").rglob("*.partial"))
    smaller = plan_frames(meta, SamplingConfig(max_frames=4), QWEN25)
    assert cache.path(video, smaller) != cache.path(video, plan)  # keyed by the plan too


def test_a_file_that_is_not_a_video_is_named(tmp_path):
    from megatron_mmprolong.eval.video.decode import VideoError, probe

    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(VideoError, match="broken.mp4: cannot be read as a video"):
        probe(bad)
