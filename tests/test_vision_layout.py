"""Window permutation, attention segments and 2D rotary positions equal transformers'."""

import pytest
import torch

from megatron_mmprolong.config import VisionConfig
from megatron_mmprolong.model.vision_layout import build_vision_layout

GRIDS = {
    "one-window": [[1, 8, 8]],
    "windows-cut-by-edges": [[1, 12, 20], [1, 6, 10], [1, 2, 2]],
    "video": [[3, 14, 22]],
    "mixed": [[1, 16, 16], [4, 6, 8], [1, 30, 2]],
}


@pytest.mark.parametrize("window_size", [112, 56])
@pytest.mark.parametrize("name", sorted(GRIDS))
def test_layout_equals_transformers(name, window_size):
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    grids = torch.tensor(GRIDS[name])
    layout = build_vision_layout(grids, VisionConfig(window_size=window_size))
    window_index, cu_windows = get_vision_window_index(grids, 2, window_size, 14)
    assert torch.equal(layout.window_index, window_index)
    assert torch.equal(layout.window_segments.cu_seqlens_q, cu_windows)
    assert torch.equal(layout.frame_segments.cu_seqlens_q, get_vision_cu_seqlens(grids))
    positions = get_vision_position_ids(grids, 2)
    groups = positions.view(-1, 4, 2)[window_index].view(-1, 2)
    assert torch.equal(layout.patch_positions, groups)
    assert torch.equal(layout.window_index[layout.restore_index], torch.arange(len(window_index)))
    lengths = cu_windows.diff()
    assert layout.window_segments.max_seqlen_q == int(lengths.max())


def test_bad_grids_are_errors():
    with pytest.raises(ValueError, match="multiples of 2"):
        build_vision_layout(torch.tensor([[1, 5, 4]]), VisionConfig())
    with pytest.raises(ValueError, match="non-empty"):
        build_vision_layout(torch.zeros(0, 3, dtype=torch.long), VisionConfig())
