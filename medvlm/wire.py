"""What may cross the wire between a hospital and the coordinator, in both directions.

It is a property of the model, so it lives here (``client/`` and ``server/`` both use it and
never import each other):

* tensors: exactly the model's trainable allow-list (LoRA + fusion), by name, shape and dtype,
  finite. bf16 cannot travel as a numpy array, so it travels as its raw 16-bit pattern
  (``uint16``) and is restored bit-exactly on the other side.
* metrics: a closed set of aggregate numbers (counts, means, epsilon); never a per-example value,
  a text or an image. Evaluation counts are per answer type and per question type.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import numpy as np
import torch

from medvlm.model.vlm import TensorSpec, TrainableStateError, validate_state

# Aggregate numbers a hospital may report after training (everything else is refused).
TRAIN_METRICS = frozenset({
    "num-examples", "train-loss", "steps", "seconds", "epsilon", "delta", "noise-multiplier",
    "sample-rate", "total-steps", "budget", "max-grad-norm",
})
# ... after evaluating: counts only (``closed_correct``, ``qtype/<name>_total``, ...).
EVAL_METRIC_PATTERN = re.compile(
    r"^(num-examples|seconds|"
    r"(baseline/)?((closed|open)_(correct|total)|open_recall_sum|qtype/[A-Za-z0-9_.-]{1,40}_(correct|total)))$")
# A hospital's status line: a closed vocabulary plus its name and a human-readable reason.
STATUSES = frozenset({"trained", "budget-exhausted", "evaluated"})
STATUS_KEYS = frozenset({"hospital", "status", "reason", "accountant"})


def legacy_order(spec: Mapping[str, TensorSpec]) -> list[str]:
    """Tensor order on Flower's legacy wire (SecAgg+), whose ``Parameters`` carry no names: both
    ends derive it from the same allow-list."""
    return sorted(spec)


class EgressError(ValueError):
    """A reply would carry something other than allow-listed tensors and aggregate metrics."""


def spec_of(state: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {k: TensorSpec(tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}


def to_wire(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Tensors -> numpy arrays for an ``ArrayRecord`` (bf16 as its uint16 bit pattern)."""
    out = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        out[name] = t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    return out


def wire_dtype(spec: TensorSpec) -> str:
    return "uint16" if spec.dtype == "bfloat16" else spec.dtype


def from_wire(arrays: Mapping[str, np.ndarray], spec: Mapping[str, TensorSpec]) -> dict[str, torch.Tensor]:
    """Decode and validate a received state against ``spec``; raises TrainableStateError naming
    the first unknown, missing, mis-shaped, wrongly typed or non-finite tensor."""
    unknown = sorted(set(arrays) - set(spec))
    if unknown:
        raise TrainableStateError(f"unknown tensor name(s) {unknown[:5]}: only this model's LoRA and fusion "
                                  "tensors may be sent")
    state = {}
    for name, array in arrays.items():
        want = spec[name]
        if str(array.dtype) != wire_dtype(want):
            raise TrainableStateError(f"tensor {name!r}: dtype {array.dtype} does not match the model's {want.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        state[name] = tensor.view(torch.bfloat16) if want.dtype == "bfloat16" else tensor
    validate_state(state, spec, strict=True)
    return state


def state_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))


def check_metrics(metrics: Mapping[str, object], *, kind: str) -> None:
    """Egress rule for metrics: known aggregate keys, finite numbers (``kind`` = train | evaluate)."""
    for key, value in metrics.items():
        allowed = key in TRAIN_METRICS if kind == "train" else bool(EVAL_METRIC_PATTERN.match(key))
        if not allowed:
            raise EgressError(f"metric {key!r} is not an allowed aggregate {kind} metric; replies carry only "
                              "counts, means and privacy figures")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EgressError(f"metric {key!r}: value of type {type(value).__name__} is not a single number")
        if not math.isfinite(float(value)):
            raise EgressError(f"metric {key!r}: value {value} is not finite")


def check_status(status: Mapping[str, object]) -> None:
    extra = sorted(set(status) - STATUS_KEYS)
    if extra:
        raise EgressError(f"status field(s) {extra} are not allowed in a reply")
    if status.get("status") not in STATUSES:
        raise EgressError(f"status {status.get('status')!r} is not one of {sorted(STATUSES)}")
    for key, value in status.items():
        if not isinstance(value, str) or len(value) > 500:
            raise EgressError(f"status field {key!r} must be a short string")
