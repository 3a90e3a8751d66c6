"""Aggregation over the trainable state only, with every update validated before it is aggregated.

``MedFedAvg``, ``MedFedMedian``, ``MedFedTrimmedAvg`` and the server optimizers ``MedFedAvgM``,
``MedFedAdam``, ``MedFedYogi`` are Flower's strategies of those names (sampling, message construction,
the aggregation rule and the server's step stay Flower's) with the ``Screened`` mixin
(``federation.aggregation`` picks one; see ``make_strategy``). It adds:

* the round plan in every train message (``num-rounds``, ``local-epochs``, ``lr``);
* validation of each reply: an error reply, a hospital that refused the round (privacy budget),
  or an update with unknown / missing / mis-shaped / wrongly typed / non-finite tensors, an
  oversized payload or malformed metrics is left out, with the reason logged and kept in the
  round's report; the rest are averaged (weighted by ``num-examples``);
* evaluation replies are *summed* (they are correct/total counts), not averaged;
* ``uniform_weights`` (central DP): every accepted hospital counts once, because the noise of
  Flower's server-side clipping wrapper is calibrated to an equal-weight mean;
* the wire encoding (``federation.transport``, see ``medvlm.wire``): messages carry the encoded
  state; each accepted reply is decoded into float32 weights (master state + the hospital's change)
  before the aggregation rule sees it, so every rule works on exact float32 tensors;
* a server optimizer steps from the float32 global state (never its wire form), and its state
  (momentum, second moments) is read and restored by name for the round checkpoints.

``screen`` is the validation on its own: the round loop screens before anything else touches an
update (Flower's DP wrapper clips replies before it hands them to the strategy, and clipping a
mis-shaped or non-finite update would fail or hide it).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Mapping, Optional

import numpy as np
import torch

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedAvgM, FedMedian,
                                    FedTrimmedAvg, FedYogi)
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from medvlm.tensors import TensorSpec
from medvlm.wire import (HOSPITAL_NAME, check_metrics, check_status, decode, encode, pack, parse_mechanisms,
                         require_float32, to_wire, unpack)

log = logging.getLogger("medvlm.server")


@dataclass
class RoundReport:
    """What happened to each hospital in one round (aggregate facts only)."""

    hospitals: dict[str, dict] = field(default_factory=dict)   # name -> status, metrics, bytes
    rejected: list[dict] = field(default_factory=list)         # {"hospital", "node", "reason"}
    failed: list[dict] = field(default_factory=list)           # error replies (crash, timeout in the app)
    bytes_down: int = 0                                       # train messages
    bytes_down_evaluate: int = 0                              # evaluate messages
    evaluation: dict[str, dict] = field(default_factory=dict)  # name -> summed counts
    evaluation_asked: int = 0                                 # hospitals asked to evaluate
    not_evaluated: dict[str, str] = field(default_factory=dict)   # name -> why the site refused to evaluate


# Flower's error codes (flwr.common.constant.ErrorCode) as the reason a hospital's reply is missing
_ERROR_KINDS = {1: "crashed (its app failed to load)", 2: "crashed", 3: "reply lost", 4: "reply expired before it "
                "was collected", 5: "node unavailable (its SuperNode stopped sending heartbeats: stopped, killed or "
                "cut off)", 6: "refused by a mod", 7: "refused the app bundle", 8: "crashed (its app process died)"}


# Flower's form of a ClientApp's exception, "<class 'ValueError'>:<'message'>"; in simulation the class
# is Ray's task error and the message its traceback, ending in "Message: " and the app's own message
_RAISED = re.compile(r"^<class '([^']+)'>:<'(.*)'>$", re.S)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _app_message(detail: str) -> str:
    """The app's own error message, on one line, out of Flower's and Ray's wrapping."""
    detail = _ANSI.sub("", detail).strip()
    raised = _RAISED.match(detail)
    if raised:
        kind, detail = raised.group(1).rsplit(".", 1)[-1], raised.group(2).strip()
        detail = detail.rsplit("Message: ", 1)[1] if "Message: " in detail else f"{kind}: {detail}"
    return said(detail)


def said(value: object) -> str:
    """A hospital's words (a status field), as one line of at most a status line's length
    (``medvlm.wire.check_status``): whatever a reply carries, it cannot start a line of the log."""
    return " ".join(str(value).split())[:500]


