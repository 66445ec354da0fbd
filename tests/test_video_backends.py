"""eval video on local models: a random tiny Qwen2.5-VL (and Qwen3-VL) answers the questions of a
toy Video-MME root the same through transformers and through this project's model on its Megatron
conversion at CP2 (two torchrun ranks, rank 0 writing), the video given as one video item on the
model's time axis (Qwen2.5-VL: second_per_grid_ts from the sampled fps; Qwen3-VL: a timestamp
before each 2-frame group)."""

import pytest

import json
import os
import subprocess
import sys

import torch

from megatron_mmprolong.cli import main
from megatron_mmprolong.eval.video.toy_data import write_counter_video, write_videomme_root
from multiprocess import free_port

# 8x6 merged patches (28 px for Qwen2.5-VL, 32 px for Qwen3-VL), so the video's 2 groups (4 s at
# 1 fps, 2 s each, tokens_per_second 2: M-RoPE times 0 and 4) stay within its grid, where
# transformers >= 5 places the text after a video as the original Qwen2.5-VL code does
# (convert/parity.py, known_difference)
FAMILIES = {"qwen2.5-vl": ("tiny-1k", (224, 168)), "qwen3-vl": ("qwen3vl-tiny-1k", (256, 192))}


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_and_megatron_at_cp2_give_the_same_replies(tmp_path, family):
    from megatron_mmprolong.config import ParallelConfig, VLConfig
    from megatron_mmprolong.convert.hf_to_mcore import hf_to_mcore
    from megatron_mmprolong.convert.random_hf import write_random_hf_checkpoint
    from megatron_mmprolong.data.tiny_tokenizer import write_tiny_tokenizer

    root = tmp_path / "videomme"
    for n in range(2):
        write_counter_video(root / "data" / f"toyvid{n}.mp4", seconds=4, fps=8, size=FAMILIES[family][1])
    write_videomme_root(root)
    hf = write_random_hf_checkpoint(VLConfig.preset(FAMILIES[family][0]), tmp_path / "hf", seed=3)
    write_tiny_tokenizer(hf)
    hf_to_mcore(hf, tmp_path / "mcore", ParallelConfig(), progress=False)
    common = ["eval", "video", "--videomme-root", str(root), "--max-new-tokens", "12", "--max-samples", "2",
              "--frame-cache", str(tmp_path / "frames")]
    assert main([*common, "--hf-dir", str(hf), "--out", str(tmp_path / "hf-run")]) == 0
    port = free_port()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
                    "-m", "megatron_mmprolong.cli", *common, "--mcore-dir", str(tmp_path / "mcore"), "--cp", "2",
                    "--tokenizer", str(hf), "--dtype", "fp32", "--out", str(tmp_path / "mcore-run")],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
                   stdout=subprocess.DEVNULL)

    def replies(run):
        lines = (tmp_path / run / "predictions.jsonl").read_text().splitlines()
        return {e["id"]: (e["reply"], e["video_tokens"]) for e in map(json.loads, lines)}

    ours, reference = replies("mcore-run"), replies("hf-run")
    assert len(reference) == 2 and all(r["error"] is None and len(r["text"]) > 5 for r, _ in reference.values())
    assert {k: r["text"] for k, (r, _) in ours.items()} == {k: r["text"] for k, (r, _) in reference.items()}
    assert {k: (r["prompt_tokens"], n) for k, (r, n) in ours.items()} == \
        {k: (r["prompt_tokens"], n) for k, (r, n) in reference.items()}
    # the prompt holds the video's 2 groups of 6x8 merged patches between its vision markers
    assert all(n == 96 for _, n in reference.values())


