"""FedAvg over the trainable state only, with every update validated before it is averaged.

``MedFedAvg`` subclasses Flower's ``FedAvg`` (sampling, message construction and the weighted
average stay Flower's). It adds:

* the round plan in every train message (``num-rounds``, ``local-epochs``, ``lr``);
* validation of each reply: an error reply, a hospital that refused the round (privacy budget),
  or an update with unknown / missing / mis-shaped / wrongly typed / non-finite tensors, an
  oversized payload or malformed metrics is left out, with the reason logged and kept in the
  round's report; the rest are averaged (weighted by ``num-examples``);
* evaluation replies are *summed* (they are correct/total counts), not averaged;
* ``uniform_weights`` (central DP): every accepted hospital counts once, because the noise of
  Flower's server-side clipping wrapper is calibrated to an equal-weight mean.

``screen`` is the validation on its own: the round loop screens before anything else touches an
update (Flower's DP wrapper clips replies before it hands them to the strategy, and clipping a
mis-shaped or non-finite update would fail or hide it).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Mapping, Optional

import numpy as np

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from medvlm.model.vlm import TensorSpec
from medvlm.wire import check_metrics, check_status, from_wire

log = logging.getLogger("medvlm.server")


@dataclass
class RoundReport:
    """What happened to each hospital in one round (aggregate facts only)."""

    hospitals: dict[str, dict] = field(default_factory=dict)   # name -> status, metrics, bytes
    rejected: list[dict] = field(default_factory=list)         # {"hospital", "node", "reason"}
    failed: list[dict] = field(default_factory=list)           # error replies (crash, timeout in the app)
    bytes_down: int = 0
    evaluation: dict[str, dict] = field(default_factory=dict)  # name -> summed counts


def _node_name(msg: Message) -> tuple[str, int]:
    node = int(msg.metadata.src_node_id)
    if not msg.has_content():
        return f"node-{node}", node
    try:
        name = str(msg.content.config_records["status"]["hospital"])
    except (KeyError, TypeError, AttributeError):
        name = f"node-{node}"
    return name, node


def sum_counts(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Evaluation replies carry counts: the federation's counts are their sums."""
    total: dict[str, float] = defaultdict(float)
    for record in records:
        for key, value in record.metric_records["metrics"].items():
            if key != "seconds":
                total[key] += float(value)
    return MetricRecord(dict(total))


