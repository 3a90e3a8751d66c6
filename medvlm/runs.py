"""Run folders: what a training run leaves behind, in formats others can load.

``global/`` is a standard PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``, loadable with ``PeftModel.from_pretrained``), the fusion
module is ``fusion.safetensors``, and ``summary.json`` holds the figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from safetensors.torch import load_file

from medvlm.config import ExperimentConfig, to_dict
from medvlm.model.vlm import MedVLM, read_fusion, save_fusion


def new_run_dir(root: str | Path, kind: str, name: Optional[str] = None) -> Path:
    path = Path(root) / (name or f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}")
    path.mkdir(parents=True, exist_ok=name is not None)
    return path


def save_config(cfg: ExperimentConfig, run_dir: Path) -> None:
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(to_dict(cfg)))


def export_trainable(model: MedVLM, directory: str | Path) -> Path:
    """Write the adapter (PEFT format) and the fusion weights (safetensors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.language.save_pretrained(directory)
    save_fusion(model.trainable_state(), directory / "fusion.safetensors")
    return directory


def load_trainable(model: MedVLM, directory: str | Path) -> None:
    """Load an exported adapter + fusion into ``model`` (validated against its allow-list)."""
    directory = Path(directory)
    for name in ("adapter_model.safetensors", "fusion.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name}: not an exported medvlm adapter directory")
    state = read_fusion(directory / "fusion.safetensors")
    adapter = load_file(str(directory / "adapter_model.safetensors"))
    by_suffix = {k.replace(".default.", "."): k for k in model.adapter_spec() if k.startswith("language.")}
    for key, value in adapter.items():
        ours = by_suffix.get("language." + key)
        if ours is None:
            raise ValueError(f"{directory}: adapter tensor {key!r} does not exist in this model "
                             "(was it trained on another base model or LoRA configuration?)")
        state[ours] = value
    model.load_adapter_state(state)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    tmp.replace(path)
