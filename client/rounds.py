"""Idempotent rounds: a hospital asked again for a round it already trained and charged sends the
update it kept, instead of training (and spending privacy) a second time.

A coordinator that crashes after the hospitals trained a round, but before it received or
aggregated their replies, asks for the same round again when it resumes from its checkpoint: the
same round number, the same global state, the same round settings. That request has the same
:func:`request_key`. The hospital keeps each charged round's update (``<state dir>/rounds/``) and
its ledger records which request the update answered, so the same request gets the same update
back: nothing new is released, so nothing new is spent. Any other request (another global state,
another learning rate or stage) is a new release and is trained and charged as such.

The order of writes makes a crash at any point safe: the update is kept first, then the ledger
records the charge, then the reply is sent. An update kept but never recorded (a crash in between)
is never sent: the round is trained again. A hospital that dies mid-training has charged nothing.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

from medvlm.files import atomic_path

log = logging.getLogger("medvlm.client")

ROUNDS_DIR = "rounds"
KEEP_ROUNDS = 2          # the latest charged rounds whose updates are kept (a resume re-asks the last one)
# the round settings that shape an update (num-rounds is not one: the noise is fixed per stage)
KEY_SETTINGS = ("server-round", "local-epochs", "lr", "lr-from", "lr-to", "transport", "stage", "frozen-digest")
KEPT_METRICS = ("train_loss", "steps", "seconds")


def request_key(arrays: Mapping[object, np.ndarray], config: Mapping[str, object]) -> str:
    """sha256 over the received global state (names, dtypes, shapes, bytes) and the round settings."""
    h = hashlib.sha256()
    for name in sorted(arrays, key=str):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    for key in KEY_SETTINGS:
        h.update(f"{key}={config.get(key)!r};".encode())
    return h.hexdigest()


def _path(state_dir: str | Path, server_round: int) -> Path:
    return Path(state_dir) / ROUNDS_DIR / f"round-{server_round}.safetensors"


def keep(state_dir: str | Path, server_round: int, key: str, state: Mapping[str, torch.Tensor],
         metrics: Mapping[str, float]) -> Path:
    """Keep a round's update (atomically) before the ledger records its charge; older rounds' go."""
    from safetensors.torch import save_file

    path = _path(state_dir, server_round)
    meta = {"key": key, "round": str(server_round), **{k: repr(float(metrics[k])) for k in KEPT_METRICS if k in metrics}}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    rounds = sorted((int(p.stem.split("-")[1]), p) for p in path.parent.glob("round-*.safetensors")
                    if p.stem.split("-")[1].isdigit())
    for r, old in rounds[:-KEEP_ROUNDS]:
        if r != server_round:
            old.unlink(missing_ok=True)
    return path


def kept(state_dir: str | Path, ledger, server_round: int, key: str) -> Optional[tuple[dict, dict]]:
    """(state, metrics) of the update this request already got, if the ledger charged it; else None."""
    if ledger.kept.get(str(server_round)) != key:
        return None
    path = _path(state_dir, server_round)
    if not path.is_file():
        log.warning("%s: round %d was trained and charged for this very request, but its kept update %s is gone: "
                    "training it again (charged again)", ledger.hospital, server_round, path)
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("key") != key:
                log.warning("%s: %s holds another request's update: training round %d again", ledger.hospital,
                            path, server_round)
                return None
            state = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError) as err:   # damaged on disk: as if gone (a second release is paid for)
        log.warning("%s: round %d's kept update %s cannot be read (%s): training it again (charged again)",
                    ledger.hospital, server_round, path, err)
        return None
    return state, {k: float(meta[k]) for k in KEPT_METRICS if k in meta}
