"""Frozen open_clip vision tower that returns patch tokens.

Every source goes through ``open_clip.create_model_and_transforms`` with a ``local-dir:`` or
``hf-hub:`` name: the built-in tiny ViT is itself written as an open_clip directory laid out
like BiomedCLIP's (``open_clip_config.json`` + weights), so a hospital's offline BiomedCLIP
copy and our tiny default take exactly the same path.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from medvlm.config import VisionConfig


class VisionEncoder(nn.Module):
    """Wraps ``clip.visual``; ``forward`` gives patch tokens (B, P, width), never trained."""

    def __init__(self, visual: nn.Module, preprocess: Callable, source: str):
        super().__init__()
        self.visual = visual
        self.preprocess = preprocess          # PIL image -> (3, H, W) tensor, the encoder's own
        self.source = source
        with torch.no_grad():
            size = visual.image_size if hasattr(visual, "image_size") else (224, 224)
            size = size if isinstance(size, (tuple, list)) else (size, size)
            probe = torch.zeros(1, 3, *size)
            self.num_patches, self.width = self._tokens(probe).shape[1:]
        self.image_size = tuple(size)
        self.freeze()

    def freeze(self) -> None:
        self.visual.requires_grad_(False)
        self.visual.eval()

    def train(self, mode: bool = True) -> "VisionEncoder":
        super().train(mode)
        self.visual.eval()  # frozen: dropout/patch-dropout stay off even while the VLM trains
        return self

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(pixels, indices=1, output_fmt="NLC", intermediates_only=True)
        return out["image_intermediates"][-1]

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: (B, 3, H, W) -> patch tokens (B, P, width)
        return self._tokens(pixels)


def _hf_text_override(directory: Path, hf_text_dir: Optional[str]) -> dict:
    """BiomedCLIP's text tower names a hub model; point it at a local directory instead."""
    cfg_path = directory / "open_clip_config.json"
    text_cfg = json.loads(cfg_path.read_text()).get("model_cfg", {}).get("text_cfg", {})
    if "hf_model_name" not in text_cfg:
        return {}
    if hf_text_dir is None:
        raise ValueError(
            f"{cfg_path} uses a Hugging Face text tower ({text_cfg['hf_model_name']!r}), which would be "
            "fetched from the hub. Set model.vision.hf_text_dir to a local copy of that model's "
            "directory (config + tokenizer) to stay offline.")
    text_cfg = copy.deepcopy(text_cfg)
    text_cfg["hf_model_name"] = hf_text_dir
    text_cfg["hf_tokenizer_name"] = hf_text_dir
    text_cfg["hf_model_pretrained"] = False  # its weights come from the CLIP checkpoint, if at all
    return {"text_cfg": text_cfg}


def open_clip_name(cfg: VisionConfig) -> str:
    """The configured source as an open_clip model name (local-dir:/hf-hub:). A ``builtin:`` source
    is resolved above the model (``medvlm.build``), which builds it on first use."""
    if cfg.source.startswith("builtin:"):
        raise ValueError(f"model.vision.source={cfg.source!r} is not resolved: build models with "
                         "medvlm.build.build_medvlm (it turns builtin: sources into local directories)")
    return cfg.source


def build_vision_encoder(cfg: VisionConfig) -> VisionEncoder:
    import open_clip

    name = open_clip_name(cfg)
    kwargs: dict = {}
    if name.startswith("local-dir:"):
        directory = Path(name.split(":", 1)[1])
        if not (directory / "open_clip_config.json").is_file():
            raise FileNotFoundError(
                f"model.vision.source={cfg.source!r}: {directory} has no open_clip_config.json. A local "
                "vision model directory needs open_clip_config.json and its weights file "
                "(open_clip_model.safetensors or open_clip_pytorch_model.bin), as BiomedCLIP ships them.")
        kwargs = _hf_text_override(directory, cfg.hf_text_dir)
    clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained_text=False, **kwargs)
    visual = clip.visual
    del clip  # the text tower is not used; drop it
    return VisionEncoder(visual, preprocess, cfg.source)