def failure_reason(error) -> str:
    """One line: what kind of failure (Flower's error code) and its message."""
    detail = _app_message(str(error.reason or ""))
    if detail.startswith("refused by "):   # the site refused the task (e.g. not its pinned app): its own words
        return detail
    kind = _ERROR_KINDS.get(int(error.code), f"error code {error.code}")
    return f"{kind}: {detail}" if detail and int(error.code) != 5 else kind


class Origins:
    """Which hospital each reply answers for. A reply names its sender, except the SuperLink's own
    error replies (node unavailable, reply expired), which come from the SuperLink: those are matched
    to the message they answer. Names are learned from the hospitals' replies."""

    def __init__(self) -> None:
        self.asked: dict[str, int] = {}       # message id -> node it was sent to
        self.names: dict[int, str] = {}       # node -> hospital
        self.claims: dict[str, int] = {}      # hospital -> the node that claimed it in this exchange
        self.now: set[int] = set()            # the nodes asked in this exchange

    def sent(self, messages: Iterable[Message]) -> None:
        self.asked.update({m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages
                           if m.metadata.message_id})
        self.claims, self.now = {}, {int(m.metadata.dst_node_id) for m in messages}

    def node(self, msg: Message) -> int:
        return self.asked.get(msg.metadata.reply_to_message_id, int(msg.metadata.src_node_id))

    def __call__(self, msg: Message) -> tuple[str, int]:
        node = self.node(msg)
        status = msg.content.config_records.get("status") if msg.has_content() else None
        if status is not None and "hospital" in status:    # a reply without a status keeps the node's id
            claimed = str(status["hospital"])
            holder = self.claims.get(claimed)         # who took the name in this exchange, else who holds it and
            if holder is None:                        # was asked again
                holder = next((n for n, v in self.names.items() if v == claimed and n != node and n in self.now), None)
            if not HOSPITAL_NAME.match(claimed):          # a name is self-declared: nothing a log line can hide in
                log.warning("node %d names itself %r, not a hospital name: recorded as node-%d", node,
                            claimed[:80], node)
            elif holder is not None and holder != node:   # a name another node in the round holds: no record of
                log.warning("node %d names itself %r, the name of node %d: recorded as node-%d", node, claimed,
                            holder, node)                 # one hospital overwrites another's
            else:                                         # (a hospital back on a new node id keeps its name)
                self.names[node], self.claims[claimed] = claimed, node
        return self.names.get(node, f"node-{node}"), node




def sum_counts(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Evaluation replies carry counts: the federation's counts are their sums."""
    total: dict[str, float] = defaultdict(float)
    for record in records:
        for key, value in record.metric_records["metrics"].items():
            if key != "seconds":
                total[key] += float(value)
    return MetricRecord(dict(total))


def array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(a) for name, a in arrays.items()})


