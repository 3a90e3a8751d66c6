"""The hospital's ClientApp handlers, called directly with Flower Messages: what leaves the site,
the on-site ledger, and refusing a round past the budget."""

import json
import shlex

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client import app as client_app
from client.egress import EgressError, reply_content
from client.ledger import LEDGER_FILE
from medvlm.wire import EVAL_METRIC_PATTERN, TRAIN_METRICS, to_wire
from tests.conftest import TINY_OVERRIDES
from tests.fakes import set_task_identity


@pytest.fixture
def run(tmp_path, tiny_model):
    set_task_identity()
    run_config = {"preset": "tiny", "overrides": shlex.join(TINY_OVERRIDES + ["data.hospitals=[general,cardiac]"])}
    state = tiny_model.trainable_state()
    arrays = ArrayRecord({k: Array(v) for k, v in to_wire(state).items()})

    def message(kind: str, server_round: int = 1, num_rounds: int = 2) -> Message:
        config = ConfigRecord({"server-round": server_round, "num-rounds": num_rounds, "local-epochs": 1.0,
                               "lr": 1e-3, "run-dir": str(tmp_path)})
        return Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=7, message_type=kind)

    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(),
                      run_config=run_config)
    return message, context, state, tmp_path / "hospitals" / "cardiac"


def test_train_reply_has_only_allowlisted_tensors_and_aggregate_metrics(run):
    message, context, state, ledger_dir = run
    reply = client_app.train(message("train"), context)
    assert set(reply.content.keys()) == {"arrays", "metrics", "status"}
    arrays = reply.content.array_records["arrays"]
    assert list(arrays.keys()) == list(state)                      # exactly the allow-list, in order
    changed = [k for k in state if not np.array_equal(arrays[k].numpy(), state[k].numpy())]
    assert changed, "training changed nothing"
    metrics = dict(reply.content.metric_records["metrics"])
    assert set(metrics) <= TRAIN_METRICS and all(isinstance(v, float) for v in metrics.values())
    status = dict(reply.content.config_records["status"])
    assert status["hospital"] == "cardiac" and status["status"] == "trained"
    ledger = json.loads((ledger_dir / LEDGER_FILE).read_text())
    assert 0 < metrics["epsilon"] <= 8.0 and ledger["rounds"] == [1]
    assert metrics["total-steps"] == sum(h[2] for h in ledger["history"]) == metrics["steps"]

    again = client_app.train(message("train", server_round=2), context)   # the ledger accumulates
    m2 = dict(again.content.metric_records["metrics"])
    assert m2["epsilon"] > metrics["epsilon"] and m2["total-steps"] == 2 * metrics["total-steps"]
    assert m2["noise-multiplier"] == metrics["noise-multiplier"]    # one mechanism for the federation
    assert m2["epsilon"] <= 8.0 + 1e-6


def test_evaluate_reply_is_counts_only(run):
    message, context, _, _ = run
    reply = client_app.evaluate(message("evaluate"), context)
    assert set(reply.content.keys()) == {"metrics", "status"}
    metrics = dict(reply.content.metric_records["metrics"])
    assert all(EVAL_METRIC_PATTERN.match(k) for k in metrics)
    assert metrics["closed_total"] + metrics.get("open_total", 0) == metrics["num-examples"]
    assert metrics["baseline/closed_total"] == metrics["closed_total"]


def test_a_round_past_the_budget_is_refused_and_nothing_is_sent(run):
    message, context, _, ledger_dir = run
    context.node_config["epsilon"] = 1.0
    client_app.train(message("train", num_rounds=1), context)       # plans the whole budget for 1 round
    before = (ledger_dir / LEDGER_FILE).read_text()
    reply = client_app.train(message("train", server_round=2, num_rounds=2), context)
    status = dict(reply.content.config_records["status"])
    assert status["status"] == "budget-exhausted" and "budget 1" in status["reason"]
    assert "arrays" not in reply.content.array_records
    assert json.loads((ledger_dir / LEDGER_FILE).read_text())["history"] == json.loads(before)["history"]


def test_egress_guard_refuses_anything_but_allowed_parts(tiny_model):
    spec, state = tiny_model.trainable_spec(), tiny_model.trainable_state()
    ok = dict(kind="train", metrics={"num-examples": 3}, status={"hospital": "h", "status": "trained"}, spec=spec)
    reply_content(**ok, state=state)
    with pytest.raises(EgressError, match="unknown tensor"):
        reply_content(**ok, state={**state, "vision.visual.conv1.weight": torch.zeros(1)})
    with pytest.raises(EgressError, match="NaN"):
        reply_content(**ok, state={**state, next(iter(state)): torch.full_like(next(iter(state.values())), np.nan)})
    with pytest.raises(EgressError, match="predictions"):
        reply_content(**{**ok, "metrics": {"num-examples": 3, "predictions": 1.0}}, state=state)
    with pytest.raises(EgressError, match="only a train reply"):
        reply_content(**{**ok, "kind": "evaluate", "metrics": {"num-examples": 3}}, state=state)
    with pytest.raises(EgressError, match="not allowed"):
        reply_content(**{**ok, "status": {"hospital": "h", "status": "trained", "report": "a text"}}, state=state)
