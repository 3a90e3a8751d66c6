"""The wire format and its rules: only allow-listed, finite tensors; only aggregate metrics."""

import json

import numpy as np
import pytest
import torch

from medvlm.tensors import TrainableStateError, spec_of
from medvlm.wire import PACKED, EgressError, check_metrics, check_status, from_wire, pack, to_wire, unpack


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
    check_metrics({"num-examples": 10, "epsilon": 1.5, "train_loss": 0.3}, kind="train")
    check_metrics({"closed_correct": 3, "qtype/nodule_side_total": 9, "baseline/open_total": 2}, kind="evaluate")
    with pytest.raises(EgressError, match="prediction_0"):
        check_metrics({"prediction_0": 1.0}, kind="evaluate")
    with pytest.raises(EgressError, match="closed_correct"):
        check_metrics({"closed_correct": 1.0}, kind="train")   # eval counts are not train metrics
    with pytest.raises(EgressError, match="single number"):
        check_metrics({"train_loss": [0.1, 0.2]}, kind="train")
    with pytest.raises(EgressError, match="not finite"):
        check_metrics({"train_loss": float("nan")}, kind="train")
    check_status({"hospital": "general", "status": "trained"})
    with pytest.raises(EgressError, match="answer"):
        check_status({"hospital": "general", "status": "trained", "answer": "left lung nodule"})


# ----------------------------------------------------------------------------- compact transport
from medvlm.wire import SCALES, check_transport, decode, encode  # noqa: E402


@pytest.fixture
def fp32_state():
    g = torch.Generator().manual_seed(0)
    return {"fusion.w": torch.randn(64, 32, generator=g), "language.lora_B": torch.randn(16, 8, generator=g) * 0.01}


@pytest.mark.parametrize("transport, ratio, tol", [("bf16", 0.5, 2 ** -8), ("int8", 0.25, 0.5 / 127)])
def test_compact_transport_sends_the_change_and_decodes_it_exactly_enough(fp32_state, transport, ratio, tol):
    g = torch.Generator().manual_seed(1)
    new = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in fp32_state.items()}   # a small update
    arrays = encode(new, transport, reference=fp32_state)
    payload = sum(a.nbytes for n, a in arrays.items() if n != SCALES)
    assert payload == ratio * sum(v.numel() * 4 for v in new.values())
    back = decode(arrays, spec_of(fp32_state), transport, reference=fp32_state)
    for name, value in new.items():
        change, error = value - fp32_state[name], back[name] - value
        assert back[name].dtype == torch.float32
        # the error is relative to the *change*, not to the weights: small updates keep their precision
        assert float(error.abs().max()) <= tol * float(change.abs().max()) + 1e-7, name
    # the downlink (no reference) decodes to the encoded values themselves
    down = decode(encode(fp32_state, transport), spec_of(fp32_state), transport)
    assert all(torch.allclose(down[k], v, rtol=2 * tol, atol=2 * tol * float(v.abs().max())) for k, v in fp32_state.items())


@pytest.mark.parametrize("transport, mutate, match", [
    ("bf16", lambda a: a.update({"fusion.w": a["fusion.w"].astype(np.float32)}), "wire dtype"),
    ("bf16", lambda a: a.update({"vision.proj": np.zeros(2, np.uint16)}), "unknown tensor"),
    ("int8", lambda a: a.pop(SCALES), "missing tensor"),
    ("int8", lambda a: a[SCALES].__setitem__(1, np.inf), "scale"),
    ("bf16", lambda a: a["fusion.w"].__setitem__((0, 0), 0x7FC0), "NaN"),   # a bf16 NaN bit pattern
])
def test_compact_transport_refuses_bad_payloads_naming_the_tensor(fp32_state, transport, mutate, match):
    arrays = {k: v.copy() for k, v in encode(fp32_state, transport).items()}
    mutate(arrays)
    with pytest.raises(TrainableStateError, match=match):
        decode(arrays, spec_of(fp32_state), transport)


def test_compact_transport_refuses_a_state_that_is_not_float32(state):
    check_transport(spec_of({"w": torch.zeros(2)}), "bf16")
    with pytest.raises(ValueError, match="language.lora_A.*federation.transport=fp32"):
        check_transport(spec_of(state), "int8")
    with pytest.raises(ValueError, match="use one of"):
        check_transport(spec_of(state), "fp8")


# ----------------------------------------------------------------------------- one packed array per message
@pytest.mark.parametrize("transport", ["fp32", "bf16", "int8"])
def test_a_packed_state_is_one_array_and_unpacks_to_the_same_named_arrays(fp32_state, transport):
    named = encode(fp32_state, transport)
    packed = pack(named)
    assert list(packed) == [PACKED] and packed[PACKED].dtype == np.uint8 and packed[PACKED].ndim == 1
    back = unpack(packed)
    assert list(back) == list(named)                                  # names and order kept
    for name, a in named.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape and np.array_equal(back[name], a)
        assert back[name].flags.writeable                            # copies, not views of the message
    payload = sum(a.nbytes for a in named.values())
    assert payload < packed[PACKED].nbytes < payload + 100 * len(named) + 16   # the index costs little
    decoded = decode(back, spec_of(fp32_state), transport)
    assert set(decoded) == set(fp32_state)


def test_named_arrays_pass_through_unpack_for_the_same_checks(state):
    arrays = to_wire(state)
    assert unpack(arrays) == arrays


def _packed(arrays: dict) -> bytes:
    return pack(arrays)[PACKED].tobytes()


def _buf(raw: bytes) -> dict:
    return {PACKED: np.frombuffer(raw, np.uint8).copy()}


def _with_index(index, data: bytes = b"") -> bytes:
    header = json.dumps(index).encode()
    return b"MVW1" + len(header).to_bytes(4, "little") + header + data


@pytest.mark.parametrize("make, match", [
    (lambda s: {PACKED: np.zeros(3, np.float32)}, "1-D uint8"),
    (lambda s: {**_buf(_packed(to_wire(s))), "stolen": np.zeros(4, np.uint8)}, r"also carries \['stolen'\]"),
    (lambda s: _buf(b"PNG0" + _packed(to_wire(s))[4:]), "not a packed medvlm state"),
    (lambda s: _buf(_packed(to_wire(s))[:-3]), "ends inside tensor"),
    (lambda s: _buf(_packed(to_wire(s)) + b"\x00\x01"), "2 bytes after the last tensor"),
    (lambda s: _buf(_with_index({"fusion.w": 1})), "index is not a list"),
    (lambda s: _buf(_with_index([["fusion.w", "object", [1]]])), "dtypes from"),
    (lambda s: _buf(_with_index([["a", "int8", [1]], ["a", "int8", [1]]], b"\x01\x02")), "distinct"),
    (lambda s: _buf(_with_index([["a", "int8", [-1]]])), "index is not a list"),
    (lambda s: _buf(b"MVW1" + (10 ** 9).to_bytes(4, "little") + b"[]"), "not a packed medvlm state"),
])
def test_unpack_refuses_malformed_buffers_saying_what_is_wrong(state, make, match):
    with pytest.raises(TrainableStateError, match=match):
        unpack(make(state))


def test_a_packed_unknown_tensor_is_still_refused_by_name(state):
    arrays = {**to_wire(state), "language.base.weight": np.zeros(2, np.float32)}
    with pytest.raises(TrainableStateError, match=r"unknown tensor name\(s\) \['language.base.weight'\]"):
        from_wire(unpack(pack(arrays)), spec_of(state))
