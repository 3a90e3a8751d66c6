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
from medvlm.wire import EVAL_METRIC_PATTERN, PACKED, TRAIN_METRICS, to_wire
from tests.conftest import TINY_OVERRIDES, wire_arrays
from simulations.inprocess import set_task_identity


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
    assert list(reply.content.array_records["arrays"].keys()) == [PACKED]   # one array on the wire
    arrays = wire_arrays(reply.content.array_records["arrays"])
    assert list(arrays.keys()) == list(state)                      # exactly the allow-list, in order
    changed = [k for k in state if not np.array_equal(arrays[k], state[k].numpy())]
    assert changed, "training changed nothing"
    metrics = dict(reply.content.metric_records["metrics"])
    assert set(metrics) <= TRAIN_METRICS and all(isinstance(v, float) for v in metrics.values())
    status = dict(reply.content.config_records["status"])
    assert status["hospital"] == "cardiac" and status["status"] == "trained"
    ledger = json.loads((ledger_dir / LEDGER_FILE).read_text())
    assert 0 < metrics["epsilon"] <= 8.0 and ledger["rounds"] == [1]
    assert metrics["total_steps"] == sum(h[2] for h in ledger["history"]) == metrics["steps"]

    again = client_app.train(message("train", server_round=2), context)   # the ledger accumulates
    m2 = dict(again.content.metric_records["metrics"])
    assert m2["epsilon"] > metrics["epsilon"] and m2["total_steps"] == 2 * metrics["total_steps"]
    assert m2["noise_multiplier"] == metrics["noise_multiplier"]    # one mechanism for the federation
    assert m2["epsilon"] <= 8.0 + 1e-6


def test_two_runs_training_at_once_are_both_charged(run, monkeypatch):
    """A SuperNode serves each run's tasks in a process of their own: a coordinator starting two runs at once had
    two tasks read the same spent epsilon, both train and release, and the later write erase the earlier
    charge. The ledger's lock makes the second wait until the first has charged."""
    import threading
    import time

    from client.ledger import Ledger

    message, context, _, ledger_dir = run
    real_open = Ledger.open

    def slow_open(*args, **kwargs):              # widen the window between reading the ledger and charging it
        ledger = real_open(*args, **kwargs)
        time.sleep(0.5)
        return ledger

    client_app.evaluate(message("evaluate"), context)             # the site built once (models are not built by
    monkeypatch.setattr(Ledger, "open", staticmethod(slow_open))  # two threads at once; a SuperNode's tasks are
    replies, errors = {}, []                                      # processes, each building its own)

    def train(server_round):
        try:
            # rounds 1 and 2 of 4, in either order: the ledger's noise leaves room for both
            replies[server_round] = client_app.train(message("train", server_round=server_round, num_rounds=4),
                                                     context)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=train, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and set(replies) == {1, 2}
    assert {dict(r.content.config_records["status"])["status"] for r in replies.values()} == {"trained"}
    ledger = json.loads((ledger_dir / LEDGER_FILE).read_text())
    assert sorted(ledger["rounds"]) == [1, 2]                       # both releases charged
    steps = [dict(r.content.metric_records["metrics"])["steps"] for r in replies.values()]
    assert sum(h[2] for h in ledger["history"]) == sum(steps)


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


def test_a_round_asked_again_is_resent_not_trained_and_charged_again(run, monkeypatch):
    """A coordinator that lost the replies (crash, resume from its checkpoint) asks again for the same
    round with the same global state: the hospital sends the update it kept and spends nothing."""
    from client import rounds
    from medvlm.privacy import epsilon
    from medvlm.wire import parse_mechanisms

    message, context, state, ledger_dir = run
    first = client_app.train(message("train"), context)
    charged = json.loads((ledger_dir / LEDGER_FILE).read_text())
    calls = []
    monkeypatch.setattr("medvlm.train.train_local", lambda *a, **k: calls.append(1) or pytest.fail("trained again"))
    again = client_app.train(message("train"), context)
    assert not calls
    ledger = json.loads((ledger_dir / LEDGER_FILE).read_text())
    assert ledger["rounds"] == [1] and ledger["history"] == charged["history"]
    status = dict(again.content.config_records["status"])
    assert status["status"] == "trained" and "no privacy is spent" in status["resent"]
    for name in state:
        assert np.array_equal(wire_arrays(again.content.array_records["arrays"])[name],
                              wire_arrays(first.content.array_records["arrays"])[name])
    m1, m2 = (dict(r.content.metric_records["metrics"]) for r in (first, again))
    assert m1["epsilon"] == m2["epsilon"] and m1["steps"] == m2["steps"]
    # the reply's ledger recomputes the ledger's epsilon exactly
    mechanisms = parse_mechanisms(status["ledger"])
    history = [(m["noise_multiplier"], m["sample_rate"], m["steps"]) for m in mechanisms]
    assert epsilon(history, delta=ledger["delta"], accountant=ledger["accountant"]) == pytest.approx(m2["epsilon"])

    # another global state for the same round is a new release: trained and charged
    monkeypatch.undo()
    changed = {k: (v + 0.01 if k.startswith("fusion.") else v) for k, v in state.items()}
    msg = message("train")
    msg.content["arrays"] = ArrayRecord({k: Array(v) for k, v in to_wire(changed).items()})
    client_app.train(msg, context)
    assert json.loads((ledger_dir / LEDGER_FILE).read_text())["rounds"] == [1, 1]
    # an update kept but never charged (a crash between the two writes) is never sent
    ledger = json.loads((ledger_dir / LEDGER_FILE).read_text())
    ledger["kept"] = {}
    (ledger_dir / LEDGER_FILE).write_text(json.dumps(ledger))
    assert rounds.kept(ledger_dir, type("L", (), {"kept": {}, "hospital": "cardiac"})(), 1, "x") is None
    third = client_app.train(msg, context)     # not resent: it would train, and the 2-round budget is spent
    status = dict(third.content.config_records["status"])
    assert "resent" not in status and status["status"] == "budget-exhausted"


