"""VQARows: what a set of rows holds (pixels or patch tokens), checked where it is made."""

import pytest


def test_rows_say_whether_they_hold_pixels_or_patch_tokens():
    import torch

    from medvlm.data.dataset import VQARows, concat

    rows = [{"image_index": 0, "question": "q", "answer": "a", "answer_type": "open"}]
    pixels = VQARows(torch.zeros(1, 3, 8, 8), rows)
    assert not pixels.tokens and pixels.select(rows * 2).tokens is False
    tokens = pixels.as_tokens(torch.zeros(1, 4, 16))
    assert tokens.tokens and tokens.select(rows).tokens                 # a selection keeps what it holds
    with pytest.raises(ValueError, match=r"pixels must be a 4-D tensor .* got shape \(1, 4, 16\)"):
        VQARows(torch.zeros(1, 4, 16), rows)
    with pytest.raises(ValueError, match="patch tokens must be a 3-D tensor"):
        VQARows(torch.zeros(1, 3, 8, 8), rows, tokens=True)
    with pytest.raises(ValueError, match="encode them all first"):
        concat([pixels, tokens])
