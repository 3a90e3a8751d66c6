import json

import pytest
import torch

from medvlm.config import DataConfig, DicomConfig
from medvlm.data.dataset import VQADataset, from_manifest
from medvlm.data.images import load_image
from medvlm.data.synthetic import generate_hospital, write_manifest
from medvlm.features import FeatureCache, cached_encoder, with_frozen_features
from tests.conftest import TINY_OVERRIDES


def test_frozen_features_give_the_same_outputs_as_pixels(tiny_model, tiny_splits):
    data = tiny_splits["test"]
    feats = with_frozen_features(tiny_model, data)
    assert feats.pixels.shape == (len(data.pixels), tiny_model.vision.num_patches, tiny_model.vision.width)
    assert with_frozen_features(tiny_model, feats) is feats  # already encoded: no second pass
    a = VQADataset(data, tiny_model.tokenizer, 32)
    b = VQADataset(feats, tiny_model.tokenizer, 32)
    batch_a = [torch.stack(x) for x in zip(*[a[i] for i in range(6)])]
    batch_b = [torch.stack(x) for x in zip(*[b[i] for i in range(6)])]
    tiny_model.eval()
    with torch.no_grad():
        la, _ = tiny_model(*batch_a)
        lb, _ = tiny_model(*batch_b)
    assert torch.allclose(la, lb, atol=1e-5)


# ----------------------------------------------------------------------------- the on-disk cache
@pytest.fixture
def dicom_folder(tmp_path):
    write_manifest(generate_hospital("general", 5, seed=0), tmp_path / "data", image_format="dicom")
    return tmp_path / "data"


def counting_loader(model, calls):
    def load(path):
        calls.append(path)
        return model.vision.preprocess(load_image(path))
    return load


def test_cache_gives_identical_features_and_skips_decoding(tiny_model, dicom_folder, tmp_path):
    paths = sorted(str(p) for p in (dicom_folder / "images").iterdir())
    calls = []
    first = FeatureCache(tmp_path / "cache", tiny_model, {"dicom": {}})
    cold = first(paths, counting_loader(tiny_model, calls))
    assert len(calls) == 5 and first.misses == 5 and first.hits == 0
    assert len(list(first.dir.glob("*/*.safetensors"))) == 5
    calls.clear()
    second = FeatureCache(tmp_path / "cache", tiny_model, {"dicom": {}})   # a new process, same encoder
    warm = second(paths, counting_loader(tiny_model, calls))
    assert calls == [] and second.hits == 5 and second.misses == 0
    assert torch.equal(cold, warm)
    direct = with_frozen_features(tiny_model, from_manifest(str(dicom_folder), tiny_model.vision.preprocess))
    # the same tokens the in-memory path gives (row order: images in manifest order = file order)
    assert torch.allclose(direct.pixels, warm, atol=1e-6)


def test_cache_is_invalidated_by_weights_and_settings(tiny_model, dicom_folder, tmp_path):
    base = FeatureCache(tmp_path / "cache", tiny_model, {"dicom": {"frame": "middle"}})
    other_settings = FeatureCache(tmp_path / "cache", tiny_model, {"dicom": {"frame": "first"}})
    assert base.dir != other_settings.dir
    with torch.no_grad():
        next(tiny_model.vision.parameters()).add_(1e-3)
    changed = FeatureCache(tmp_path / "cache", tiny_model, {"dicom": {"frame": "middle"}})
    assert changed.dir != base.dir
    info = json.loads((base.dir / "cache.json").read_text())
    assert info["fingerprint"] == base.fingerprint and info["settings"] == {"dicom": {"frame": "middle"}}


def test_a_torn_entry_is_encoded_again(tiny_model, dicom_folder, tmp_path):
    paths = sorted(str(p) for p in (dicom_folder / "images").iterdir())
    cache = FeatureCache(tmp_path / "cache", tiny_model, {})
    good = cache(paths, counting_loader(tiny_model, []))
    entry = sorted(cache.dir.glob("*/*.safetensors"))[0]
    entry.write_bytes(b"garbage")
    again = FeatureCache(tmp_path / "cache", tiny_model, {})
    assert torch.equal(again(paths, counting_loader(tiny_model, [])), good)
    assert again.misses == 1 and again.hits == 4


def test_a_hospital_caches_in_its_state_dir(dicom_folder, tmp_path):
    import shlex

    from client.site import build_site

    run_config = {"preset": "tiny", "overrides": shlex.join(TINY_OVERRIDES)}
    node = {"hospital": "st-mary", "data-path": str(dicom_folder), "state-dir": str(tmp_path / "state"), "epsilon": 8.0}
    site = build_site(run_config, node)
    entries = list((tmp_path / "state" / "features").glob("*/*/*.safetensors"))
    assert site.train.pixels.dim() == 3                  # of 5 images, the test split's is never read at a site
    assert len(entries) == len(site.train.pixels) + len(site.val.pixels) == 4
    again = build_site(run_config, node)       # the next round's process: same features, read back
    assert torch.equal(again.train.pixels, site.train.pixels)
    dealt = build_site({**run_config, "overrides": shlex.join([*TINY_OVERRIDES, "data.partition=iid"])}, node)
    assert torch.equal(dealt.train.pixels, site.train.pixels)   # a site's own folder is never dealt out
    assert cached_encoder(site.model, None, DataConfig()) is None
    assert DicomConfig().frame == "middle"