def test_a_damaged_kept_update_is_trained_again_not_a_crash(tmp_path, caplog):
    """The kept update of a charged round, damaged on disk (a disk fault, a partial restore): the round is
    trained again and charged again (a second release, paid for), with a warning naming the file; before,
    safetensors' error crashed every request for that round."""
    import torch

    from client import rounds

    ledger = type("L", (), {"kept": {"1": "k"}, "hospital": "cardiac"})()
    path = rounds.keep(tmp_path, 1, "k", {"fusion.w": torch.ones(3)}, {"train_loss": 0.5})
    state, metrics = rounds.kept(tmp_path, ledger, 1, "k")
    assert torch.equal(state["fusion.w"], torch.ones(3)) and metrics == {"train_loss": 0.5}
    path.write_bytes(path.read_bytes()[:20])                       # cut short
    with caplog.at_level("WARNING"):
        assert rounds.kept(tmp_path, ledger, 1, "k") is None
    assert str(path) in caplog.text and "charged again" in caplog.text


def test_a_round_follows_the_piece_of_the_schedule_its_plan_names(run):
    """lr-from / lr-to in the round's plan (federation.lr_schedule=stage): a round at the very end of
    the curve trains at a learning rate near 0; a malformed window is refused before anything is spent."""
    message, context, state, ledger_dir = run

    def moved(reply) -> float:
        arrays = wire_arrays(reply.content.array_records["arrays"])
        return max(float(np.abs(arrays[k] - state[k].numpy()).max()) for k in state)

    late = message("train")
    late.content.config_records["config"]["lr-from"] = 0.999
    late.content.config_records["config"]["lr-to"] = 1.0
    near_zero = moved(client_app.train(late, context))
    assert near_zero < 0.01 * moved(client_app.train(message("train", server_round=2), context))
    before = (ledger_dir / LEDGER_FILE).read_text()
    bad = message("train", server_round=2)
    bad.content.config_records["config"]["lr-from"] = 0.5
    bad.content.config_records["config"]["lr-to"] = 0.25
    with pytest.raises(ValueError, match="lr-from=0.5"):
        client_app.train(bad, context)
    assert (ledger_dir / LEDGER_FILE).read_text() == before


def test_a_hospital_that_fails_mid_round_charges_nothing(run, monkeypatch):
    message, context, _, ledger_dir = run
    client_app.train(message("train"), context)
    before = (ledger_dir / LEDGER_FILE).read_text()

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr("medvlm.train.train_local", crash)
    with pytest.raises(RuntimeError):
        client_app.train(message("train", server_round=2), context)
    assert (ledger_dir / LEDGER_FILE).read_text() == before


def test_the_reply_ledger_field_carries_only_mechanisms():
    from medvlm.wire import check_status

    good = json.dumps([{"stage": "vqa", "noise_multiplier": 0.6, "sample_rate": 0.01, "steps": 10}])
    check_status({"hospital": "a", "status": "trained", "ledger": good})
    for bad in ("not json", json.dumps([{"stage": "vqa", "noise_multiplier": 0.6, "sample_rate": 0.01, "steps": 10,
                                         "image": "AAAA"}]),
                json.dumps([{"stage": "vqa", "noise_multiplier": float("nan"), "sample_rate": 0.01, "steps": 1}]),
                json.dumps([{"stage": "a b/c", "noise_multiplier": 1, "sample_rate": 0.01, "steps": 1}])):
        with pytest.raises(EgressError):
            check_status({"hospital": "a", "status": "trained", "ledger": bad})
