"""Tensor specs and their one validation: the allow-list of (name, shape, dtype) a model derives
from itself, and the check every state that enters or leaves a model passes (the wire, the egress
guard, the coordinator's screening, SecAgg+, loading). Knows no model and no Flower."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"


class TrainableStateError(ValueError):
    """A tensor offered to load_trainable_state does not match the model's allow-list."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def validate_state(state: Mapping[str, object], spec: Mapping[str, TensorSpec], *, strict: bool = True) -> None:
    """Raise TrainableStateError naming the first tensor that is unknown, missing, mis-shaped,
    of the wrong dtype or non-finite. Accepts torch tensors and numpy arrays."""
    unknown = sorted(set(state) - set(spec))
    if unknown:
        raise TrainableStateError(f"unknown tensor name(s) {unknown[:5]}{'...' if len(unknown) > 5 else ''}: "
                                  "only LoRA and fusion tensors of this model may be loaded")
    if strict:
        missing = sorted(set(spec) - set(state))
        if missing:
            raise TrainableStateError(f"missing tensor(s) {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for name, value in state.items():
        want = spec[name]
        if isinstance(value, np.ndarray):
            shape, dtype = tuple(value.shape), str(value.dtype)
            finite = bool(np.isfinite(value).all())
        elif isinstance(value, torch.Tensor):
            shape, dtype = tuple(value.shape), dtype_name(value.dtype)
            finite = bool(torch.isfinite(value).all())
        else:
            raise TrainableStateError(f"tensor {name!r}: expected a tensor or array, got {type(value).__name__}")
        if shape != want.shape:
            raise TrainableStateError(f"tensor {name!r}: shape {shape} does not match the model's {want.shape}")
        if dtype != want.dtype:
            raise TrainableStateError(f"tensor {name!r}: dtype {dtype} does not match the model's {want.dtype}")
        if not finite:
            raise TrainableStateError(f"tensor {name!r}: contains NaN or infinite values")


def spec_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """The spec of a state or of a model's parameters, by name."""
    return {n: TensorSpec(tuple(t.shape), dtype_name(t.dtype)) for n, t in tensors.items()}
