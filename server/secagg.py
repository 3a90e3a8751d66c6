"""Secure aggregation (SecAgg+) for the training step of a round: the coordinator learns only the
weighted mean of the hospitals' updates, never one hospital's update.

Flower 1.41 implements SecAgg+ only on its legacy API (``SecAggPlusWorkflow`` driving a legacy
``Strategy`` inside a ``LegacyContext``; ``secaggplus_mod`` on the client). This module runs that
workflow for one round inside our Message-API round loop: a small legacy strategy hands out the
round's instructions and receives the unmasked mean. What is masked is each hospital's *change*
to the global state (small values, so the protocol's fixed-point range ``clipping_range`` keeps
precision), in the allow-list's sorted name order (legacy ``Parameters`` carry no names).

What the coordinator can no longer do under SecAgg+: validate one hospital's tensors (it sees
only the sum). It still checks the mean (names, shapes, finite values) and every hospital's
aggregate metrics; the masked vectors' shapes are fixed by the protocol.
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common import FitIns, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from medvlm.tensors import TensorSpec
from medvlm.wire import STATUS_KEYS, check_metrics, from_wire, legacy_order, require_float32
from server.strategy import RoundReport, Screened

log = logging.getLogger("medvlm.server")

class _SecureRound(Strategy):
    """The legacy strategy SecAggPlusWorkflow drives for one round."""

    def __init__(self, outer: Screened, *, server_round: int, config: Mapping, names: list[str]):
        super().__init__()
        self.outer, self.server_round, self.config, self.names = outer, server_round, dict(config), names
        self.mean_update: Optional[list[np.ndarray]] = None
        self.metrics: Optional[MetricRecord] = None

    def initialize_parameters(self, client_manager):  # pragma: no cover - the loop owns the state
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        available = client_manager.num_available()
        size = max(int(available * self.outer.fraction_train), self.outer.min_train_nodes, 2)
        clients = client_manager.sample(num_clients=min(size, available), min_num_clients=2)
        plan = {**self.outer.default_plan(), **self.config, "server-round": server_round}
        if self.outer.frozen_digest:   # FFA-LoRA: hospitals check they share the frozen A matrices
            plan["frozen-digest"] = self.outer.frozen_digest
        self.outer.report.bytes_down += len(clients) * sum(len(t) for t in parameters.tensors)
        return [(c, FitIns(parameters, plan)) for c in clients]

    def aggregate_fit(self, server_round, results, failures):
        for reason in failures:
            self.outer.report.failed.append({"hospital": "?", "node": -1, "reason": str(reason)})
        examples, losses = 0.0, 0.0
        for proxy, res in results:
            metrics = dict(res.metrics)
            status = {k: metrics.pop(k) for k in STATUS_KEYS if k in metrics}
            name = str(status.get("hospital", f"node-{proxy.node_id}"))
            entry = {"node": int(proxy.node_id), "status": status.get("status", "?"), **metrics}
            try:
                check_metrics(metrics, kind="train")
            except ValueError as err:
                entry.update(status="rejected", reason=str(err))
                self.outer.report.rejected.append({"hospital": name, "node": int(proxy.node_id), "reason": str(err)})
            for key in ("accountant", "privacy"):
                if status.get(key):
                    entry[key] = status[key]
            entry["bytes_up"] = sum(len(t) for t in res.parameters.tensors)   # the masked vector
            self.outer.report.hospitals[name] = entry
            examples += float(res.num_examples)
            losses += float(metrics.get("train_loss", 0.0)) * float(res.num_examples)
        if not results:
            return None, {}
        self.mean_update = parameters_to_ndarrays(results[0][1].parameters)   # every result holds the mean
        self.metrics = MetricRecord({"train_loss": losses / max(examples, 1.0), "num-examples": examples})
        return results[0][1].parameters, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def check_secure_aggregation(spec: Mapping[str, TensorSpec]) -> None:
    require_float32(spec, "federation.secure_aggregation=secagg+ (its masks)",
                    "train a float32 adapter (model.language.dtype=float32) or use secure_aggregation=none")


def secure_train_round(grid: Grid, strategy: Screened, arrays: ArrayRecord, *, server_round: int,
                       config: Mapping, spec: Mapping[str, TensorSpec], clipping_range: float,
                       timeout: float) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
    """One SecAgg+ training step: returns the new global arrays (global + mean update) and metrics."""
    names = legacy_order(spec)
    strategy.report = RoundReport()
    legacy = _SecureRound(strategy, server_round=server_round, config=config, names=names)
    clients = SimpleClientManager()
    for node in grid.get_node_ids():
        clients.register(GridClientProxy(node, grid, run_id=0))
    if clients.num_available() < 2:
        raise ValueError(f"SecAgg+ needs at least 2 hospitals online; {clients.num_available()} are")
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=server_round, round_timeout=timeout), strategy=legacy,
                            client_manager=clients)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    current = [arrays[n].numpy() for n in names]
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord(
        {str(i): Array(a) for i, a in enumerate(current)})
    # every sampled hospital holds a share of every other's mask secret; two thirds (at least 2) of
    # them must finish for the mean to be unmasked (fractions: Flower sizes them to the sample)
    SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=2 / 3, clipping_range=clipping_range,
                       timeout=timeout)(grid, context)
    if legacy.mean_update is None:
        log.warning("round %d: secure aggregation did not complete (too few hospitals finished)", server_round)
        return None, None
    new, reason = apply_mean_update(current, legacy.mean_update, names=names, spec=spec)
    if new is None:
        log.warning("round %d: the securely aggregated update is rejected (%s); the global state is kept",
                    server_round, reason)
        strategy.report.rejected.append({"hospital": "secure-aggregate", "node": -1, "reason": reason})
        return None, None
    return new, legacy.metrics


def apply_mean_update(current: list[np.ndarray], mean: list[np.ndarray], *, names: list[str],
                      spec: Mapping[str, TensorSpec]) -> tuple[Optional[ArrayRecord], str]:
    """The new global state (current + unmasked mean update), or None and why it is refused: the
    one check the coordinator can still make under SecAgg+ (names, shapes, dtypes, finite values)."""
    if len(mean) != len(names):
        return None, f"the unmasked mean has {len(mean)} tensors; this model has {len(names)}"
    new = {}
    for name, c, u in zip(names, current, mean):
        if np.shape(u) != np.shape(c):
            return None, f"tensor {name!r}: the unmasked mean has shape {np.shape(u)}, the model {np.shape(c)}"
        new[name] = (c + u).astype(c.dtype)
    try:
        from_wire(new, spec)
    except ValueError as err:
        return None, str(err)
    return ArrayRecord({n: Array(a) for n, a in new.items()}), ""
