"""What may cross the wire between a hospital and the coordinator, in both directions.

It is a property of the model, so it lives here (``client/`` and ``server/`` both use it and
never import each other):

* tensors: exactly the model's trainable allow-list (LoRA + fusion), by name, shape and dtype,
  finite. bf16 cannot travel as a numpy array, so it travels as its raw 16-bit pattern
  (``uint16``) and is restored bit-exactly on the other side.
* metrics: a closed set of aggregate numbers (counts, means, epsilon); never a per-example value,
  a text or an image. Evaluation counts are per answer type and per question type.
* transport (``federation.transport``): ``fp32`` sends the state as it is (bit-exact). ``bf16``
  and ``int8`` are compact encodings of float32 tensors: the global state goes down encoded, and a
  hospital sends its *change* to the state it received, encoded (changes are small and centred, so
  they keep their precision; ``int8`` is symmetric per tensor, the tensors' scales travel as one
  float32 array ``::scales`` in ``legacy_order``). The coordinator decodes exactly into float32 and adds the change to its own
  float32 master state, so the rounding of the download never accumulates across rounds.
* packing: whatever the transport, a message carries its tensors as one array (``pack``: an index
  of names, dtypes and shapes, then the bytes), because Flower moves each array with HTTP requests
  of its own; ``unpack`` gives the named arrays back for the checks above.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Optional

import numpy as np
import torch

from medvlm.config import TRANSPORTS
from medvlm.tensors import TensorSpec, TrainableStateError, validate_state

# Aggregate numbers a hospital may report after training (everything else is refused). One name per
# metric: the keys metrics.jsonl and summary.json use, but for Flower's own weighting key num-examples.
TRAIN_METRICS = frozenset({
    "num-examples", "train_loss", "steps", "seconds", "epsilon", "delta", "noise_multiplier",
    "sample_rate", "total_steps", "budget", "max_grad_norm",
})
# ... after evaluating: counts only (``closed_correct``, ``qtype/<name>_total``, ...; for reports
# BLEU's n-gram matches and lengths, the sum of ROUGE-L scores, per-finding tp/fp/fn).
EVAL_METRIC_PATTERN = re.compile(
    r"^(num-examples|seconds|"
    r"(baseline/)?((closed|open)_(correct|total)|open_recall_sum|qtype/[A-Za-z0-9_.-]{1,40}_(correct|total)|"
    r"report_total|bleu_(correct|total)_[1-4]|bleu_(sys|ref)_len|rouge_l_sum|finding/[A-Za-z0-9_:=. -]{1,40}_(tp|fp|fn)))$")
# A hospital's status line: a closed vocabulary plus its name and a human-readable reason.
STATUSES = frozenset({"trained", "budget-exhausted", "evaluated", "not-evaluated"})
STATUS_KEYS = frozenset({"hospital", "status", "reason", "accountant", "privacy", "resent", "ledger"})
# "ledger": the hospital's DP mechanisms as JSON, [{stage, noise_multiplier, sample_rate, steps}, ...]
MECHANISM_KEYS = frozenset({"stage", "noise_multiplier", "sample_rate", "steps"})
STAGE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")
# A hospital's name (its key pair's, its ledger's, its replies'): no spaces, newlines or markup in logs
HOSPITAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_hospital_name(name: str) -> str:
    if not isinstance(name, str) or not HOSPITAL_NAME.match(name):
        raise ValueError(f"hospital name {name!r}: use letters, digits, '.', '_' or '-' (at most 64, starting with "
                         "a letter or digit), e.g. st-mary")
    return name


def legacy_order(spec: Mapping[str, TensorSpec]) -> list[str]:
    """Tensor order on Flower's legacy wire (SecAgg+), whose ``Parameters`` carry no names: both
    ends derive it from the same allow-list."""
    return sorted(spec)


class EgressError(ValueError):
    """A reply would carry something other than allow-listed tensors and aggregate metrics."""


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


SCALES = "::scales"   # int8: one float32 scale per tensor, in legacy_order


def require_float32(spec: Mapping[str, TensorSpec], feature: str, remedy: str) -> None:
    """``feature`` (a transport, SecAgg+'s masking, central DP's clipping) works on float32 tensors:
    refuse a model whose trainable state is not, naming a tensor and what to do."""
    bad = {n: s.dtype for n, s in spec.items() if s.dtype != "float32"}
    if bad:
        name = next(iter(bad))
        raise ValueError(f"{feature} works on float32 tensors, but {len(bad)} trainable tensor(s) are not (e.g. "
                         f"{name!r}: {bad[name]}); {remedy}")


def check_transport(spec: Mapping[str, TensorSpec], transport: str) -> None:
    """Compact transports encode float32 tensors; refuse a state they cannot carry, naming a tensor."""
    if transport not in TRANSPORTS:
        raise ValueError(f"federation.transport={transport!r}: use one of {list(TRANSPORTS)}")
    if transport != "fp32":
        require_float32(spec, f"federation.transport={transport}", "use federation.transport=fp32")


def transport_spec(spec: Mapping[str, TensorSpec], transport: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and numpy dtypes of what a state looks like on the wire."""
    if transport == "fp32":
        return {n: (s.shape, wire_dtype(s)) for n, s in spec.items()}
    out: dict[str, tuple[tuple[int, ...], str]] = {
        n: (s.shape, "uint16" if transport == "bf16" else "int8") for n, s in spec.items()}
    if transport == "int8":
        out[SCALES] = ((len(spec),), "float32")
    return out


