"""M-RoPE position ids equal transformers' get_rope_index and restart per packed sample."""

import types

import pytest
import torch

from megatron_mmprolong.positions import mrope_position_ids

IMG, VID, VS, VE = 151655, 151656, 151652, 151653


def _tokens(parts):
    ids = []
    for part in parts:
        if isinstance(part, int):
            ids += list(range(100, 100 + part))
        else:
            kind, (t, h, w) = part
            ids += [VS] + [IMG if kind == "i" else VID] * (t * h * w // 4) + [VE]
    return ids


def _reference(ids, image_grid, video_grid, seconds):
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    holder = types.SimpleNamespace(config=Qwen2_5_VLConfig(vision_config={"tokens_per_second": 2}))
    holder.get_vision_position_ids = types.MethodType(Qwen2_5_VLModel.get_vision_position_ids, holder)
    types_ = (ids == IMG).int() + 2 * (ids == VID).int()
    positions, _ = Qwen2_5_VLModel.get_rope_index(
        holder, ids, types_, image_grid, video_grid, seconds
    )
    return positions


def _ours(ids, image_grid, video_grid, seconds, cu_seqlens=None):
    return mrope_position_ids(
        ids, image_token_id=IMG, video_token_id=VID, spatial_merge_size=2,
        image_grid_thw=image_grid, video_grid_thw=video_grid, second_per_grid_ts=seconds,
        tokens_per_second=2, cu_seqlens=cu_seqlens,
    )


CASES = {
    "text-only": ([7], [], [], None),
    "images": ([5, ("i", (1, 4, 6)), 3, ("i", (1, 8, 2)), 4], [(1, 4, 6), (1, 8, 2)], [], None),
    "adjacent-images": ([2, ("i", (1, 2, 2)), ("i", (1, 6, 4)), 1], [(1, 2, 2), (1, 6, 4)], [], None),
    "video": ([3, ("v", (3, 8, 8)), 2], [], [(3, 8, 8)], [0.5]),
    "video-fractional": ([3, ("v", (6, 12, 16)), 2], [], [(6, 12, 16)], [0.25]),
    "mixed": ([5, ("i", (1, 4, 6)), 3, ("v", (4, 12, 12)), 2, ("i", (1, 8, 2)), 4],
              [(1, 4, 6), (1, 8, 2)], [(4, 12, 12)], [0.5]),
}


def _case(name):
    parts, images, videos, seconds = CASES[name]
    ids = torch.tensor([_tokens(parts)])
    image_grid = torch.tensor(images) if images else None
    video_grid = torch.tensor(videos) if videos else None
    seconds = torch.tensor(seconds) if seconds else None
    return ids, image_grid, video_grid, seconds


@pytest.mark.parametrize("name", sorted(n for n in CASES if n != "text-only"))
def test_equal_to_transformers_get_rope_index(name):
    ids, images, videos, seconds = _case(name)
    assert torch.equal(_ours(ids, images, videos, seconds), _reference(ids, images, videos, seconds))


def test_text_only_is_arange_on_three_axes():
    ids, *_ = _case("text-only")
    assert torch.equal(_ours(ids, None, None, None), torch.arange(7).expand(3, 1, 7))


def test_batch_rows_consume_grids_in_order():
    a, b = _case("images"), _case("mixed")
    width = max(a[0].shape[1], b[0].shape[1])
    rows = [torch.nn.functional.pad(x[0], (0, width - x[0].shape[1]), value=7) for x in (a, b)]
    ids = torch.cat(rows)
    images = torch.cat([a[1], b[1]])
    got = _ours(ids, images, b[2], b[3])
    assert torch.equal(got[:, 0, : a[0].shape[1]], _ours(*a)[:, 0])
    assert torch.equal(got[:, 1, : b[0].shape[1]], _ours(*b)[:, 0])


def test_packed_samples_restart_and_equal_each_sample_alone():
    samples = [_case("mixed"), _case("images"), _case("video"), _case("text-only")]
    ids = torch.cat([s[0] for s in samples], dim=1)
    images = torch.cat([s[1] for s in samples if s[1] is not None])
    videos = torch.cat([s[2] for s in samples if s[2] is not None])
    seconds = torch.cat([s[3] for s in samples if s[3] is not None])
    lengths = torch.tensor([s[0].shape[1] for s in samples])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
    packed = _ours(ids, images, videos, seconds, cu_seqlens=cu)
    alone = torch.cat([_ours(*s) for s in samples], dim=2)
    assert torch.equal(packed, alone)
    assert (packed[:, 0, cu[:-1].long()] == 0).all()  # every sample starts at 0


def test_text_after_long_video_resumes_after_its_last_frame():
    # 8 temporal grids at 1.5 s x 2 tokens/s: frames reach position 21 while the grid is 3x3;
    # the original Qwen2.5-VL (and vLLM) resume text at max + 1 over all three axes.
    ids = torch.tensor([_tokens([2, ("v", (8, 6, 6)), 3])])
    got = _ours(ids, None, torch.tensor([[8, 6, 6]]), torch.tensor([1.5]))
    video = ids[0] == VID
    assert got[0, 0, video].max() == 3 + 21
    after = got[:, 0, -4:]  # vision_end, then three text tokens
    assert torch.equal(after, torch.tensor([25, 26, 27, 28]).expand(3, 4))


def test_count_mismatch_is_an_error():
    ids, images, _, _ = _case("images")
    with pytest.raises(ValueError, match="10 image tokens but image_grid_thw describes 14"):
        _ours(ids, torch.tensor([[1, 4, 6], [1, 8, 4]]), None, None)
    with pytest.raises(ValueError, match="no image_grid_thw"):
        _ours(ids, None, None, None)


def test_image_crossing_a_packed_boundary_is_an_error():
    ids, images, _, _ = _case("images")
    cu = torch.tensor([0, 8, ids.shape[1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="crosses a packed-sample boundary"):
        _ours(ids, images, None, None, cu_seqlens=cu)
