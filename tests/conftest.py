"""Shared tiny fixtures. Tests are offline: the built-in random-init tiny models are built
from config into a per-session cache (a few seconds); nothing is downloaded."""

from __future__ import annotations

import os

import pytest

import medvlm  # noqa: F401  (before torch: one CPU code path, medvlm/__init__.py)
import torch


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    old = os.environ.get("MEDVLM_CACHE")
    os.environ["MEDVLM_CACHE"] = str(tmp_path_factory.mktemp("medvlm-cache"))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
    if old is None:
        os.environ.pop("MEDVLM_CACHE", None)
    else:
        os.environ["MEDVLM_CACHE"] = old


TINY_OVERRIDES = ["model.init=random", "model.vision.source=builtin:tiny-random", "model.language.source=builtin:tiny-random",
                  "model.fusion.dim=32", "model.fusion.layers=1", "model.fusion.num_queries=4",
                  "data.images_per_hospital=20", "train.batch_size=16", "train.epochs=1"]


def wire_arrays(record) -> dict:
    """The named arrays a message's ``ArrayRecord`` carries (packed on the wire: ``medvlm.wire.pack``)."""
    from medvlm.wire import unpack

    return unpack({name: a.numpy() for name, a in record.items()})


@pytest.fixture(scope="session")
def tiny_cfg():
    from medvlm.config import load_config

    return load_config("tiny", TINY_OVERRIDES)


@pytest.fixture
def tiny_model(tiny_cfg):
    from medvlm.build import build_medvlm

    return build_medvlm(tiny_cfg.model, seed=0)


@pytest.fixture(scope="session")
def tiny_splits(tiny_cfg):
    from medvlm.build import vision_encoder
    from medvlm.data.dataset import load_splits

    return load_splits(tiny_cfg.data, vision_encoder(tiny_cfg.model.vision).preprocess)


def assert_round_trained_the_fusion_only(run_dir, round_: int = 1) -> None:
    """Between the checkpoints of rounds ``round_ - 1`` and ``round_`` the fusion moved and LoRA did not
    (up to FedAvg's float rounding of identical tensors): a stage with ``trainable: [fusion]``."""
    import numpy as np
    from safetensors.torch import load_file

    def load(r: int, name: str):
        return load_file(str(run_dir / "checkpoints" / f"round-{r:03d}" / name))

    before, after = load(round_ - 1, "adapter_model.safetensors"), load(round_, "adapter_model.safetensors")
    assert all(np.allclose(before[k].numpy(), after[k].numpy(), rtol=1e-6, atol=1e-7) for k in before)
    fusion0, fusion1 = load(round_ - 1, "fusion.safetensors"), load(round_, "fusion.safetensors")
    assert max(float(np.abs(fusion0[k].numpy() - fusion1[k].numpy()).max()) for k in fusion0) > 1e-4
