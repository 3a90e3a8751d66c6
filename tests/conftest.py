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
