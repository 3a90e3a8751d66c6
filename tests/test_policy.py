"""The hospital decides: a deployed site's privacy settings come from its node config, never from the
run config the coordinator sends; the ledger's budget is never raised by a run; a lost ledger is
refused. (The same attacks against real SuperLink/SuperNode processes: tests/test_deploy_e2e.py.)"""

import json
import logging
import shlex

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client import app as client_app
from client.ledger import LEDGER_FILE, Ledger
from client.policy import SitePolicy
from medvlm.config import PrivacyConfig
from medvlm.data.synthetic import generate_hospital, write_manifest
from medvlm.wire import to_wire
from tests.conftest import TINY_OVERRIDES
from simulations.inprocess import set_task_identity


def test_a_deployed_site_takes_nothing_about_privacy_from_the_run():
    node = {"hospital": "st-mary", "epsilon": 2.0, "min-noise": 0.5}
    weak = PrivacyConfig(enabled=False, target_epsilon=50.0, max_grad_norm=100.0, accountant="gdp", delta=0.1)
    policy = SitePolicy.for_site(node, weak)
    ours, notes = policy.govern(weak)
    assert (ours.enabled, ours.target_epsilon, ours.noise_multiplier) == (True, 2.0, None)
    assert (ours.delta, ours.max_grad_norm, ours.accountant) == (1e-5, 1.0, "rdp")   # the site's defaults
    assert {n.split("=")[0] for n in notes} == {"privacy.enabled", "privacy.target_epsilon", "privacy.delta",
                                                "privacy.max_grad_norm", "privacy.accountant"}
    assert policy.govern(PrivacyConfig(target_epsilon=2.0, accountant="rdp"))[1] == []   # nothing to say
    with pytest.raises(ValueError, match="epsilon=None.*--epsilon"):              # no budget, no training
        SitePolicy.for_site({"hospital": "st-mary"}, PrivacyConfig())
    with pytest.raises(ValueError, match="dp='maybe'"):
        SitePolicy.for_site({"hospital": "st-mary", "dp": "maybe", "epsilon": 1.0}, PrivacyConfig())
    for key, value in (("epsilon", "eight"), ("delta", ""), ("max-grad-norm", "1,0"), ("epsilon", True)):
        with pytest.raises(ValueError, match=f"node config.: {key}={value!r} is not a number"):   # was: no key named
            SitePolicy.for_site({"hospital": "st-mary", "epsilon": 1.0, key: value}, PrivacyConfig())
    assert SitePolicy.for_site({"hospital": "st-mary", "epsilon": "2.5"}, PrivacyConfig()).epsilon == 2.5
    off = SitePolicy.for_site({"hospital": "st-mary", "dp": "off"}, PrivacyConfig(target_epsilon=1.0))
    assert not off.govern(PrivacyConfig(target_epsilon=1.0))[0].enabled          # the site's own choice
    # a simulated site (Flower injects partition-id): the researcher's run config is every site's policy
    sim = SitePolicy.for_site({"partition-id": 0}, PrivacyConfig(target_epsilon=3.0, max_grad_norm=0.5))
    assert (sim.epsilon, sim.max_grad_norm) == (3.0, 0.5) and "simulation" in sim.source


