"""Frozen-feature encoding: the vision tower never trains, so each image is encoded once and
training/evaluation run on its patch tokens (identical results, far less compute).

:class:`FeatureCache` keeps those patch tokens on disk, one file per image, in the hospital's
state directory (never sent anywhere): a deployed hospital's ClientApp is a new process every
round, and without the cache it would decode and re-encode every image every round. Entries are
addressed by the image file's content hash inside a folder named by a fingerprint of everything
that shapes the output: the encoder's weights, its preprocessing (size, normalisation), the
DICOM reading settings, the device type (GPU encodes in bf16) and this cache's format version.
Change any of them and the old folder is simply never read again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
from tqdm import tqdm

from medvlm.data.dataset import VQARows, reserve
from medvlm.model.vlm import MedVLM

log = logging.getLogger(__name__)

CACHE_VERSION = 3   # 2: 16-bit grey PNG / TIFF over their own range, PALETTE COLOR DICOM in colour (data.images);
                    # 3: transparent images laid on white, photographs turned by their EXIF orientation


@torch.no_grad()
def with_frozen_features(model: MedVLM, data: VQARows, *, batch_size: int = 256) -> VQARows:
    """Replace pixels (N, 3, H, W) by patch tokens (N, P, D), kept on the CPU."""
    if data.tokens:  # already encoded
        return data
    device = model.device
    chunks = [model.encode_images(data.pixels[i:i + batch_size].to(device)).cpu()
              for i in range(0, len(data.pixels), batch_size)]
    feats = torch.cat(chunks) if chunks else data.pixels.new_zeros((0, model.vision.num_patches, model.vision.width))
    return data.as_tokens(feats)


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encoder_fingerprint(model: MedVLM, settings: Mapping[str, object]) -> str:
    """sha256 over the vision weights (names, dtypes, shapes, bytes), preprocessing and settings."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.vision.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(repr(model.vision.preprocess).encode())
    h.update(json.dumps({**settings, "device": model.device.type, "version": CACHE_VERSION},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


class FeatureCache:
    """Per-image patch tokens of ``model``'s frozen encoder under
    ``root/<fingerprint>/<hash[:2]>/<hash>.safetensors``. Call it like ``encode_files``
    (paths, load) -> tokens; ``cached(path)`` tells the data checks that a file is known good."""

    def __init__(self, root: str | Path, model: MedVLM, settings: Mapping[str, object], *, progress: bool = False):
        self.model, self.progress = model, progress
        self.fingerprint = encoder_fingerprint(model, settings)
        self.dir = Path(root) / self.fingerprint[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        info = self.dir / "cache.json"
        if not info.is_file():
            info.write_text(json.dumps({"fingerprint": self.fingerprint, "encoder": model.vision.source,
                                        "preprocess": repr(model.vision.preprocess), "settings": dict(settings),
                                        "device": model.device.type, "version": CACHE_VERSION},
                                       indent=2, default=str))
        self.hits = self.misses = 0
        self._digests: dict[tuple, str] = {}

    def digest(self, path: str | Path) -> str:
        """The file's content hash, computed once per (path, size, mtime) in this process."""
        st = os.stat(path)
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = file_digest(path)
        return self._digests[key]

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def cached(self, path: str | Path) -> bool:
        """An entry exists for this exact file content: it was decoded (with these settings) before."""
        try:
            return self._path(self.digest(path)).is_file()
        except OSError:
            return False

    def get(self, key: str) -> Optional[torch.Tensor]:
        from safetensors.torch import load_file

        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["features"]
        except Exception as err:  # a torn or foreign file: encode again (and overwrite it)
            log.warning("feature cache entry %s is unreadable (%s); encoding that image again", path, err)
            return None

    def put(self, key: str, features: torch.Tensor) -> None:
        from safetensors.torch import save_file

        from medvlm.files import atomic_path

        with atomic_path(self._path(key)) as tmp:   # readers see a whole entry or none
            save_file({"features": features.contiguous()}, str(tmp))

    @torch.no_grad()
    def __call__(self, paths: Sequence[str], load: Callable[[str], torch.Tensor], *,
                 batch_size: int = 64) -> torch.Tensor:
        """Patch tokens (N, P, D) for image files: cached ones read, the rest decoded
        (``load``: path -> preprocessed pixels), encoded and written to the cache."""
        model, started = self.model, time.perf_counter()
        keys = [self.digest(p) for p in paths]
        out: Optional[torch.Tensor] = None   # one tensor filled in place (a list stacked at the end held
        todo = []                            # every image twice), sized by the first image's tokens

        def place(i: int, feats: torch.Tensor) -> None:
            nonlocal out
            if out is None:
                out = reserve((len(paths), *feats.shape), "the images' patch tokens")
            out[i] = feats

        for i, key in enumerate(keys):
            feats = self.get(key)
            if feats is None or out is not None and feats.shape != out.shape[1:]:   # a foreign entry: encode
                todo.append(i)
            else:
                place(i, feats)
        self.hits += len(paths) - len(todo)
        self.misses += len(todo)
        batches = [todo[s:s + batch_size] for s in range(0, len(todo), batch_size)]
        for batch in tqdm(batches, desc="encode images", disable=not self.progress or not batches):
            pixels = torch.stack([load(paths[i]) for i in batch]).to(model.device)
            for i, feats in zip(batch, model.encode_images(pixels).cpu()):
                self.put(keys[i], feats)
                place(i, feats)
        log.info("feature cache %s: %d image(s) read, %d encoded (%.1fs)", self.dir, len(paths) - len(todo),
                 len(todo), time.perf_counter() - started)
        return out if out is not None else torch.zeros((0, model.vision.num_patches, model.vision.width))



def cached_encoder(model: MedVLM, root: Optional[str | Path], data_cfg, *,
                   progress: bool = False) -> Optional[FeatureCache]:
    """The ``encode_files`` for :func:`medvlm.data.dataset.load_splits`: a FeatureCache in ``root``
    (None: no cache; images are decoded and encoded in memory as before)."""
    if root is None:
        return None
    from dataclasses import asdict

    return FeatureCache(root, model, {"dicom": asdict(data_cfg.dicom)}, progress=progress)
