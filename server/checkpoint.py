"""Checkpoints and resume: after every round the run folder holds the global state in formats
anyone can load, and the server state needed to carry on after the last completed round.

    <run>/checkpoints/round-007/  adapter_config.json + adapter_model.safetensors (PEFT) + fusion.safetensors
    <run>/global/                 the same, for the latest round (what users load)
    <run>/server-state.json       round, config, per-round records, hospitals' privacy reports
    <run>/checkpoints/round-007/server-optimizer.safetensors   a server optimizer's state (fedavgm,
                                  fedadam, fedyogi), by <slot>/<tensor name>; not in global/

Each round is written to a temporary folder and renamed; ``server-state.json`` is replaced
atomically last, so a crash at any point leaves the previous round's checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

from medvlm.config import ExperimentConfig, to_dict
from medvlm.files import atomic_path
from medvlm.model.vlm import MedVLM
from medvlm.runs import export_trainable, load_trainable, write_json

STATE_FILE = "server-state.json"
OPTIMIZER_FILE = "server-optimizer.safetensors"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, current: ExperimentConfig) -> list[str]:
    """Keys whose value differs between a run's saved config and this one, except federation.rounds
    (a run may be extended). Resuming with any other change would mix two experiments."""
    old, new = _flatten(saved), _flatten(to_dict(current))
    keys = sorted((set(old) | set(new)) - {"federation.rounds"})
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


class Checkpoints:
    def __init__(self, run_dir: str | Path, skeleton: MedVLM):
        self.run_dir = Path(run_dir)
        self.skeleton = skeleton  # loads/exports trainable states; the LLM's weights are never loaded

    def save(self, server_round: int, state: dict[str, torch.Tensor], server_state: dict, *,
             optimizer: Optional[Mapping[str, np.ndarray]] = None) -> Path:
        """``optimizer``: a server optimizer's state (``Screened.optimizer_state``), kept with the round."""
        from safetensors.numpy import save_file

        self.skeleton.load_trainable_state(state)
        final = self.run_dir / "checkpoints" / f"round-{server_round:03d}"
        with atomic_path(final) as tmp:
            export_trainable(self.skeleton, tmp)
            if optimizer:
                save_file({k: np.ascontiguousarray(v) for k, v in optimizer.items()}, str(tmp / OPTIMIZER_FILE))
        write_json(self.run_dir / STATE_FILE, {**server_state, "round": server_round,
                                               "checkpoint": str(final.relative_to(self.run_dir))})
        with atomic_path(self.run_dir / "global") as tmp:   # the exported adapter: always a whole one
            shutil.copytree(final, tmp, ignore=shutil.ignore_patterns(OPTIMIZER_FILE))
        return final

    def optimizer_state(self, server_state: dict) -> dict[str, np.ndarray]:
        """The server optimizer's state saved with the checkpoint ``server_state`` names ({} if none)."""
        from medvlm.files import read_tensors

        path = self.run_dir / server_state["checkpoint"] / OPTIMIZER_FILE
        if not path.is_file():
            return {}
        return read_tensors(path, "restore it from a copy, or resume from an earlier round's checkpoint, or start a "
                                  "new run folder", framework="numpy")

    def load(self, cfg: ExperimentConfig) -> Optional[tuple[dict, dict[str, torch.Tensor]]]:
        """(server state, global state) of the last completed round, or None for a fresh run."""
        path = self.run_dir / STATE_FILE
        if not path.exists():
            return None
        try:
            server_state = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); restore it or start a new run folder") from None
        changes = config_changes(server_state.get("config", {}), cfg)
        if changes:
            raise ValueError(f"{self.run_dir} was started with another configuration ({'; '.join(changes[:5])}); "
                             "resume it with the same config (only federation.rounds may change) or use a new "
                             "run folder")
        load_trainable(self.skeleton, self.run_dir / server_state["checkpoint"])
        return server_state, self.skeleton.trainable_state()