def test_the_video_goes_to_the_model_as_a_video_item(tmp_path):
    """transformers' inputs of a question: <|video_pad|> x the video's tokens in one vision span,
    pixel_values_videos in the processor's layout, the grid and the seconds per group."""
    import numpy as np

    from megatron_mmprolong.data.chat import ChatTokenizer
    from megatron_mmprolong.data.images import ImageParams
    from megatron_mmprolong.data.tiny_tokenizer import write_tiny_tokenizer
    from megatron_mmprolong.eval.video.prompts import VideoPrompt
    from megatron_mmprolong.eval.video.requests import LocalVideoBackend, video_pixel_values, video_request
    from megatron_mmprolong.eval.video.sampling import FramePlan

    directory = tmp_path / "tok"
    directory.mkdir()
    write_tiny_tokenizer(directory)
    tokenizer = ChatTokenizer(directory)
    image = ImageParams.for_family("qwen2_5_vl")
    model = torch.nn.Linear(1, 1)
    frames = np.random.default_rng(0).integers(0, 255, (4, 56, 84, 3), dtype=np.uint8)
    plan = FramePlan((0, 8, 16, 24), (0.0, 1.0, 2.0, 3.0), 56, 84, 12, 1.0)
    request = video_request(VideoPrompt("", "Question?"), frames, plan, 8, served=False)
    inputs = LocalVideoBackend(model, tokenizer, image, "m", "qwen2_5_vl").prompt(request)
    ids = inputs["input_ids"][0].tolist()
    pad = tokenizer.hf.convert_tokens_to_ids("<|video_pad|>")
    start = ids.index(tokenizer.vision_start)
    assert ids[start + 1:start + 13] == [pad] * 12 and ids[start + 13] == tokenizer.vision_end and ids.count(pad) == 12
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 6]] and inputs["second_per_grid_ts"].tolist() == [2.0]
    pixels = video_pixel_values(frames, image)
    assert inputs["pixel_values_videos"].shape == pixels.shape == (2 * 4 * 6, 3 * 2 * 14 * 14)
    # the first patch: frames 0 and 1, rows 0-13, cols 0-13, channels first, normalised
    first = (frames[:2, :14, :14].astype(np.float32) / 255 - np.asarray(image.mean)) / np.asarray(image.std)
    assert np.allclose(pixels[0].numpy(), first.transpose(3, 0, 1, 2).reshape(-1), atol=1e-6)
    # the second patch of the first merge group is one patch to the right
    second = (frames[:2, :14, 14:28].astype(np.float32) / 255 - np.asarray(image.mean)) / np.asarray(image.std)
    assert np.allclose(pixels[1].numpy(), second.transpose(3, 0, 1, 2).reshape(-1), atol=1e-6)


def test_qwen3_vl_writes_a_timestamp_before_each_group(tmp_path):
    import numpy as np

    from megatron_mmprolong.data.chat import ChatTokenizer
    from megatron_mmprolong.data.images import ImageParams
    from megatron_mmprolong.data.tiny_tokenizer import write_tiny_tokenizer
    from megatron_mmprolong.eval.video.prompts import VideoPrompt
    from megatron_mmprolong.eval.video.requests import LocalVideoBackend, video_request
    from megatron_mmprolong.eval.video.sampling import FramePlan

    directory = tmp_path / "tok"
    directory.mkdir()
    write_tiny_tokenizer(directory)
    tokenizer = ChatTokenizer(directory)
    frames = np.zeros((4, 64, 96, 3), dtype=np.uint8)
    plan = FramePlan((0, 9, 19, 28), (0.0, 1.125, 2.375, 3.5), 64, 96, 12, 1.0)
    backend = LocalVideoBackend(torch.nn.Linear(1, 1), tokenizer, ImageParams.for_family("qwen3_vl"), "m", "qwen3_vl")
    ids = backend.prompt(video_request(VideoPrompt("", "Q"), frames, plan, 8, served=False))["input_ids"][0].tolist()
    text = tokenizer.decode(ids)
    # group times: the mean of each 2 frames' times, one decimal
    assert "<0.6 seconds><|vision_start|>" + "<|video_pad|>" * 6 + "<|vision_end|>" in text
    assert "<2.9 seconds><|vision_start|>" in text and text.count("<|vision_start|>") == 2
