"""Frozen-feature encoding: the vision tower never trains, so each image is encoded once per
call and training/evaluation run on its patch tokens (identical results, far less compute)."""

from __future__ import annotations

import torch

from medvlm.data.dataset import VQARows
from medvlm.model.vlm import MedVLM


@torch.no_grad()
def with_frozen_features(model: MedVLM, data: VQARows, *, batch_size: int = 256) -> VQARows:
    """Replace pixels (N, 3, H, W) by patch tokens (N, P, D), kept on the CPU."""
    if data.pixels.dim() == 3:  # already encoded
        return data
    device = model.device
    chunks = [model.encode_images(data.pixels[i:i + batch_size].to(device)).cpu()
              for i in range(0, len(data.pixels), batch_size)]
    feats = torch.cat(chunks) if chunks else data.pixels.new_zeros((0, model.vision.num_patches, model.vision.width))
    return data.with_pixels(feats)
