"""Egress guard: every reply a hospital sends is built here, and only from allowed parts.

A reply may hold (1) the trainable state, checked name by name against the model's allow-list
(shape, dtype, finite); (2) aggregate metrics from a closed vocabulary (counts, means, privacy
figures); (3) a short status record. Anything else — an image, a text, a per-example prediction,
an extra tensor — raises :class:`EgressError` and nothing is sent.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from medvlm.tensors import TensorSpec, validate_state
from medvlm.wire import EgressError, check_metrics, check_status, encode, legacy_order, pack, unpack

__all__ = ["EgressError", "reply_content", "as_secure_fit_reply"]


def reply_content(*, kind: str, metrics: Mapping[str, float], status: Mapping[str, str],
                  spec: Mapping[str, TensorSpec], state: Optional[Mapping[str, torch.Tensor]] = None,
                  transport: str = "fp32", reference: Optional[Mapping[str, torch.Tensor]] = None) -> RecordDict:
    """The only way a ClientApp handler builds its reply (``kind`` = train | evaluate). With a
    compact ``transport`` the tensors go as the change from ``reference`` (the state received)."""
    check_metrics(metrics, kind=kind)
    check_status(status)
    content = RecordDict({"metrics": MetricRecord({k: float(v) for k, v in metrics.items()}),
                          "status": ConfigRecord(dict(status))})
    if state is not None:
        if kind != "train":
            raise EgressError("only a train reply may carry tensors")
        try:
            validate_state(state, spec, strict=True)
        except ValueError as err:
            raise EgressError(f"refusing to send the trainable state: {err}") from None
        # keep the allow-list's order: Flower's clipping mods expect the order the server sent
        if transport != "fp32" and reference is None:
            raise EgressError(f"{transport} transport sends the change to the received state: pass reference")
        content["arrays"] = ArrayRecord({name: Array(array) for name, array in pack(encode(
            {name: state[name] for name in spec}, transport, reference)).items()})
    return content


def as_secure_fit_reply(content: RecordDict, *, sent: Mapping[str, np.ndarray],
                        spec: Mapping[str, TensorSpec]) -> RecordDict:
    """A checked train reply in the legacy form Flower's ``secaggplus_mod`` masks: the *change* to
    the global state (small values: the protocol's fixed-point range keeps precision), in
    ``legacy_order``; metrics and status as the FitRes metrics. Built only from ``reply_content``."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    if "arrays" not in content.array_records:
        raise EgressError("no trainable state to aggregate securely: "
                          f"{dict(content.config_records['status']).get('reason', 'nothing was trained')}")
    arrays = unpack({name: a.numpy() for name, a in content.array_records["arrays"].items()})
    update = [arrays[n].astype(np.float32) - np.asarray(sent[n], dtype=np.float32)
              for n in legacy_order(spec)]
    metrics = {**{k: float(v) for k, v in content.metric_records["metrics"].items()},
               **dict(content.config_records["status"])}
    fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update),
                 int(content.metric_records["metrics"]["num-examples"]), metrics)
    return fitres_to_recorddict(fit, keep_input=False)
