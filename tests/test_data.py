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


def _image_keys(rows) -> dict[bytes, list[tuple]]:
    """Each image (by its bytes) with its questions and answers: what a split holds, whoever holds it."""
    out: dict[bytes, list[tuple]] = {}
    for r in rows.rows:
        out.setdefault(rows.pixels[r["image_index"]].numpy().tobytes(), []).append((r["question"], r["answer"]))
    return out


def test_an_iid_partition_deals_the_same_images_out_at_random_in_the_same_shares():
    import numpy as np
    import torch

    from medvlm.config import DataConfig
    from medvlm.data.dataset import load_splits

    preprocess = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32))[None]  # noqa: E731
    own = DataConfig(hospitals=["general", "oncology", "cardiac"], images_per_hospital=90, hospital_only=True)
    iid = DataConfig(**{**own.__dict__, "partition": "iid"})
    for split in ("train", "val", "test"):   # pooled: the same images with the same questions, either way
        a, b = _image_keys(load_splits(own, preprocess)[split]), _image_keys(load_splits(iid, preprocess)[split])
        assert a.keys() == b.keys() and all(sorted(a[k]) == sorted(b[k]) for k in a)
    sites = {h: load_splits(iid, preprocess, hospitals=[h]) for h in own.hospitals}
    mine = {h: load_splits(own, preprocess, hospitals=[h]) for h in own.hospitals}
    for split in ("train", "val", "test"):
        held = [set(_image_keys(sites[h][split])) for h in own.hospitals]
        assert sum(map(len, held)) == len(set().union(*held))               # no image dealt twice
        assert [len(s) for s in held] == [len(mine[h][split].pixels) for h in own.hospitals]
    onc = sites["oncology"]["train"]          # oncology's own profile holds no pacemaker; dealt at random it does
    assert any(r["qtype"] == "device" and r["answer"] == "yes" for r in onc.rows)
    assert not any(r["qtype"] == "device" and r["answer"] == "yes" for r in mine["oncology"]["train"].rows)
    assert set(_image_keys(onc)) != set(_image_keys(mine["oncology"]["train"]))
    again = load_splits(iid, preprocess, hospitals=["oncology"])["train"]   # the deal is the seed's
    assert torch.equal(again.pixels, onc.pixels) and again.rows == onc.rows
    other = load_splits(DataConfig(**{**iid.__dict__, "seed": 1}), preprocess, hospitals=["oncology"])["train"]
    assert not (other.pixels.shape == onc.pixels.shape and torch.equal(other.pixels, onc.pixels))
    with pytest.raises(ValueError, match=r"'rural'\] is not one of them"):
        load_splits(iid, preprocess, hospitals=["rural"])
    with pytest.raises(ValueError, match="data.partition.*a site's own data, not dealt out"):
        DataConfig(source="/data/pacs", partition="iid")
    with pytest.raises(ValueError, match=r"data.partition='random' is invalid: use one of \['own', 'iid'\]"):
        DataConfig(partition="random")