def test_a_warm_cache_skips_decoding_in_the_check_too(tiny_model, dicom_folder, tmp_path, monkeypatch):
    import medvlm.data.manifest as manifest_module

    cache = cached_encoder(tiny_model, tmp_path / "cache", DataConfig())
    cold = from_manifest(str(dicom_folder), tiny_model.vision.preprocess, encode_files=cache)
    decoded = []
    real = manifest_module.load_image
    monkeypatch.setattr(manifest_module, "load_image", lambda p, d=None: decoded.append(p) or real(p, d))
    warm = from_manifest(str(dicom_folder), tiny_model.vision.preprocess,
                         encode_files=cached_encoder(tiny_model, tmp_path / "cache", DataConfig()))
    assert decoded == [] and torch.equal(cold.pixels, warm.pixels)
    changed = dicom_folder / "images" / "00001.dcm"          # a file replaced by a broken one is checked again
    changed.write_bytes(b"not a dicom any more")
    with pytest.raises(ValueError, match="00001.dcm"):
        from_manifest(str(dicom_folder), tiny_model.vision.preprocess,
                      encode_files=cached_encoder(tiny_model, tmp_path / "cache", DataConfig()))
    assert decoded == [str(changed)]


def test_a_site_that_does_not_fit_in_memory_is_refused_with_the_figures(tiny_model, dicom_folder, tmp_path,
                                                                        monkeypatch):
    """Allocation succeeds on Linux whatever its size: a site that outgrew its machine was killed by the kernel
    part-way through reading its images, with nothing said."""
    import collections

    import psutil

    paths = sorted(str(p) for p in (dicom_folder / "images").iterdir())
    cache = FeatureCache(tmp_path / "cache", tiny_model, {"dicom": {}})
    fits = cache(paths, counting_loader(tiny_model, []))            # one tensor, filled in place
    assert fits.shape == (5, tiny_model.vision.num_patches, tiny_model.vision.width) and fits.is_contiguous()
    memory = collections.namedtuple("svmem", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(available=fits.numel() * 4 - 1))
    with pytest.raises(MemoryError, match=r"the images' patch tokens: 5 image\(s\) × \d+ × \d+ float32 values need "
                                          r"0\.0 GiB, and this machine has 0\.0 GiB free: give this site fewer images"):
        FeatureCache(tmp_path / "cache", tiny_model, {"dicom": {}})(paths, counting_loader(tiny_model, []))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(available=0))
    with pytest.raises(MemoryError, match=r"the images' pixels: 5 image\(s\) × 3 × \d+ × \d+ float32"):
        from_manifest(str(dicom_folder), tiny_model.vision.preprocess)


@pytest.mark.parametrize("split_source", ["dataset", "redraw"])
def test_a_site_reads_each_split_s_images_once_into_the_same_splits(tiny_model, tmp_path, split_source):
    """load_splits splits a folder's rows first and reads each split's images into its own tensor: the same rows
    over the same pixels (or cached tokens) as reading every image and then copying them into the splits, which
    held every image twice."""
    from medvlm.data.dataset import load_splits, published_splits, split_rows

    hospital = generate_hospital("general", 24, seed=0)
    write_manifest(hospital, tmp_path / "data")
    if split_source == "dataset":                                    # a release's own split on every row
        rows = [json.loads(line) for line in (tmp_path / "data" / "manifest.jsonl").read_text().splitlines()]
        for r in rows:
            r["split"] = "test" if r["image"].endswith(("0.png", "5.png")) else "train"
        (tmp_path / "data" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(tmp_path / "data"), split_source=split_source)
    preprocess = tiny_model.vision.preprocess
    everything = from_manifest(cfg.source, preprocess, cfg=cfg)
    before = published_splits(everything, val_fraction=cfg.val_fraction, seed=cfg.seed) \
        if split_source == "dataset" else None
    before = before or split_rows(everything, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                                  seed=cfg.seed)
    for encode in (None, FeatureCache(tmp_path / "cache", tiny_model, {"dicom": {}})):
        after = load_splits(cfg, preprocess, encode_files=encode)
        assert after.keys() == before.keys()
        for name, part in after.items():
            assert part.rows == before[name].rows and part.tokens == (encode is not None)
            want = with_frozen_features(tiny_model, before[name]).pixels if encode else before[name].pixels
            assert part.pixels.shape == want.shape and torch.allclose(part.pixels, want, atol=1e-5), name
    calls = []
    site = load_splits(cfg, counting_loader_of(preprocess, calls), only=("train", "val"))   # what a site reads
    assert site.keys() == {"train", "val"} and len(calls) == len(site["train"].pixels) + len(site["val"].pixels)


def counting_loader_of(preprocess, calls):
    def counted(image):
        calls.append(image)
        return preprocess(image)
    return counted