def test_the_ledger_budget_is_never_raised_by_opening_it_and_a_lost_ledger_is_refused(tmp_path):
    args = dict(hospital="h", delta=1e-5, accountant="rdp", max_grad_norm=1.0)
    ledger, created = Ledger.init(tmp_path / "s", budget=4.0, **args)
    assert created and (tmp_path / "s" / LEDGER_FILE).is_file()
    assert Ledger.init(tmp_path / "s", budget=4.0, **args)[1] is False
    with pytest.raises(ValueError, match="never raised.*medvlm-fl ledger raise"):
        Ledger.open(tmp_path / "s", budget=50.0, **args)
    assert Ledger.open(tmp_path / "s", budget=2.0, **args).budget == 2.0          # lowering is the site's right
    ledger.raise_budget(6.0, reason="ethics board approval 2026-12")
    ledger.save(tmp_path / "s")
    assert Ledger.open(tmp_path / "s", budget=6.0, **args).budget_changes[0]["to"] == 6.0
    with pytest.raises(ValueError, match="reason"):
        ledger.raise_budget(9.0, reason=" ")
    for bad in (float("nan"), float("inf")):                 # was written: the ledger then could not be read
        with pytest.raises(ValueError, match="not a finite number above the current budget 6"):
            ledger.raise_budget(bad, reason="typo")
    ledger.budget = float("nan")                             # whatever sets a field, save writes nothing unreadable
    with pytest.raises(ValueError, match="budget=nan"):
        ledger.save(tmp_path / "s")
    assert Ledger.open(tmp_path / "s", budget=6.0, **args).budget == 6.0
    (tmp_path / "s" / LEDGER_FILE).unlink()
    with pytest.raises(ValueError, match="missing.*Restore it from backup"):
        Ledger.open(tmp_path / "s", budget=6.0, must_exist=True, **args)
    with pytest.raises(ValueError, match="has been used"):                         # tmp/, features/ ... left
        (tmp_path / "s" / "features").mkdir()
        Ledger.init(tmp_path / "s", budget=6.0, **args)


def test_the_noise_floor_is_the_sites(tmp_path):
    ledger = Ledger("h", 8.0, 1e-5, "rdp", 1.0)
    sigma = ledger.plan(sample_rate=0.1, steps_per_round=10, rounds_left=1)
    floored = Ledger("h", 8.0, 1e-5, "rdp", 1.0).plan(sample_rate=0.1, steps_per_round=10, rounds_left=1,
                                                      min_noise=sigma * 3)
    assert floored == pytest.approx(sigma * 3)


@pytest.fixture
def deployed(tmp_path, tiny_model):
    """A hospital as medvlm-fl supernode starts it: a data folder, a state dir with its ledger, its policy."""
    set_task_identity()
    manifest = write_manifest(generate_hospital("cardiac", 20, seed=3), tmp_path / "data")
    state = tmp_path / "state"
    Ledger.init(state, hospital="st-mary", budget=2.0, delta=1e-5, accountant="rdp", max_grad_norm=1.0)
    node = {"hospital": "st-mary", "data-path": str(manifest), "state-dir": str(state), "epsilon": 2.0}
    arrays = ArrayRecord({k: Array(v) for k, v in to_wire(tiny_model.trainable_state()).items()})

    def train(overrides: list[str], server_round: int = 1) -> RecordDict:
        run_config = {"preset": "tiny", "overrides": shlex.join(TINY_OVERRIDES + overrides)}
        config = ConfigRecord({"server-round": server_round, "num-rounds": 2, "local-epochs": 1.0, "lr": 1e-3})
        msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=7, message_type="train")
        context = Context(run_id=1, node_id=7, node_config=dict(node), state=RecordDict(), run_config=run_config)
        return client_app.train(msg, context).content

    return train, state


def test_the_coordinator_cannot_switch_dp_off_or_raise_the_budget(deployed, caplog):
    train, state = deployed
    reply = train(["privacy.enabled=false", "privacy.target_epsilon=50", "privacy.max_grad_norm=1000"])
    status = dict(reply.config_records["status"])
    metrics = dict(reply.metric_records["metrics"])
    assert status["status"] == "trained" and status["accountant"] == "rdp"
    assert "privacy.enabled=False proposed, True applied" in status["privacy"]          # said plainly
    assert "privacy.target_epsilon=50.0 proposed, 2.0 applied" in status["privacy"]
    assert metrics["noise_multiplier"] > 0 and 0 < metrics["epsilon"] <= 2.0 + 1e-6
    assert metrics["budget"] == 2.0 and metrics["max_grad_norm"] == 1.0
    ledger = json.loads((state / LEDGER_FILE).read_text())
    assert ledger["budget"] == 2.0 and ledger["rounds"] == [1] and ledger["history"][0][0] > 0
    assert "not applied" in caplog.text


