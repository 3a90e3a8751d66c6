"""A site's memory while it reads its images: every image read and then copied into train / val / test (until
December 7) against the rows split first and each split's images read into its own tensor (``load_splits``).

Writes a synthetic hospital's folder (PNG, ``--images`` of them), then reads it in a fresh process per way,
pixels at BiomedCLIP's input size (3 × 224 × 224 float32, 0.6 MB an image; patch tokens of 197 × 768 are the
same size), and prints each way's peak memory growth (the process's maximum resident set) against the bytes
the images take:

    python -m benchmarks.site_memory [--images 1000]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def _read(way: str, folder: str) -> None:
    import torch

    from medvlm.config import DataConfig
    from medvlm.data.dataset import from_manifest, load_splits, split_rows

    cfg = DataConfig(source=folder, split_source="redraw")
    preprocess = lambda image: torch.rand(3, 224, 224)    # noqa: E731 (BiomedCLIP's input size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if way == "read all, then split":
        parts = split_rows(from_manifest(folder, preprocess, cfg=cfg), val_fraction=cfg.val_fraction,
                           test_fraction=cfg.test_fraction, seed=cfg.seed)
    else:
        parts = load_splits(cfg, preprocess)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    held = sum(p.pixels.numel() * 4 for p in parts.values())
    print(f"{way:28s} {held / 2**20:8.0f} {grown / 2**20:10.0f} {grown / held:7.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--read", nargs=2, help=argparse.SUPPRESS)     # one way, in its own process
    args = parser.parse_args(argv)
    if args.read:
        _read(*args.read)
        return 0
    from medvlm.data.synthetic import generate_hospital, write_manifest

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "site"
        write_manifest(generate_hospital("general", args.images, seed=0), folder)
        print(f"a site of {args.images} images, pixels 3 x 224 x 224 float32")
        print(f"{'way':28s} {'MiB held':>8s} {'MiB peak':>10s} {'ratio':>7s}")
        for way in ("read all, then split", "split, then read (now)"):
            subprocess.run([sys.executable, "-m", "benchmarks.site_memory", "--read", way, str(folder)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
