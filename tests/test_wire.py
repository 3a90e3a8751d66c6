"""The wire format and its rules: only allow-listed, finite tensors; only aggregate metrics."""

import numpy as np
import pytest
import torch

from medvlm.model.vlm import TrainableStateError
from medvlm.wire import EgressError, check_metrics, check_status, from_wire, spec_of, to_wire


@pytest.fixture
def state():
    return {"fusion.w": torch.randn(3, 4), "language.lora_A": torch.randn(2, 4).to(torch.bfloat16)}


def test_round_trip_is_bit_exact_including_bf16(state):
    arrays = to_wire(state)
    assert arrays["language.lora_A"].dtype == np.uint16  # bf16 travels as its bit pattern
    back = from_wire(arrays, spec_of(state))
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.update({"language.base.weight": np.zeros(2, np.float32)}), "unknown tensor"),
    (lambda a: a.pop("fusion.w"), "missing tensor"),
    (lambda a: a.update({"fusion.w": np.zeros((4, 3), np.float32)}), "shape"),
    (lambda a: a.update({"fusion.w": np.zeros((3, 4), np.float64)}), "dtype"),
    (lambda a: a["fusion.w"].__setitem__((0, 0), np.nan), "NaN"),
    (lambda a: a["fusion.w"].__setitem__((1, 1), np.inf), "NaN or infinite"),
])
def test_from_wire_refuses_bad_tensors_naming_them(state, mutate, match):
    arrays = to_wire(state)
    arrays = {k: v.copy() for k, v in arrays.items()}
    mutate(arrays)
    with pytest.raises(TrainableStateError, match=match):
        from_wire(arrays, spec_of(state))


def test_metric_rules():
    check_metrics({"num-examples": 10, "epsilon": 1.5, "train-loss": 0.3}, kind="train")
    check_metrics({"closed_correct": 3, "qtype/nodule_side_total": 9, "baseline/open_total": 2}, kind="evaluate")
    with pytest.raises(EgressError, match="prediction_0"):
        check_metrics({"prediction_0": 1.0}, kind="evaluate")
    with pytest.raises(EgressError, match="closed_correct"):
        check_metrics({"closed_correct": 1.0}, kind="train")   # eval counts are not train metrics
    with pytest.raises(EgressError, match="single number"):
        check_metrics({"train-loss": [0.1, 0.2]}, kind="train")
    with pytest.raises(EgressError, match="not finite"):
        check_metrics({"train-loss": float("nan")}, kind="train")
    check_status({"hospital": "general", "status": "trained"})
    with pytest.raises(EgressError, match="answer"):
        check_status({"hospital": "general", "status": "trained", "answer": "left lung nodule"})