def test_a_deployed_site_without_its_ledger_does_not_train(deployed):
    train, state = deployed
    (state / LEDGER_FILE).unlink()
    with pytest.raises(ValueError, match="privacy ledger .* is missing"):
        train([])
    assert not (state / LEDGER_FILE).exists()


def test_a_deployed_site_keeps_its_own_report_labeler(deployed, tmp_path):
    """data.labeler names what evaluation counts are called: a coordinator's ``shlex:split`` would send a
    count per word of the hospital's reports. A deployed site uses the labeler of its node config."""
    from client.site import build_site

    _, state = deployed
    node = {"hospital": "st-mary", "data-path": str(tmp_path / "data" / "manifest.jsonl"), "state-dir": str(state),
            "epsilon": 2.0}
    run_config = {"preset": "tiny", "overrides": shlex.join(TINY_OVERRIDES + ["data.labeler=shlex:split"])}
    site = build_site(run_config, node)
    assert site.cfg.data.labeler == "synthetic"
    assert "data.labeler=shlex:split proposed, synthetic applied" in site.policy_notes
    assert build_site(run_config, {**node, "labeler": "shlex:split"}).cfg.data.labeler == "shlex:split"   # its own


def test_a_site_that_does_not_evaluate_scores_nothing_and_says_why(deployed, tmp_path, tiny_model, monkeypatch,
                                                                  caplog):
    """Evaluation replies are exact counts on the validation split for whatever state the coordinator
    sends (a crafted model can answer right only on one patient's image). ``evaluate = "off"`` in the
    site's node config refuses before the state is loaded; the coordinator logs it and scores the rest."""
    from client.policy import SitePolicy
    from medvlm.tensors import spec_of
    from server.strategy import MedFedAvg

    caplog.set_level(logging.INFO)
    _, state = deployed
    node = {"hospital": "st-mary", "data-path": str(tmp_path / "data" / "manifest.jsonl"), "state-dir": str(state),
            "epsilon": 2.0}
    run_config = {"preset": "tiny", "overrides": shlex.join(TINY_OVERRIDES)}
    arrays = ArrayRecord({k: Array(v) for k, v in to_wire(tiny_model.trainable_state()).items()})

    def evaluate(node_config: dict) -> Message:
        msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 3})}), dst_node_id=7,
                      message_type="evaluate")
        return client_app.evaluate(msg, Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                                                run_config=run_config))

    counted = evaluate(node)                                                  # the default: exact counts
    assert dict(counted.content.config_records["status"])["status"] == "evaluated"

    def scored(*_, **__):
        raise AssertionError("a site with evaluate=off scored a coordinator-sent state")

    monkeypatch.setattr(client_app, "_load_global", scored)
    monkeypatch.setattr("medvlm.evaluate.predict", scored)
    refused = evaluate({**node, "hospital": "st-anne", "evaluate": "off"})
    status = dict(refused.content.config_records["status"])
    assert status["status"] == "not-evaluated" and "evaluate=off" in status["reason"]
    assert dict(refused.content.metric_records["metrics"]) == {} and not refused.content.array_records
    assert "evaluation refused" in caplog.text

    strategy = MedFedAvg(spec=spec_of(tiny_model.trainable_state()), num_rounds=1, local_epochs=1, lr=1e-3,
                         max_update_bytes=10_000_000, min_available_nodes=1, min_train_nodes=1)
    total = strategy.aggregate_evaluate(3, [counted, refused])
    assert total["closed_total"] == dict(counted.content.metric_records["metrics"])["closed_total"]
    assert sorted(strategy.report.evaluation) == ["st-mary"]
    assert "evaluate=off" in strategy.report.not_evaluated["st-anne"]
    assert "st-anne does not evaluate" in caplog.text
    with pytest.raises(ValueError, match="evaluate='sometimes'.*--evaluate off"):
        SitePolicy.for_site({**node, "evaluate": "sometimes"}, PrivacyConfig())
