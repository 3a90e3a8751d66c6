"""Run folders: what a training run leaves behind, in formats others can load.

``global/`` is a standard PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``, loadable with ``PeftModel.from_pretrained``), the fusion
module is ``fusion.safetensors``, and ``summary.json`` holds the figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from medvlm.config import ExperimentConfig, to_dict
from medvlm.files import read_tensors
from medvlm.model.vlm import RESTORE, MedVLM, read_fusion, save_fusion


def new_run_dir(root: str | Path, kind: str, name: Optional[str] = None) -> Path:
    path = Path(root) / (name or f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}")
    path.mkdir(parents=True, exist_ok=name is not None)
    return path


def save_config(cfg: ExperimentConfig, run_dir: Path) -> None:
    from medvlm.files import write_text

    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(to_dict(cfg)))   # UTF-8, as OmegaConf reads it


def saved_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The config a run folder was saved with (``config.yaml``, :func:`save_config`), plus ``overrides``.
    (Not Flower's run config: that is the federation's, ``medvlm.config.from_run_config``.)"""
    from medvlm.config import load_config

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: not a medvlm-fl run folder (give the folder "
                                "`medvlm-fl simulate` or `train-local` wrote)")
    if not path.read_bytes().strip():   # read as every default: the wrong base model, named as if that were the fault
        raise ValueError(f"{path} is empty: the run's settings are lost; restore it from a copy (the run's "
                         "checkpoints hold the weights, not the settings)")
    return load_config(str(path), list(overrides))


BASE_FILE = "base.json"
_LM_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def base_identity(model: MedVLM) -> dict:
    """What an adapter needs of its frozen base models: their sources (informative) and the shapes
    that must match (checked on load)."""
    lm = model.language.get_base_model().config
    return {"vision_source": model.cfg.vision.source, "language_source": model.cfg.language.source,
            "vision_width": int(model.vision.width), "language": {k: getattr(lm, k, None) for k in _LM_KEYS}}


def check_base(model: MedVLM, directory: Path) -> None:
    """Refuse an adapter exported for another base model, naming what differs and what it needs."""
    path = directory / BASE_FILE
    if not path.is_file():
        return   # exported before base.json existed: the tensor checks below still apply
    try:
        want = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): {RESTORE}") from None
    if not isinstance(want, dict):
        raise ValueError(f"{path} is not a base-model record (a JSON object): {RESTORE}")
    have = base_identity(model)
    diffs = [f"{k}: adapter {want['language'].get(k)!r}, this model {v!r}" for k, v in have["language"].items()
             if want.get("language", {}).get(k) != v]
    if want.get("vision_width") != have["vision_width"]:
        diffs.append(f"vision width: adapter {want.get('vision_width')}, this model {have['vision_width']}")
    if diffs:
        raise ValueError(f"{directory}: this adapter was trained on vision {want.get('vision_source')!r} + language "
                         f"{want.get('language_source')!r}, which is not the base model loaded here (vision "
                         f"{have['vision_source']!r} + language {have['language_source']!r}): {'; '.join(diffs)}. "
                         "Load it with the base models it was trained on (model.vision.source / model.language.source)")


def export_trainable(model: MedVLM, directory: str | Path) -> Path:
    """Write the adapter (PEFT format), the fusion weights (safetensors) and ``base.json`` (the base
    models the adapter belongs to)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.language.save_pretrained(directory)
    save_fusion(model.trainable_state(), directory / "fusion.safetensors")
    write_json(directory / BASE_FILE, base_identity(model))
    return directory


def load_trainable(model: MedVLM, directory: str | Path) -> None:
    """Load an exported adapter + fusion into ``model`` (validated against its allow-list)."""
    from medvlm.tensors import TrainableStateError

    directory = Path(directory)
    for name in ("adapter_model.safetensors", "fusion.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name}: not an exported medvlm adapter directory")
    check_base(model, directory)
    try:
        _load_checked(model, directory)
    except TrainableStateError as err:
        raise TrainableStateError(f"{directory}: the adapter does not fit this model ({err}); was it trained on "
                                  "another base model, fusion or LoRA configuration?") from None


def _load_checked(model: MedVLM, directory: Path) -> None:
    state = read_fusion(directory / "fusion.safetensors")
    adapter = read_tensors(directory / "adapter_model.safetensors", RESTORE)
    by_suffix = {k.replace(".default.", "."): k for k in model.adapter_spec() if k.startswith("language.")}
    for key, value in adapter.items():
        ours = by_suffix.get("language." + key)
        if ours is None:
            raise ValueError(f"{directory}: adapter tensor {key!r} does not exist in this model "
                             "(was it trained on another base model or LoRA configuration?)")
        state[ours] = value
    model.load_adapter_state(state)


def write_json(path: Path, data: dict) -> None:
    from medvlm.files import write_text

    write_text(path, json.dumps(data, indent=2, default=float))
