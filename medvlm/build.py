"""Resolve, then assemble: the one place a config's names become a model.

``medvlm/model`` only loads local directories and files it is given. This module turns what a
config names into those paths, then assembles and applies the start state:

- ``model.vision.source`` / ``model.language.source = builtin:<variant>``: the built-in foundation's
  directories (``medvlm.recipes.foundation`` builds them on first use, cached);
- ``model.init = public``: the public start for this architecture (built on first use, cached);
  ``random``: as assembled; any other value: an exported adapter folder (a run's ``global/``);
- ``model.fusion.init``: a ``fusion.safetensors`` file for the fusion alone.

Building a model can therefore train one only here, when a config asks for a built-in model or
the public start that is not cached yet, and never as a side effect of the model code.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from medvlm.config import LanguageConfig, ModelConfig, VisionConfig
from medvlm.model.vlm import MedVLM, assemble_medvlm, assemble_skeleton, read_fusion
from medvlm.tensors import TrainableStateError


def resolve_sources(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with ``builtin:`` sources replaced by local directories (built on first use)."""
    if not (cfg.vision.source.startswith("builtin:") or cfg.language.source.startswith("builtin:")):
        return cfg
    from medvlm.recipes.foundation import builtin_sources

    return builtin_sources(cfg)


def vision_source(cfg: VisionConfig) -> VisionConfig:
    """The vision config with its source resolved (for the image preprocessing alone, say)."""
    if not cfg.source.startswith("builtin:"):
        return cfg
    from medvlm.recipes.foundation import builtin_source

    return replace(cfg, source=builtin_source(cfg.source, "vision"))


def language_source(cfg: LanguageConfig) -> str:
    """The language model's local directory (or the hub id a config named)."""
    from medvlm.model.language import language_model_dir

    if not cfg.source.startswith("builtin:"):
        return language_model_dir(cfg)
    from medvlm.recipes.foundation import builtin_source

    return builtin_source(cfg.source, "lm")


def vision_encoder(cfg: VisionConfig):
    """The frozen vision encoder alone (e.g. for its preprocessing), its source resolved."""
    from medvlm.model.vision import build_vision_encoder

    return build_vision_encoder(vision_source(cfg))


def apply_init(model: MedVLM, cfg: ModelConfig) -> None:
    """``model.init`` (the whole trainable state) then ``model.fusion.init`` (the fusion alone)."""
    if cfg.init == "public":
        from medvlm.files import read_tensors
        from medvlm.recipes.foundation import public_state_path

        path = public_state_path(cfg)
        model.load_adapter_state(read_tensors(path, "it is a cache entry: delete it and it is built again"))
    elif cfg.init != "random":
        from medvlm.runs import load_trainable

        load_trainable(model, cfg.init)
    if cfg.fusion.init == "random":
        return
    state = read_fusion(cfg.fusion.init)
    missing = sorted(k for k in model.trainable_spec() if k.startswith("fusion.") and k not in state)
    if missing:  # a partial file would silently leave the rest at random init
        raise TrainableStateError(f"model.fusion.init={cfg.fusion.init}: missing tensor(s) {missing[:5]}; it was "
                                  "saved for another fusion architecture (model.fusion.*)")
    model.load_trainable_state(state, strict=False)  # LoRA tensors are not in a fusion file


def build_medvlm(cfg: ModelConfig, *, seed: int = 0, device: Optional[str] = None) -> MedVLM:
    """Resolve ``cfg``, assemble the model (seeded), apply its start state, move it to ``device``."""
    model = assemble_medvlm(cfg, resolved=resolve_sources(cfg), seed=seed)
    apply_init(model, cfg)
    if device is not None:
        model.to(device)
    return model


def build_skeleton(cfg: ModelConfig, *, seed: int = 0) -> MedVLM:
    """The coordinator's model: the LLM's base weights never loaded, the start state applied."""
    model = assemble_skeleton(cfg, resolved=resolve_sources(cfg), seed=seed)
    apply_init(model, cfg)
    return model


def initial_trainable_state(cfg: ModelConfig, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """The initial global LoRA + fusion tensors, derived without loading the LLM's weights."""
    return build_skeleton(cfg, seed=seed).trainable_state()