def encode(state: Mapping[str, torch.Tensor], transport: str,
           reference: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, np.ndarray]:
    """The wire form of ``state`` (or of ``state - reference``: a hospital's change, compact transports)."""
    if transport == "fp32":
        return to_wire(state)
    out, scales = {}, {}
    for name, t in state.items():
        x = t.detach().cpu().float()
        if reference is not None:
            x = x - reference[name].float()
        if transport == "bf16":
            out[name] = x.to(torch.bfloat16).view(torch.uint16).numpy()
        else:   # int8: symmetric, one scale per tensor, round to nearest
            amax = float(x.abs().max()) if x.numel() else 0.0
            scales[name] = amax / 127.0 if amax > 0 else 1.0
            out[name] = torch.clamp(torch.round(x / scales[name]), -127, 127).to(torch.int8).numpy()
    if transport == "int8":
        out[SCALES] = np.array([scales[n] for n in legacy_order(state)], dtype=np.float32)
    return out


def decode(arrays: Mapping[str, np.ndarray], spec: Mapping[str, TensorSpec], transport: str,
           reference: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """Validate and decode what ``encode`` produced (adding ``reference`` back for a change); raises
    TrainableStateError naming the first unknown, missing, mis-shaped, wrongly typed or non-finite tensor."""
    if transport == "fp32":
        return from_wire(arrays, spec)
    expected = transport_spec(spec, transport)
    unknown = sorted(set(arrays) - set(expected))
    if unknown:
        raise TrainableStateError(f"unknown tensor name(s) {unknown[:5]}: only this model's LoRA and fusion "
                                  f"tensors may be sent ({transport} transport)")
    missing = sorted(set(expected) - set(arrays))
    if missing:
        raise TrainableStateError(f"missing tensor(s) {missing[:5]} in a {transport} state")
    for name, (shape, dtype) in expected.items():
        a = arrays[name]
        if tuple(a.shape) != tuple(shape):
            raise TrainableStateError(f"tensor {name!r}: shape {tuple(a.shape)} does not match the model's {shape}")
        if str(a.dtype) != dtype:
            raise TrainableStateError(f"tensor {name!r}: wire dtype {a.dtype} is not {dtype} ({transport} transport)")
    state = {}
    scales = dict(zip(legacy_order(spec), arrays[SCALES].tolist())) if transport == "int8" else {}
    for name in spec:
        raw = torch.from_numpy(np.ascontiguousarray(arrays[name]))
        if transport == "bf16":
            x = raw.view(torch.bfloat16).float()
        else:
            scale = float(scales[name])
            if not (math.isfinite(scale) and scale > 0):
                raise TrainableStateError(f"tensor {name!r}: int8 scale {scale} is not a positive finite number")
            x = raw.float() * scale
        state[name] = x + reference[name].float() if reference is not None else x
    validate_state(state, spec, strict=True)
    return state


# ----------------------------------------------------------------------------- one array per message
# Flower 1.41 pushes and pulls every array of a message as objects of its own, one HTTP request each
# (about 0.8 KB of headers apiece): the 43 tensors of the default model cost twice their payload on
# the wire (benchmarks/wire.py). So a message carries its state as one array PACKED: a header
# (magic, the index's length, the index: [[name, dtype, shape], ...] in order) and then every
# tensor's bytes, back to back. The names travel, so the receiver's checks stay the same named checks.
PACKED = "::packed"
PACK_MAGIC = b"MVW1"
PACK_DTYPES = frozenset({"float32", "uint16", "int8", "float16", "float64"})   # bf16 travels as uint16
MAX_INDEX_BYTES = 1 << 20


def pack(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Named wire arrays (``encode``'s output) -> ``{PACKED: one uint8 buffer}``, names kept in order."""
    import json

    index, parts = [], []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if str(a.dtype) not in PACK_DTYPES:
            raise EgressError(f"tensor {name!r}: dtype {a.dtype} cannot be packed (allowed {sorted(PACK_DTYPES)})")
        index.append([name, str(a.dtype), list(a.shape)])
        parts.append(a.reshape(-1).view(np.uint8))
    header = json.dumps(index, separators=(",", ":")).encode()
    return {PACKED: np.concatenate([np.frombuffer(PACK_MAGIC + len(header).to_bytes(4, "little") + header, np.uint8),
                                    *parts])}


def unpack(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What :func:`pack` made -> named wire arrays (copies), for ``decode``/``from_wire`` to check
    against the allow-list as before. A message without ``PACKED`` is taken as named arrays (the
    SecAgg+ legacy form, and earlier versions). Raises TrainableStateError on a malformed buffer."""
    import json

    if PACKED not in arrays:
        return dict(arrays)
    if len(arrays) != 1:
        raise TrainableStateError(f"a packed state is the one array {PACKED!r}; the message also carries "
                                  f"{sorted(set(arrays) - {PACKED})[:5]}")
    buf = arrays[PACKED]
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise TrainableStateError(f"{PACKED}: expected a 1-D uint8 buffer, got {buf.dtype} {tuple(buf.shape)}")
    raw = buf.tobytes()
    size = int.from_bytes(raw[4:8], "little") if len(raw) >= 8 else -1
    if raw[:4] != PACK_MAGIC or not 0 < size <= min(MAX_INDEX_BYTES, len(raw) - 8):
        raise TrainableStateError(f"{PACKED}: not a packed medvlm state (no {PACK_MAGIC!r} header with an index); "
                                  "the sender runs another version of medvlm-fl")
    try:
        index = json.loads(raw[8:8 + size])
        entries = [(str(n), str(d), tuple(int(x) for x in shape)) for n, d, shape in index
                   if isinstance(n, str) and d in PACK_DTYPES and isinstance(shape, list)
                   and all(isinstance(x, int) and x >= 0 for x in shape)]
    except (ValueError, TypeError):
        entries, index = [], None
    if not isinstance(index, list) or len(entries) != len(index) or len({n for n, _, _ in entries}) != len(entries):
        raise TrainableStateError(f"{PACKED}: its index is not a list of distinct [name, dtype, shape] entries "
                                  f"with dtypes from {sorted(PACK_DTYPES)}")
    out, offset = {}, 8 + size
    for name, dtype, shape in entries:
        count = math.prod(shape)
        end = offset + count * np.dtype(dtype).itemsize
        if end > len(raw):
            raise TrainableStateError(f"{PACKED}: the buffer ends inside tensor {name!r} ({len(raw):,} bytes)")
        out[name] = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape).copy()
        offset = end
    if offset != len(raw):
        raise TrainableStateError(f"{PACKED}: {len(raw) - offset:,} bytes after the last tensor of its index")
    return out


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
        if not isinstance(value, str) or len(value) > (4000 if key == "ledger" else 500):
            raise EgressError(f"status field {key!r} must be a short string")
    if "ledger" in status:
        parse_mechanisms(status["ledger"])


def parse_mechanisms(text: str) -> list[dict]:
    """A status ``ledger`` field: a list of DP mechanisms, each exactly {stage, noise_multiplier,
    sample_rate, steps} with finite numbers (nothing else can ride along in it)."""
    import json

    try:
        items = json.loads(text)
    except (TypeError, ValueError):
        raise EgressError("status field 'ledger' is not JSON") from None
    if not isinstance(items, list) or len(items) > 64:
        raise EgressError("status field 'ledger' must be a list of at most 64 mechanisms")
    out = []
    for m in items:
        if not isinstance(m, dict) or set(m) != MECHANISM_KEYS or not isinstance(m["stage"], str) \
                or not STAGE_NAME.match(m["stage"]):
            raise EgressError(f"status field 'ledger': each mechanism is exactly {sorted(MECHANISM_KEYS)}")
        sigma, q, steps = m["noise_multiplier"], m["sample_rate"], m["steps"]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in (sigma, q, steps)) \
                or sigma < 0 or not 0 < q <= 1 or steps < 0 or int(steps) != steps:
            raise EgressError(f"status field 'ledger': mechanism {m} has a value out of range")
        out.append({"stage": m["stage"], "noise_multiplier": float(sigma), "sample_rate": float(q),
                    "steps": int(steps)})
    return out
