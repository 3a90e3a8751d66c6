"""Frozen-feature cache: what one hospital round costs with and without it, side by side.

A deployed hospital's ClientApp is a new process every round, so without the on-disk cache every
round reads and decodes every image and runs it through the frozen encoder before training; with
it, a round reads the cached patch tokens. This times, in one process on the same data folder
(synthetic DICOM, written first):

    no cache     data check + decode + preprocess + encode, then one local DP-SGD epoch
    cache, cold  the same, writing the cache (a hospital's first round)
    cache, warm  data check + cached tokens, then the same epoch (every later round)

    python -m benchmarks.feature_cache [--images 300] [--repeats 2] [--encoder vit-b-16] [overrides ...]

``--encoder vit-b-16`` writes a random-weight ViT-B/16 (BiomedCLIP's vision shape, 224 px, 197
tokens of 768) as an open_clip directory and uses it; ``model.vision.source=local-dir:...``
takes a real one.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch


def _round(cfg, model, *, cache_dir):
    from medvlm.data.dataset import load_splits
    from medvlm.features import cached_encoder, with_frozen_features
    from medvlm.train import calibrated, train_local

    t0 = time.perf_counter()
    splits = load_splits(cfg.data, model.vision.preprocess,
                         encode_files=cached_encoder(model, cache_dir, cfg.data) if cache_dir else None)
    train = with_frozen_features(model, splits["train"])
    with_frozen_features(model, splits["val"])
    prepared = time.perf_counter() - t0
    t1 = time.perf_counter()
    train_local(model, train, train=cfg.train, privacy=calibrated(cfg.privacy, len(train), cfg.train), progress=False)
    return prepared, time.perf_counter() - t1


def write_vit_b16(directory: Path) -> str:
    """A random ViT-B/16 open_clip directory (config + weights), built from open_clip's own config."""
    import json

    import open_clip
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("ViT-B-16")}))
    torch.manual_seed(0)
    clip = open_clip.create_model("local-dir:" + str(directory))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(directory / "open_clip_model.safetensors"))
    return f"local-dir:{directory}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each variant")
    parser.add_argument("--encoder", choices=["config", "vit-b-16"], default="config",
                        help="config: the preset's encoder (the tiny built-in ViT)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from medvlm.build import build_medvlm
    from medvlm.config import load_config
    from medvlm.data.synthetic import generate_hospital, write_manifest
    from medvlm.train import resolve_device

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pacs"
        write_manifest(generate_hospital("general", args.images, seed=0), folder, image_format="dicom")
        overrides = ["train.epochs=1", f"data.source={folder}", *args.overrides]
        if args.encoder == "vit-b-16":
            overrides += [f"model.vision.source={write_vit_b16(Path(tmp) / 'vit-b-16')}", "model.init=random"]
        cfg = load_config("tiny", overrides)
        model = build_medvlm(cfg.model, seed=0).to(resolve_device(cfg.train.device))
        _round(cfg, model, cache_dir=None)       # warm-up (allocator, kernels)
        rows = {}
        rows["no cache"] = min((_round(cfg, model, cache_dir=None) for _ in range(args.repeats)), key=sum)
        cold = []
        for i in range(args.repeats):
            cold.append(_round(cfg, model, cache_dir=Path(tmp) / f"cache-{i}"))
        rows["cache, cold"] = min(cold, key=sum)
        rows["cache, warm"] = min((_round(cfg, model, cache_dir=Path(tmp) / "cache-0") for _ in range(args.repeats)),
                                  key=sum)

    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    encoder = "random ViT-B/16" if args.encoder == "vit-b-16" else cfg.model.vision.source
    print(f"feature cache, {args.images} DICOM images, {encoder}, 1 local DP-SGD epoch; "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}")
    print(f"{'':14s}{'prepare s':>10s}{'epoch s':>9s}{'round s':>9s}{'vs no cache':>13s}")
    base = sum(rows["no cache"])
    for name, (prep, epoch) in rows.items():
        print(f"{name:14s}{prep:10.2f}{epoch:9.2f}{prep + epoch:9.2f}{base / (prep + epoch):12.2f}x")
    print(f"data preparation: no cache / warm cache = {rows['no cache'][0] / rows['cache, warm'][0]:.2f}x")


if __name__ == "__main__":
    main()