class Screened:
    """Validation, wire encoding and reporting around one of Flower's aggregation strategies."""

    def __init__(self, *, spec: Mapping[str, TensorSpec], num_rounds: int, local_epochs: float, lr: float,
                 max_update_bytes: int, uniform_weights: bool = False, transport: str = "fp32",
                 frozen_digest: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        self.uniform_weights = uniform_weights
        self.spec = dict(spec)
        self.num_rounds, self.local_epochs, self.lr = num_rounds, local_epochs, lr
        self.max_update_bytes = max_update_bytes
        self.transport = transport
        self.frozen_digest = frozen_digest      # FFA-LoRA: the frozen A matrices every site must share
        self.master: dict[str, torch.Tensor] = {}
        self.report = RoundReport()
        self._screened: set[int] = set()
        self.origins = Origins()

    def default_plan(self) -> dict:
        """What a train message carries when the round's config does not say (the federation's
        defaults; the round loop sends each stage's own plan in the round's ConfigRecord)."""
        return {"num-rounds": self.num_rounds, "local-epochs": float(self.local_epochs), "lr": float(self.lr)}

    def exchange(self, grid: Grid, messages: Iterable[Message], *, timeout: float, server_round: int,
                 phase: str) -> list[Message]:
        """Send, wait for the replies (at most ``timeout`` s), and record once, with the true reason,
        each hospital asked that neither replied nor was reported failed by the SuperLink."""
        messages = list(messages)
        replies = list(grid.send_and_receive(messages, timeout=timeout))   # ... once every reply is in
        if phase == "evaluate":
            self.report.evaluation_asked = len(messages)
        self.origins.sent(messages)
        answered = {self.origins.node(r) for r in replies}
        for node in sorted({int(m.metadata.dst_node_id) for m in messages} - answered):
            name = self.origins.names.get(node, f"node-{node}")
            reason = f"no reply within federation.timeout_s={timeout:g} s"
            self.fail(server_round, name, node, reason, phase)
        return replies

    def fail(self, server_round: int, name: str, node: int, reason: str, phase: str) -> None:
        """Record a hospital's failure once per round: a node that failed to train and then to evaluate
        is one record (its phases listed), not two."""
        for entry in self.report.failed:
            if entry["node"] == node:
                if phase not in entry["phase"].split(", "):
                    entry["phase"] += f", {phase}"
                log.warning("round %d: %s did not %s either: %s", server_round, name, phase, reason)
                return
        log.warning("round %d: %s (node %d) failed to %s: %s", server_round, name, node, phase, reason)
        self.report.failed.append({"hospital": name, "node": node, "reason": reason, "phase": phase})

    def _wire(self, arrays: ArrayRecord, config: ConfigRecord) -> tuple[ArrayRecord, ConfigRecord]:
        """The message form of the float32 global state: encoded per ``transport``, said in the config."""
        self.master = {k: torch.from_numpy(a.numpy()) for k, a in arrays.items()}
        arrays = array_record(pack(encode(self.master, self.transport)))
        extra = {"transport": self.transport}
        if self.frozen_digest:
            extra["frozen-digest"] = self.frozen_digest
        return arrays, ConfigRecord({**dict(config), **extra})

    # ----------------------------------------------------------------------------- train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.report = RoundReport()
        self._screened = set()
        wire, config = self._wire(arrays, config)
        plan = ConfigRecord({**self.default_plan(), **dict(config)})   # the round's stage plan wins
        messages = list(super().configure_train(server_round, wire, plan, grid))
        self.stepping_from(ArrayRecord({k: arrays[k] for k in self.spec}))
        self.report.bytes_down += len(messages) * sum(len(a.data) for a in wire.values())
        return messages

    # ----------------------------------------------------------------------------- server optimizers
    def stepping_from(self, arrays: ArrayRecord) -> None:
        """The float32 global state (in allow-list order) a server optimizer steps from this round."""

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """A server optimizer's state by ``<slot>/<tensor name>``, for the checkpoint (none for a plain rule)."""
        return {}

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"this aggregation ({type(self).__name__}) keeps no server optimizer state, but the "
                             f"checkpoint holds {sorted(state)[:3]}: resume with the aggregation the run began with")

    def _slots(self, state: Mapping[str, np.ndarray], slots: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
        """``state`` split into its slots, each checked to hold exactly the allow-list's tensors and shapes."""
        out = {slot: {} for slot in slots}
        for key, value in state.items():
            slot, _, name = key.partition("/")
            if slot not in out or name not in self.spec or tuple(value.shape) != tuple(self.spec[name].shape):
                raise ValueError(f"server optimizer state {key!r} (shape {tuple(value.shape)}) does not belong to "
                                 f"{type(self).__name__} on this model: resume with the run's own config")
            out[slot][name] = np.asarray(value, dtype=np.float32)
        for slot, named in out.items():
            if named and set(named) != set(self.spec):
                raise ValueError(f"server optimizer state {slot!r} misses {sorted(set(self.spec) - set(named))[:3]}")
        return out

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        wire, config = self._wire(arrays, config)
        messages = list(super().configure_evaluate(server_round, wire, config, grid))
        self.report.bytes_down_evaluate = len(messages) * sum(len(a.data) for a in wire.values())
        return messages

    def check_update(self, msg: Message) -> tuple[Optional[str], Optional[dict]]:
        """(None, float32 weights) if the reply may be aggregated, else (the reason it may not, None)."""
        content = msg.content
        extra = sorted(set(content.keys()) - {"arrays", "metrics", "status"})
        if extra:
            return f"unexpected record(s) {extra} in the reply", None
        if "arrays" not in content.array_records:
            return "no trainable state in the reply", None
        arrays = content.array_records["arrays"]
        size = sum(len(a.data) for a in arrays.values())
        if size > self.max_update_bytes:
            return f"update of {size:,} bytes exceeds federation.max_update_mb ({self.max_update_bytes:,} bytes)", None
        try:
            metrics = dict(content.metric_records["metrics"])
            check_metrics(metrics, kind="train")
            if not metrics.get("num-examples", 0) > 0:
                return "num-examples is missing or not positive", None
            reference = self.master if self.transport != "fp32" else None
            state = decode(unpack({name: a.numpy() for name, a in arrays.items()}), self.spec, self.transport, reference)
        except (KeyError, ValueError, TypeError) as err:
            return str(err), None
        return None, state

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies whose updates may be aggregated, their arrays decoded into float32 weights;
        every other one is recorded with its reason."""
        accepted = []
        for msg in replies:
            name, node = self.origins(msg)
            if msg.has_error():
                self.fail(server_round, name, node, failure_reason(msg.error), "train")
                continue
            status = dict(msg.content.config_records.get("status", {}))
            metrics = dict(msg.content.metric_records["metrics"]) if "metrics" in msg.content.metric_records else {}
            entry = {"node": node, "status": said(status.get("status", "?")), **metrics}
            if status.get("accountant"):
                entry["accountant"] = said(status["accountant"])
            if status.get("privacy"):   # the site trained at its own privacy settings, not the run's
                entry["privacy"] = said(status["privacy"])
                log.warning("round %d: %s: %s", server_round, name, entry["privacy"])
            if status.get("resent"):    # asked again for a round it had trained: its kept update, nothing spent
                entry["resent"] = True
                log.info("round %d: %s: %s", server_round, name, said(status["resent"]))
            if status.get("ledger"):
                try:
                    entry["mechanisms"] = parse_mechanisms(status["ledger"])
                except ValueError as err:
                    log.warning("round %d: %s: unreadable ledger in the reply: %s", server_round, name, err)
            if status.get("status") == "budget-exhausted":
                entry["reason"] = said(status.get("reason", ""))
                log.warning("round %d: %s did not train: %s", server_round, name, entry["reason"])
                self.report.hospitals[name] = entry
                continue
            state = None
            try:
                check_status(status)
            except ValueError as err:
                reason = str(err)
            else:
                reason, state = self.check_update(msg)
            if reason is not None:
                log.warning("round %d: rejected the update from %s (node %d): %s", server_round, name, node, reason)
                self.report.rejected.append({"hospital": name, "node": node, "reason": reason})
                entry.update(status="rejected", reason=reason)
                self.report.hospitals[name] = entry
                continue
            entry["bytes_up"] = sum(len(a.data) for a in msg.content.array_records["arrays"].values())
            self.report.hospitals[name] = entry
            # the aggregation rule sees exact float32 weights, named (the wire form is packed and encoded)
            msg.content["arrays"] = array_record(to_wire({k: state[k] for k in self.spec}))
            self._screened.add(id(msg))
            accepted.append(msg)
        return accepted

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        replies = list(replies)
        accepted = [m for m in replies if id(m) in self._screened] + \
            self.screen(server_round, [m for m in replies if id(m) not in self._screened])
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
            name, node = self.origins(msg)
            if msg.has_error():
                self.fail(server_round, name, node, failure_reason(msg.error), "evaluate")
                continue
            status = dict(msg.content.config_records.get("status", {}))
            if status.get("status") == "not-evaluated":   # the site's own policy: said, not an error
                reason = said(status.get("reason", ""))
                log.warning("round %d: %s does not evaluate: %s", server_round, name, reason)
                self.report.not_evaluated[name] = reason
                continue
            try:
                metrics = dict(msg.content.metric_records["metrics"])
                check_metrics(metrics, kind="evaluate")
            except (KeyError, ValueError) as err:
                log.warning("round %d: ignored the evaluation from %s: %s", server_round, name, err)
                continue
            self.report.evaluation[name] = metrics
            good.append(msg)
        known = sorted(set(self.origins.names.values()) - set(self.report.evaluation))
        log.info("round %d: evaluated on %d hospital(s) (%s)%s", server_round, len(good),
                 ", ".join(sorted(self.report.evaluation)) or "none",
                 f"; not scored: {', '.join(known)}" if known else "")
        # summed here rather than by FedAvg, whose consistency check wants identical keys: hospitals
        # report counts for the question types they have, which differ between sites
        if not good:
            return None
        total = sum_counts([msg.content for msg in good], self.weighted_by_key)
        if not any(float(total.get(k, 0)) for k in ("closed_total", "open_total", "report_total")):
            log.warning("round %d: the hospitals that evaluated hold no validation questions or reports: nothing was "
                        "scored (a validation split is data.val_fraction of a hospital's images: too few images?)",
                        server_round)
        return total


class MedFedAvg(Screened, FedAvg):
    """FedAvg (weighted by num-examples) over screened updates: the default."""


class MedFedMedian(Screened, FedMedian):
    """Coordinate-wise median of the screened updates (robust to a minority of poisoned hospitals)."""


class MedFedTrimmedAvg(Screened, FedTrimmedAvg):
    """Coordinate-wise mean after cutting ``beta`` of the updates from each tail."""


class MedFedAvgM(Screened, FedAvgM):
    """FedAvgM: the coordinator steps along the mean update with momentum (server_lr 1, momentum 0: FedAvg)."""

    def stepping_from(self, arrays: ArrayRecord) -> None:
        self.current_arrays = arrays

    def optimizer_state(self) -> dict[str, np.ndarray]:
        if self.momentum_vector is None:
            return {}
        return {f"momentum/{k}": v for k, v in zip(self.spec, self.momentum_vector, strict=True)}

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        momentum = self._slots(state, ("momentum",))["momentum"]
        self.momentum_vector = [momentum[k] for k in self.spec] if momentum else None


class _AdaptiveServer(Screened):
    """FedAdam / FedYogi (Flower's FedOpt): per-coordinate steps from first and second moments."""

    def stepping_from(self, arrays: ArrayRecord) -> None:
        self.current_arrays = {k: a.numpy() for k, a in arrays.items()}

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:   # FedOpt steps in float64; the state is float32 (set_up requires it)
            arrays = ArrayRecord({k: Array(a.numpy().astype(np.float32)) for k, a in arrays.items()})
        return arrays, metrics

    def optimizer_state(self) -> dict[str, np.ndarray]:
        moments = {"m": self.m_t or {}, "v": self.v_t or {}}
        return {f"{slot}/{k}": v for slot, named in moments.items() for k, v in named.items()}

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        slots = self._slots(state, ("m", "v"))
        self.m_t, self.v_t = slots["m"] or None, slots["v"] or None


class MedFedAdam(_AdaptiveServer, FedAdam):
    """FedAdam (Reddi et al. 2021) over screened updates."""


class MedFedYogi(_AdaptiveServer, FedYogi):
    """FedYogi (Reddi et al. 2021) over screened updates: Adam with an additive second-moment update."""


AGGREGATIONS = {"fedavg": MedFedAvg, "median": MedFedMedian, "trimmed-mean": MedFedTrimmedAvg,
                "fedavgm": MedFedAvgM, "fedadam": MedFedAdam, "fedyogi": MedFedYogi}


def make_strategy(aggregation: str, *, trim_fraction: float = 0.2, server_lr: Optional[float] = None,
                  server_momentum: float = 0.9, server_tau: Optional[float] = None, **kwargs) -> Screened:
    """The strategy ``federation.aggregation`` names, with the screening every one of them gets."""
    # which names exist and which combine with central DP or SecAgg+ is the config's to check
    # (FederationConfig.__post_init__); tests/test_server.py keeps the two lists of names the same
    if server_tau is not None and aggregation not in ("fedadam", "fedyogi"):
        raise ValueError(f"federation.server_tau is Adam's and Yogi's; {aggregation} has no second moment")
    if aggregation == "trimmed-mean":
        kwargs["beta"] = trim_fraction
    elif aggregation == "fedavgm":
        kwargs.update(server_learning_rate=1.0 if server_lr is None else server_lr, server_momentum=server_momentum)
    elif aggregation in ("fedadam", "fedyogi"):
        if server_lr is None:
            raise ValueError(f"{aggregation} needs federation.server_lr (the size of a round's update, e.g. 1e-3)")
        kwargs.update(eta=server_lr, beta_1=server_momentum)
        if server_tau is not None:
            kwargs["tau"] = server_tau
    return AGGREGATIONS[aggregation](**kwargs)


class CentralDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping around ``MedFedAvg``, with its noise scaled to the
    hospitals actually averaged in the round (not the number sampled: some may refuse or fail).
    The loop hands it screened replies only."""

    def __init__(self, strategy: Screened, *, noise_multiplier: float, clipping_norm: float):
        if not strategy.uniform_weights:
            raise ValueError("central DP needs an equal-weight mean (MedFedAvg(uniform_weights=True))")
        require_float32(strategy.spec, "federation.central_dp (its clipping)",
                        "train a float32 adapter (model.language.dtype=float32) or turn central DP off")
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
        name, node = self.strategy.origins(msg)
        reason = "update identical to the global state (nothing to average under central DP)"
        log.warning("round %d: left out %s: %s", server_round, name, reason)
        self.strategy.report.rejected.append({"hospital": name, "node": node, "reason": reason})
        self.strategy.report.hospitals[name].update(status="rejected", reason=reason)
        return False