class MedFedAvg(FedAvg):
    def __init__(self, *, spec: Mapping[str, TensorSpec], num_rounds: int, local_epochs: float, lr: float,
                 max_update_bytes: int, uniform_weights: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.uniform_weights = uniform_weights
        self.spec = dict(spec)
        self.num_rounds, self.local_epochs, self.lr = num_rounds, local_epochs, lr
        self.max_update_bytes = max_update_bytes
        self.report = RoundReport()

    # ----------------------------------------------------------------------------- train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.report = RoundReport()
        plan = ConfigRecord({**dict(config), "num-rounds": self.num_rounds, "local-epochs": float(self.local_epochs),
                             "lr": float(self.lr)})
        messages = list(super().configure_train(server_round, arrays, plan, grid))
        self.report.bytes_down += len(messages) * sum(len(a.data) for a in arrays.values())
        return messages

    def check_update(self, msg: Message) -> Optional[str]:
        """None if the reply may be averaged, else the reason it may not."""
        content = msg.content
        extra = sorted(set(content.keys()) - {"arrays", "metrics", "status"})
        if extra:
            return f"unexpected record(s) {extra} in the reply"
        if "arrays" not in content.array_records:
            return "no trainable state in the reply"
        arrays = content.array_records["arrays"]
        size = sum(len(a.data) for a in arrays.values())
        if size > self.max_update_bytes:
            return f"update of {size:,} bytes exceeds federation.max_update_mb ({self.max_update_bytes:,} bytes)"
        try:
            metrics = dict(content.metric_records["metrics"])
            check_metrics(metrics, kind="train")
            if not metrics.get("num-examples", 0) > 0:
                return "num-examples is missing or not positive"
            from_wire({name: a.numpy() for name, a in arrays.items()}, self.spec)
        except (KeyError, ValueError, TypeError) as err:
            return str(err)
        return None

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies whose updates may be averaged; every other one is recorded with its reason."""
        accepted = []
        for msg in replies:
            name, node = _node_name(msg)
            if msg.has_error():
                self.report.failed.append({"hospital": name, "node": node, "reason": msg.error.reason})
                log.warning("round %d: %s failed: %s", server_round, name, msg.error.reason)
                continue
            status = dict(msg.content.config_records.get("status", {}))
            metrics = dict(msg.content.metric_records["metrics"]) if "metrics" in msg.content.metric_records else {}
            entry = {"node": node, "status": status.get("status", "?"), **metrics}
            if status.get("accountant"):
                entry["accountant"] = status["accountant"]
            if status.get("status") == "budget-exhausted":
                log.warning("round %d: %s did not train: %s", server_round, name, status.get("reason", ""))
                entry["reason"] = status.get("reason", "")
                self.report.hospitals[name] = entry
                continue
            try:
                check_status(status)
            except ValueError as err:
                reason = str(err)
            else:
                reason = self.check_update(msg)
            if reason is not None:
                log.warning("round %d: rejected the update from %s (node %d): %s", server_round, name, node, reason)
                self.report.rejected.append({"hospital": name, "node": node, "reason": reason})
                entry.update(status="rejected", reason=reason)
                self.report.hospitals[name] = entry
                continue
            entry["bytes_up"] = sum(len(a.data) for a in msg.content.array_records["arrays"].values())
            self.report.hospitals[name] = entry
            accepted.append(msg)
        return accepted

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        accepted = self.screen(server_round, replies)
        if not accepted:
            return None, None
        arrays, metrics = super().aggregate_train(server_round, accepted)
        if self.uniform_weights:
            once = [RecordDict({"arrays": m.content.array_records["arrays"], "w": MetricRecord({"w": 1})})
                    for m in accepted]
            arrays = aggregate_arrayrecords(once, "w")
        return arrays, metrics

    # ----------------------------------------------------------------------------- evaluate
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        good = []
        for msg in replies:
            name, node = _node_name(msg)
            if msg.has_error():
                self.report.failed.append({"hospital": name, "node": node, "reason": msg.error.reason,
                                           "phase": "evaluate"})
                log.warning("round %d: %s failed to evaluate: %s", server_round, name, msg.error.reason)
                continue
            try:
                metrics = dict(msg.content.metric_records["metrics"])
                check_metrics(metrics, kind="evaluate")
            except (KeyError, ValueError) as err:
                log.warning("round %d: ignored the evaluation from %s: %s", server_round, name, err)
                continue
            self.report.evaluation[name] = metrics
            good.append(msg)
        # summed here rather than by FedAvg, whose consistency check wants identical keys: hospitals
        # report counts for the question types they have, which differ between sites
        return sum_counts([msg.content for msg in good], self.weighted_by_key) if good else None


class CentralDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping around ``MedFedAvg``, with its noise scaled to the
    hospitals actually averaged in the round (not the number sampled: some may refuse or fail).
    The loop hands it screened replies only."""

    def __init__(self, strategy: MedFedAvg, *, noise_multiplier: float, clipping_norm: float):
        if not strategy.uniform_weights:
            raise ValueError("central DP needs an equal-weight mean (MedFedAvg(uniform_weights=True))")
        bad = {n: s.dtype for n, s in strategy.spec.items() if s.dtype != "float32"}
        if bad:
            raise ValueError(f"federation.central_dp clips float32 updates; these tensors are not: {bad}")
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients=1)
        self.releases = 0

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        replies = [m for m in replies if self._moved(server_round, m)]
        if not replies:
            return None, None
        self.num_sampled_clients = len(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.releases += 1
        return arrays, metrics

    def _moved(self, server_round: int, msg: Message) -> bool:
        """Flower's FlatClip divides by the update's norm: an update equal to the global state
        cannot be clipped (ZeroDivisionError) and carries nothing, so it is left out, on record."""
        sent = self.current_arrays
        norm2 = sum(float(np.sum((a.numpy().astype(np.float64) - sent[k].numpy()) ** 2))
                    for k, a in msg.content.array_records["arrays"].items())
        if norm2 > 0:
            return True
        name, node = _node_name(msg)
        reason = "update identical to the global state (nothing to average under central DP)"
        log.warning("round %d: left out %s: %s", server_round, name, reason)
        self.strategy.report.rejected.append({"hospital": name, "node": node, "reason": reason})
        self.strategy.report.hospitals[name].update(status="rejected", reason=reason)
        return False
