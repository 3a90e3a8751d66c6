"""The coordinator: update validation, aggregation, and the round loop (checkpoints, resume,
crash tolerance, budget exhaustion) through the real ServerApp loop and ClientApp handlers."""

import json
import shlex

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from client import app as client_app
from medvlm.config import load_config
from medvlm.runs import load_trainable
from medvlm.tensors import spec_of
from medvlm.wire import to_wire
from server.app import run_federation
from server.strategy import MedFedAvg
from tests.conftest import TINY_OVERRIDES, wire_arrays
from simulations.inprocess import InProcessGrid, Killed, set_task_identity

SPEC_STATE = {"fusion.w": torch.zeros(2, 3), "language.x.lora_A.default.weight": torch.zeros(4)}


def _reply(to: Message, state=None, *, examples=10, hospital="h", status="trained", extra=None, arrays=None):
    content = RecordDict({"metrics": MetricRecord({"num-examples": examples}),
                          "status": ConfigRecord({"hospital": hospital, "status": status})})
    if arrays is not None or state is not None:
        content["arrays"] = arrays or ArrayRecord({k: Array(v) for k, v in to_wire(state).items()})
    if extra:
        content["extra"] = extra
    return Message(content, reply_to=to)


def test_only_valid_updates_are_averaged_and_every_rejection_has_a_reason():
    set_task_identity()
    strategy = MedFedAvg(spec=spec_of(SPEC_STATE), num_rounds=1, local_epochs=1, lr=1e-3, max_update_bytes=10_000,
                         min_available_nodes=1, min_train_nodes=1)
    out = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")
    good_a = {k: torch.full_like(v, 1.0) for k, v in SPEC_STATE.items()}
    good_b = {k: torch.full_like(v, 4.0) for k, v in SPEC_STATE.items()}
    nan = {k: torch.full_like(v, float("nan")) for k, v in SPEC_STATE.items()}
    shaped = {**good_a, "fusion.w": torch.zeros(3, 2)}
    extra = {**good_a, "vision.visual.proj": torch.zeros(2)}
    replies = [
        _reply(out, good_a, examples=10, hospital="a"), _reply(out, good_b, examples=30, hospital="b"),
        _reply(out, nan, hospital="nan"), _reply(out, shaped, hospital="shape"), _reply(out, extra, hospital="extra"),
        _reply(out, hospital="exhausted", status="budget-exhausted"),
        Message(Error(code=0, reason="RuntimeError: hospital crashed"), reply_to=out),
        _reply(out, good_a, hospital="smuggler", extra=ConfigRecord({"texts": "a report"})),
        _reply(out, hospital="empty"),
    ]
    strategy.max_update_bytes = 10_000
    arrays, metrics = strategy.aggregate_train(1, replies)
    mean = arrays["fusion.w"].numpy()
    assert np.allclose(mean, (10 * 1.0 + 30 * 4.0) / 40)            # FedAvg weighted by num-examples
    reasons = {r["hospital"]: r["reason"] for r in strategy.report.rejected}
    assert "NaN" in reasons["nan"] and "shape" in reasons["shape"] and "unknown tensor" in reasons["extra"]
    assert "unexpected record" in reasons["smuggler"] and "no trainable state" in reasons["empty"]
    assert strategy.report.hospitals["exhausted"]["status"] == "budget-exhausted"
    assert "crashed" in strategy.report.failed[0]["reason"]
    strategy.max_update_bytes = 10                                    # oversized payloads are not even read
    strategy.aggregate_train(2, [_reply(out, good_a, hospital="big")])
    assert "exceeds federation.max_update_mb" in strategy.report.rejected[-1]["reason"]


@pytest.fixture
def federation(tmp_path):
    overrides = TINY_OVERRIDES + ["data.hospitals=[general,oncology,cardiac]", "federation.local_epochs=1"]

    def start(rounds: int, *, extra=(), crash_nodes=(), run_dir=None, kill_at_round=None, silent=None,
              kill_after_training=None, unavailable=None, crash_evaluate=False):
        run_config = {"preset": "tiny", "overrides": shlex.join(overrides + list(extra))}
        cfg = load_config("tiny", overrides + list(extra) + [f"federation.rounds={rounds}"])
        nodes = {10 + i: {"partition-id": i} for i in range(3)}

        def crash(msg, context):
            raise RuntimeError("simulated hospital crash")

        grid = InProcessGrid(nodes, {"train": client_app.train, "evaluate": client_app.evaluate}, run_config,
                             overrides={node: {"train": crash, **({"evaluate": crash} if crash_evaluate else {})}
                                        for node in crash_nodes} or None,
                             kill_at_round=kill_at_round, silent=silent, kill_after_training=kill_after_training,
                             unavailable=unavailable)
        summary = run_federation(grid, cfg, run_dir or tmp_path / "run")
        return summary, grid
    return start, tmp_path / "run"


def test_federation_runs_checkpoints_and_resumes_with_ledgers_intact(federation, tiny_model):
    start, run_dir = federation
    with pytest.raises(Killed):
        start(2, kill_at_round=2)                                     # the coordinator dies in round 2
    state = json.loads((run_dir / "server-state.json").read_text())
    assert state["round"] == 1 and set(state["privacy"]) == {"general", "oncology", "cardiac"}
    load_trainable(tiny_model, run_dir / "global")                   # the exported PEFT adapter + fusion
    saved = {k: v.numpy() for k, v in tiny_model.trainable_state().items()}
    ledgers = {h: json.loads((run_dir / "hospitals" / h / "privacy-ledger.json").read_text())
               for h in state["privacy"]}

    summary, grid = start(2)                                          # started again
    train_msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert {int(m.content["config"]["server-round"]) for m in train_msgs} == {2}   # resumed at round 2
    sent = wire_arrays(train_msgs[0].content.array_records["arrays"])
    assert all(np.array_equal(sent[k], saved[k]) for k in saved)  # with the checkpointed state
    for h, before in ledgers.items():
        after = json.loads((run_dir / "hospitals" / h / "privacy-ledger.json").read_text())
        assert after["rounds"] == [1, 2] and after["noise_multiplier"] == before["noise_multiplier"]
        assert summary["privacy"][h]["steps"] == sum(x[2] for x in after["history"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]         # round 0: the starting point, evaluated
    assert summary["rounds"] == 2 and all(e <= 8.0 + 1e-6 for e in summary["epsilon"].values())
    last = records[-1]
    assert summary["final_accuracy"] == last["accuracy"] and summary["baseline_accuracy"] == last["baseline_accuracy"]
    sent = [h["bytes_up"] for r in records for h in r["hospitals"].values() if h.get("bytes_up")]
    assert summary["bytes_sent_per_round"] == pytest.approx(sum(sent) / len(sent)) and sent
    assert set(summary["privacy"]) == set(summary["hospitals"]) == set(ledgers)
    assert (run_dir / "plots.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="train.lr"):               # resuming with another experiment
        start(3, extra=["train.lr=0.5"])


def test_every_hospital_draws_its_own_dp_noise_in_every_round(federation):
    """Through the real ClientApp: the coordinator sends every hospital the same state, plan and
    train.seed, yet no two DP updates may share their noise, across hospitals or across one
    hospital's rounds (noise the coordinator could regenerate from what it sent protects nothing).
    At a tiny epsilon the updates are almost all noise: shared noise shows as a cosine near 1."""
    start, _ = federation
    summary, grid = start(2, extra=["privacy.target_epsilon=1", "train.optimizer=sgd", "federation.lr=0.1"])
    assert summary["rounds"] == 2 and all(0 < e <= 1 + 1e-6 for e in summary["epsilon"].values())
    changes = {}
    for sent, reply in zip([m for m in grid.sent if m.metadata.message_type == "train"],
                           [m for m in grid.received if m.metadata.message_type == "train"]):
        assert reply.metadata.reply_to_message_id == sent.metadata.message_id
        before, after = wire_arrays(sent.content["arrays"]), wire_arrays(reply.content["arrays"])
        key = (reply.content["status"]["hospital"], int(sent.content["config"]["server-round"]))
        changes[key] = torch.cat([torch.from_numpy(after[k] - before[k]).flatten().double() for k in sorted(before)])
    assert len(changes) == 6 and all(c.norm() > 0 for c in changes.values())
    keys = sorted(changes)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            cos = float(torch.nn.functional.cosine_similarity(changes[a], changes[b], dim=0))
            assert abs(cos) < 0.2, f"{a} and {b}: cosine {cos:.3f}: their DP noise is shared"


def test_rounds_sharing_one_schedule_are_each_sent_their_piece_of_it(federation):
    """federation.lr_schedule=stage: round k of n asks each hospital to train over ((k - 1) / n, k / n)
    of one warm-up + cosine (the default asks for the whole curve every round)."""
    start, _ = federation
    _, grid = start(2, extra=["federation.lr_schedule=stage"])
    plans = {(int(m.content["config"]["server-round"]), m.content["config"]["lr-from"], m.content["config"]["lr-to"])
             for m in grid.sent if m.metadata.message_type == "train"}
    assert plans == {(1, 0.0, 0.5), (2, 0.5, 1.0)}


def test_a_coordinator_crash_after_the_hospitals_trained_costs_no_privacy_twice(federation):
    """Killed once every hospital trained round 2 (and charged it) but before their replies were
    aggregated: the resumed coordinator asks for round 2 again with the same state, and each hospital
    sends its kept update. Each ledger records round 2 once, and the summary's mechanisms recompute
    each ledger's epsilon exactly."""
    from medvlm.privacy import epsilon

    start, run_dir = federation
    with pytest.raises(Killed):
        start(2, kill_after_training=2)
    charged = {h: json.loads((run_dir / "hospitals" / h / "privacy-ledger.json").read_text())
               for h in ("general", "oncology", "cardiac")}
    assert all(led["rounds"] == [1, 2] for led in charged.values())
    summary, grid = start(2)
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["round"] == 2 and all(h.get("resent") for h in record["hospitals"].values())
    for h, before in charged.items():
        after = json.loads((run_dir / "hospitals" / h / "privacy-ledger.json").read_text())
        assert after["rounds"] == [1, 2] and after["history"] == before["history"]
        p = summary["privacy"][h]
        history = [(m["noise_multiplier"], m["sample_rate"], m["steps"]) for m in p["mechanisms"]]
        assert sum(m["steps"] for m in p["mechanisms"]) == p["steps"] == sum(x[2] for x in after["history"])
        assert epsilon(history, delta=p["delta"], accountant=p["accountant"]) == pytest.approx(p["epsilon"], abs=1e-9)


def test_a_crashing_hospital_does_not_stop_the_federation(federation):
    start, run_dir = federation
    summary, _ = start(1, crash_nodes={11})
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])
    assert len(record["failed"]) == 1 and "simulated hospital crash" in record["failed"][0]["reason"]
    assert sum(h["status"] == "trained" for h in record["hospitals"].values()) == 2
    assert summary["final_accuracy"] is not None and summary["failed_replies"] == 1


def test_a_round_in_which_every_hospital_fails_stops_the_run_saying_why(federation):
    """Every hospital crashing (a fault of the run, not of one site) stops the run at that round with
    the hospitals' one-line reason, instead of running every round for nothing and saying 'completed'."""
    start, run_dir = federation
    summary, _ = start(3, crash_nodes={10, 11, 12})
    assert summary["rounds"] == 1 and summary["stopped"].startswith("stopped after round 1: every hospital "
                                                                    "failed to train (")
    assert summary["stopped"].endswith("): crashed: RuntimeError: simulated hospital crash")
    assert set(summary["stopped"].split("(", 1)[1].split(")", 1)[0].split(", ")) == {"general", "oncology", "cardiac"}
    assert len(summary["stopped"].splitlines()) == 1
    assert (run_dir / "server-state.json").exists()                 # resumable once the fault is fixed


def test_a_run_stopped_at_round_0_evaluates_the_start_again_when_resumed(federation):
    """Every hospital failing round 0's evaluation stops the run there; resumed once fixed, the start is
    evaluated again (it was taken as done: the run had no starting accuracy for ever)."""
    start, run_dir = federation
    summary, _ = start(1, crash_nodes={10, 11, 12}, crash_evaluate=True)
    assert summary["stopped"].startswith("stopped at round 0 (evaluating the start): every hospital failed to "
                                         "evaluate (")
    assert summary["initial_accuracy"] is None
    summary, grid = start(1)
    assert summary["stopped"] == "completed" and summary["initial_accuracy"] is not None
    assert {int(m.content["config"]["server-round"]) for m in grid.sent if m.metadata.message_type == "evaluate"} \
        == {0, 1}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1] and records[0]["accuracy"] is not None


def test_flowers_and_rays_wrapping_of_an_app_s_exception_is_read_to_its_message():
    from flwr.app import Error

    from server.strategy import failure_reason

    deployed = "<class 'ValueError'>:<'site privacy policy: max-grad-norm=inf must be > 0'>"
    assert failure_reason(Error(code=2, reason=deployed)) == ("crashed: ValueError: site privacy policy: "
                                                              "max-grad-norm=inf must be > 0")
    simulated = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()"
                 "\x1b[39m (pid=1)\n  File \"client/app.py\", line 74, in _site\n    site = SITES.site(...)\n"
                 "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred. "
                 "Message: site privacy policy: max-grad-norm=inf must be > 0'>")
    assert failure_reason(Error(code=2, reason=simulated)) == ("crashed: site privacy policy: max-grad-norm=inf "
                                                               "must be > 0")


def test_a_hospital_gone_is_one_failure_with_its_true_reason(federation):
    """The SuperLink answers for a SuperNode that stopped sending heartbeats (its error reply comes from
    the SuperLink's node id): one record for the hospital, saying so, not a second, false timeout."""
    start, run_dir = federation
    summary, _ = start(1, unavailable={11})
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])
    assert len(record["failed"]) == 1, record["failed"]
    failure = record["failed"][0]
    assert failure["node"] == 11 and failure["reason"].startswith("node unavailable")
    assert failure["phase"] == "train, evaluate" and "timeout" not in failure["reason"]
    assert record["evaluation_asked"] == 3 and len(record["evaluated_hospitals"]) == 2
    assert summary["failed_replies"] == 2     # round 0's evaluation and round 1: one each


def test_a_federation_short_of_hospitals_stops_saying_who_is_missing(federation):
    from server.app import wait_for_hospitals

    grid = type("Grid", (), {"get_node_ids": lambda self: [10, 11]})()
    reason = wait_for_hospitals(grid, {10: "general", 11: "oncology", 12: "cardiac"}, min_nodes=3, wait_s=0.3,
                                poll_s=0.1)
    assert "2 of federation.min_nodes=3" in reason and "cardiac (node 12)" in reason
    assert wait_for_hospitals(grid, {}, min_nodes=2, wait_s=0) is None
    start, run_dir = federation
    summary, _ = start(1, extra=["federation.min_nodes=4", "federation.node_wait_s=0.2"])
    assert summary["rounds"] == 0 and "3 of federation.min_nodes=4" in summary["stopped"]


def test_federation_finishes_cleanly_when_every_budget_is_spent(federation):
    start, run_dir = federation
    first, _ = start(1)                   # each hospital plans its whole budget for this one round
    summary, _ = start(3)                 # extended: nobody can train any more
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["round"] == 2 and {h["status"] for h in last["hospitals"].values()} == {"budget-exhausted"}
    assert "privacy budget is spent" in summary["stopped"] and summary["rounds"] == 2
    assert summary["epsilon"] == first["epsilon"] and all(e <= 8.0 + 1e-6 for e in summary["epsilon"].values())


def test_a_hospital_that_never_replies_is_left_out_and_reported(federation):
    start, run_dir = federation
    summary, _ = start(1, silent={12})
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])
    assert any("no reply within federation.timeout_s" in f["reason"] for f in record["failed"])
    assert sum(h["status"] == "trained" for h in record["hospitals"].values()) == 2
    assert summary["final_accuracy"] == record["accuracy"] and summary["evaluated_round"] == 1


# ----------------------------------------------------------------------------- central DP (Flower's wrapper)
def _central(noise: float, clip: float, spec_state):
    from server.strategy import CentralDP

    strategy = MedFedAvg(spec=spec_of(spec_state), num_rounds=1, local_epochs=1, lr=1e-3, max_update_bytes=10**8,
                         min_available_nodes=1, min_train_nodes=1, uniform_weights=True)
    dp = CentralDP(strategy, noise_multiplier=noise, clipping_norm=clip)
    dp.current_arrays = ArrayRecord({k: Array(v) for k, v in to_wire(spec_state).items()})  # the global state sent
    return strategy, dp


def test_central_dp_clips_each_update_and_averages_them_equally():
    set_task_identity()
    strategy, dp = _central(0.0, 0.5, SPEC_STATE)
    out = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")
    big_a = {k: torch.full_like(v, 1.0) for k, v in SPEC_STATE.items()}          # update norm sqrt(10)
    big_b = {k: torch.full_like(v, -4.0) for k, v in SPEC_STATE.items()}         # norm 4 sqrt(10)
    small = {k: torch.full_like(v, 0.01) for k, v in SPEC_STATE.items()}         # norm 0.03: inside the bound
    nan = {k: torch.full_like(v, float("nan")) for k, v in SPEC_STATE.items()}
    replies = [_reply(out, big_a, examples=10, hospital="a"), _reply(out, big_b, examples=1000, hospital="b"),
               _reply(out, small, examples=5, hospital="s"), _reply(out, nan, hospital="nan")]
    accepted = strategy.screen(1, replies)                          # what the round loop does first
    assert [r["hospital"] for r in strategy.report.rejected] == ["nan"]
    arrays, _ = dp.aggregate_train(1, accepted)
    mean = np.concatenate([arrays[k].numpy().ravel() for k in SPEC_STATE])
    unit = 0.5 / np.sqrt(10)
    expected = (unit - unit + 0.01) / 3                             # each clipped to 0.5, equal weights
    assert np.allclose(mean, expected, atol=1e-7)
    assert np.linalg.norm(mean) <= 0.5 + 1e-6 and dp.releases == 1


def test_central_dp_noise_has_the_calibrated_scale():
    set_task_identity()
    state = {"fusion.w": torch.zeros(100, 100)}
    strategy, dp = _central(2.0, 0.1, state)
    out = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")
    rng = np.random.default_rng(0)
    updates = [{"fusion.w": torch.from_numpy(rng.normal(0, 1e-6, (100, 100)).astype(np.float32))} for _ in range(4)]
    replies = [_reply(out, u, hospital=h) for u, h in zip(updates, "abcd")]   # tiny updates: nearly pure noise
    replies.append(_reply(out, state, hospital="same"))                       # no change: cannot be clipped
    arrays, _ = dp.aggregate_train(1, strategy.screen(1, replies))
    noise = arrays["fusion.w"].numpy()
    assert noise.dtype == np.float32
    assert abs(noise.std() / (2.0 * 0.1 / 4) - 1) < 0.05           # sigma * C / hospitals averaged
    assert strategy.report.rejected[-1]["hospital"] == "same"


def test_central_dp_refuses_updates_it_cannot_clip():
    from server.strategy import CentralDP

    bf16 = {"fusion.w": torch.zeros(2, 2, dtype=torch.bfloat16)}
    strategy = MedFedAvg(spec=spec_of(bf16), num_rounds=1, local_epochs=1, lr=1e-3, max_update_bytes=10**6,
                         uniform_weights=True)
    with pytest.raises(ValueError, match="float32"):
        CentralDP(strategy, noise_multiplier=1.0, clipping_norm=1.0)


def test_central_dp_takes_effect_in_the_federation(federation, tiny_model):
    start, run_dir = federation
    clip = 1e-3
    summary, grid = start(1, extra=["federation.central_dp.enabled=true", "federation.central_dp.noise_multiplier=0",
                                    f"federation.central_dp.clipping_norm={clip}"])
    sent = wire_arrays(next(m for m in grid.sent if m.metadata.message_type == "train").content.array_records["arrays"])
    load_trainable(tiny_model, run_dir / "global")
    after = tiny_model.trainable_state()
    change = np.sqrt(sum(float(((after[k].numpy() - sent[k]) ** 2).sum()) for k in after))
    assert 0 < change <= clip * (1 + 1e-4)                          # DP-SGD alone moves it far more
    assert summary["central_dp"]["releases"] == 1 and summary["central_dp"]["epsilon"] is None
    assert all(e <= 8.0 + 1e-6 for e in summary["epsilon"].values())   # sample-level DP-SGD stayed on


def test_secure_aggregation_and_central_dp_cannot_be_combined(federation):
    start, _ = federation
    with pytest.raises(ValueError, match="cannot clip updates it never sees"):
        start(1, extra=["federation.secure_aggregation=secagg+", "federation.central_dp.enabled=true"])


# ----------------------------------------------------------------------------- SecAgg+ (Flower's legacy workflow)
def test_secure_aggregation_reveals_only_the_mean_update(tmp_path):
    from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
    from flwr.compat.common.recorddict_compat import recorddict_to_fitres

    from client.app import secure_aggregation_mod
    from medvlm.build import build_medvlm
    from medvlm.wire import legacy_order

    overrides = TINY_OVERRIDES + ["data.hospitals=[general,oncology,cardiac]", "federation.local_epochs=1",
                                  "federation.secure_aggregation=secagg+"]
    cfg = load_config("tiny", overrides + ["federation.rounds=1"])
    plain = {}

    def spy(msg, context):                       # what each hospital hands to secaggplus_mod (unmasked)
        reply = client_app.train(msg, context)
        plain[context.node_id] = recorddict_to_fitres(reply.content, keep_input=True)
        return reply

    grid = InProcessGrid({10 + i: {"partition-id": i} for i in range(3)},
                         {"train": lambda m, c: secure_aggregation_mod(m, c, spy), "evaluate": client_app.evaluate},
                         {"preset": "tiny", "overrides": shlex.join(overrides)})
    summary = run_federation(grid, cfg, tmp_path / "run")
    assert summary["rounds"] == 1 and len(plain) == 3
    assert set(summary["epsilon"]) == {"general", "oncology", "cardiac"}        # metrics still arrive

    # what reached the coordinator: no tensors at all, one masked vector per hospital
    secure = [m for m in grid.received if m.metadata.message_type == "train"]
    assert secure and all(not any(len(r) for r in m.content.array_records.values()) for m in secure)
    masked = [m.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] for m in secure
              if Key.MASKED_PARAMETERS in m.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(masked) == 3
    assert all(max(bytes_to_ndarray(b).max() for b in vec) > 2**28 for vec in masked)  # masks span the modulus

    # and yet the new global state = old + the example-weighted mean of the plain updates
    sent = next(m for m in grid.sent if "fitins.parameters" in m.content.array_records)
    before = [a.numpy() for a in sent.content.array_records["fitins.parameters"].values()]
    total = sum(r.num_examples for r in plain.values())
    mean = [sum(r.num_examples / total * parameters_to_ndarrays(r.parameters)[i] for r in plain.values())
            for i in range(len(before))]
    model = build_medvlm(cfg.model, seed=0)
    load_trainable(model, tmp_path / "run" / "global")
    after = model.trainable_state()
    for i, name in enumerate(legacy_order(model.trainable_spec())):
        assert np.allclose(after[name].numpy(), before[i] + mean[i], atol=2e-5), name


def test_a_bad_securely_aggregated_mean_is_refused(tiny_model):
    from medvlm.wire import legacy_order
    from server.secagg import apply_mean_update

    spec = tiny_model.trainable_spec()
    names = legacy_order(spec)
    current = [tiny_model.trainable_state()[n].numpy() for n in names]
    ok, _ = apply_mean_update(current, [np.full_like(c, 0.5) for c in current], names=names, spec=spec)
    assert ok is not None and np.allclose(ok[names[0]].numpy(), current[0] + 0.5)
    nan = [np.zeros_like(c) for c in current]
    nan[3][...] = np.nan
    new, reason = apply_mean_update(current, nan, names=names, spec=spec)
    assert new is None and names[3] in reason and "finite" in reason
    new, reason = apply_mean_update(current, current[:-1], names=names, spec=spec)
    assert new is None and f"this model has {len(names)}" in reason
    new, reason = apply_mean_update(current, [c.ravel() for c in current], names=names, spec=spec)
    assert new is None and "shape" in reason


def test_a_hospital_name_is_one_node_s_and_nothing_a_log_line_can_hide_in(caplog):
    """Names are self-declared in replies: a second node claiming a name another node of the round holds,
    or a name with a newline (a forged log line), is recorded under its node id, and says so."""
    from server.strategy import Origins

    set_task_identity()
    origins = Origins()
    out = {n: Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="train") for n in (1, 2, 3)}
    origins.sent(out.values())
    assert origins(_reply(out[1], hospital="st-mary")) == ("st-mary", 1)
    assert origins(_reply(out[2], hospital="st-mary")) == ("node-2", 2)          # was: st-mary, overwriting 1
    assert origins(_reply(out[3], hospital="x\nround 9: all hospitals fine")) == ("node-3", 3)
    assert "node 2 names itself 'st-mary', the name of node 1" in caplog.text
    origins.sent(out.values())                                                   # the impostor answers first
    assert origins(_reply(out[2], hospital="st-mary")) == ("node-2", 2)
    assert origins(_reply(out[1], hospital="st-mary")) == ("st-mary", 1)
    origins.sent([out[2]])                                  # st-mary's node is gone: back on a new node id
    assert origins(_reply(out[2], hospital="st-mary")) == ("st-mary", 2)


def test_a_hospital_s_words_are_one_line_of_the_log_at_most_a_status_line_long(caplog):
    set_task_identity()
    strategy = MedFedAvg(spec=spec_of(SPEC_STATE), num_rounds=1, local_epochs=1, lr=1e-3, max_update_bytes=10_000,
                         min_available_nodes=1, min_train_nodes=1)
    out = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")
    forged = "spent\n2026-12-07 12:00:00 INFO medvlm.server: round 1: all hospitals trained " + "x" * 5000
    reply = _reply(out, hospital="a", status="budget-exhausted")
    reply.content.config_records["status"]["reason"] = forged
    strategy.aggregate_train(1, [reply])
    reason = strategy.report.hospitals["a"]["reason"]
    assert "\n" not in reason and len(reason) == 500 and reason.startswith("spent 2026-12-07")
    assert not any(line.startswith("2026-12-07 12:00:00") for line in caplog.text.splitlines())


def test_an_evaluation_with_no_questions_anywhere_says_nothing_was_scored(caplog):
    set_task_identity()
    strategy = MedFedAvg(spec=spec_of(SPEC_STATE), num_rounds=1, local_epochs=1, lr=1e-3, max_update_bytes=10_000,
                         min_available_nodes=1, min_train_nodes=1)
    out = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="evaluate")
    empty = {"num-examples": 0, "closed_correct": 0, "closed_total": 0, "open_correct": 0, "open_total": 0}

    def reply(counts):
        msg = _reply(out, hospital="tiny", status="evaluated")
        msg.content.metric_records["metrics"] = MetricRecord(counts)
        return msg

    assert strategy.aggregate_evaluate(0, [reply(empty)])["closed_total"] == 0
    assert "round 0: the hospitals that evaluated hold no validation questions" in caplog.text
    caplog.clear()
    strategy.aggregate_evaluate(1, [reply({**empty, "num-examples": 3, "closed_correct": 2, "closed_total": 3})])
    assert "no validation questions" not in caplog.text


def test_failure_reasons_say_what_happened():
    from flwr.app import Error

    from server.strategy import failure_reason

    assert failure_reason(Error(code=5, reason="Error: Node Unavailable - ...")).startswith("node unavailable")
    assert failure_reason(Error(code=2, reason="RuntimeError: boom")) == "crashed: RuntimeError: boom"
    refusal = "refused by st-mary: the run's app is not the app this hospital installed"
    assert failure_reason(Error(code=2, reason=refusal)) == refusal          # the site's words, not "crashed"


def test_the_config_and_the_strategy_know_the_same_aggregations():
    from medvlm.config import AGGREGATIONS as NAMED
    from server.strategy import AGGREGATIONS as BUILT

    assert set(NAMED) == set(BUILT)


def test_every_float32_feature_names_a_tensor_and_what_to_do():
    from medvlm.tensors import TensorSpec
    from medvlm.wire import check_transport
    from server.secagg import check_secure_aggregation

    spec = {"fusion.w": TensorSpec((2, 2), "float32"), "language.lora_B": TensorSpec((2, 2), "bfloat16")}
    with pytest.raises(ValueError, match=r"transport=int8 works on float32.*'language.lora_B': bfloat16.*fp32"):
        check_transport(spec, "int8")
    with pytest.raises(ValueError, match=r"secagg\+ \(its masks\) works on float32.*lora_B"):
        check_secure_aggregation(spec)
    check_transport(spec, "fp32")                                    # fp32 carries any dtype as it is


def _stepped(aggregation: str, rounds: list[tuple[float, float]], *, transport: str = "fp32", **server):
    """A server optimizer after one round per (reply a, reply b) pair, replies weighted 10 : 30 and every
    tensor filled with one value; returns the strategy and the global value after each round."""
    from server.strategy import make_strategy

    set_task_identity()
    strategy = make_strategy(aggregation, spec=spec_of(SPEC_STATE), num_rounds=len(rounds), local_epochs=1, lr=1e-3,
                             max_update_bytes=10_000, min_available_nodes=1, min_train_nodes=1, transport=transport,
                             **server)
    grid = InProcessGrid({1: {}}, {}, {})
    value, values = 1.0, []
    for server_round, (a, b) in enumerate(rounds, start=1):
        state = {k: torch.full_like(v, value) for k, v in SPEC_STATE.items()}
        out = list(strategy.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in to_wire(state).items()}),
                                            ConfigRecord({}), grid))[0]
        replies = [_reply(out, {k: torch.full_like(v, x) for k, v in SPEC_STATE.items()}, examples=n, hospital=h)
                   for x, n, h in ((a, 10, "a"), (b, 30, "b"))]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        new = {k: v.numpy() for k, v in arrays.items()}
        assert list(new) == list(SPEC_STATE) and all(np.allclose(v, v.flat[0]) for v in new.values())
        assert all(v.dtype == np.float32 for v in new.values())     # what the allow-list accepts back
        value = float(new["fusion.w"].flat[0])
        values.append(value)
    return strategy, values


def test_server_optimizers_step_along_the_mean_update_from_the_float32_state():
    # the mean reply is 0.25 * 2 + 0.75 * 4 = 3.5: an update of +2.5 from the global 1.0
    assert _stepped("fedavgm", [(2.0, 4.0)], server_lr=1.0, server_momentum=0.0)[1] == pytest.approx([3.5])  # FedAvg
    assert _stepped("fedavgm", [(2.0, 4.0)], server_lr=2.0, server_momentum=0.0)[1] == pytest.approx([6.0])
    # momentum: round 2's update (+1 from 3.5) plus 0.9 of round 1's (+2.5)
    assert _stepped("fedavgm", [(2.0, 4.0), (4.0, 4.67)], server_lr=1.0,
                    server_momentum=0.9)[1] == pytest.approx([3.5, 3.5 + 0.9 * 2.5 + (0.25 * 4 + 0.75 * 4.67 - 3.5)])
    for aggregation in ("fedadam", "fedyogi"):   # every coordinate moves by about server_lr, the update's way
        _, (value,) = _stepped(aggregation, [(2.0, 4.0)], server_lr=0.01, server_momentum=0.9)
        assert 1.0 + 0.003 < value < 1.0 + 0.011
    # tau floors the root of the second moment: an update far smaller than tau moves by far less than
    # server_lr at Flower's 1e-3, by about server_lr once tau is far below it (a round's update here: 1e-5)
    small = [(1.0 + 1e-5, 1.0 + 1e-5)]
    for aggregation in ("fedadam", "fedyogi"):
        _, (damped,) = _stepped(aggregation, small, server_lr=0.01, server_momentum=0.9)
        _, (free,) = _stepped(aggregation, small, server_lr=0.01, server_momentum=0.9, server_tau=1e-9)
        assert 0.003 < free - 1.0 < 0.011 and damped - 1.0 < 0.01 * (free - 1.0)
    with pytest.raises(ValueError, match="server_tau is Adam's and Yogi's; fedavgm"):
        _stepped("fedavgm", small, server_tau=1e-9)
    # a compact transport sends the state encoded; the optimizer still steps from the float32 state
    from server.strategy import make_strategy

    for aggregation in ("fedavgm", "fedadam"):
        strategy = make_strategy(aggregation, spec=spec_of(SPEC_STATE), num_rounds=1, local_epochs=1, lr=1e-3,
                                 max_update_bytes=10_000, min_available_nodes=1, min_train_nodes=1, transport="int8",
                                 server_lr=0.01)
        state = {k: torch.full_like(v, 1.5) for k, v in SPEC_STATE.items()}
        out = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in to_wire(state).items()}),
                                            ConfigRecord({}), InProcessGrid({1: {}}, {}, {})))
        assert set(out[0].content.array_records["arrays"]) != set(SPEC_STATE)      # what travels is packed
        current = strategy.current_arrays
        current = {k: (a.numpy() if hasattr(a, "numpy") else a) for k, a in current.items()}
        assert list(current) == list(SPEC_STATE) and all(np.array_equal(current[k], state[k].numpy()) for k in state)


def test_server_optimizer_state_survives_a_checkpoint_and_is_checked(tmp_path):
    from server.strategy import make_strategy

    for aggregation, slots in (("fedavgm", {"momentum"}), ("fedadam", {"m", "v"}), ("fedyogi", {"m", "v"})):
        first, _ = _stepped(aggregation, [(2.0, 4.0)], server_lr=0.5, server_momentum=0.9)
        state = first.optimizer_state()
        assert {k.split("/")[0] for k in state} == slots and {k.split("/", 1)[1] for k in state} == set(SPEC_STATE)
        fresh = make_strategy(aggregation, spec=spec_of(SPEC_STATE), num_rounds=2, local_epochs=1, lr=1e-3,
                              max_update_bytes=10_000, server_lr=0.5, server_momentum=0.9)
        fresh.load_optimizer_state(state)
        assert all(np.array_equal(fresh.optimizer_state()[k], v) for k, v in state.items())
        with pytest.raises(ValueError, match="does not belong"):
            fresh.load_optimizer_state({**state, "m/vision.visual.proj": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="keeps no server optimizer state"):
        MedFedAvg(spec=spec_of(SPEC_STATE), num_rounds=1, local_epochs=1, lr=1e-3,
                  max_update_bytes=10_000).load_optimizer_state(state)


def test_a_resumed_federation_carries_on_with_its_server_optimizer(federation):
    from safetensors.numpy import load_file

    from server.app import set_up

    start, run_dir = federation
    extra = ["federation.aggregation=fedavgm", "federation.server_momentum=0.9"]
    with pytest.raises(Killed):
        start(2, extra=extra, kill_at_round=2)
    saved = load_file(str(run_dir / "checkpoints" / "round-001" / "server-optimizer.safetensors"))
    assert not (run_dir / "global" / "server-optimizer.safetensors").exists()   # the adapter users load stays clean
    cfg = load_config("tiny", TINY_OVERRIDES + ["data.hospitals=[general,oncology,cardiac]",
                                                "federation.local_epochs=1", "federation.rounds=2", *extra])
    rounds, *_ = set_up(InProcessGrid({1: {}}, {}, {}), cfg, run_dir)
    assert {k.split("/", 1)[0] for k in saved} == {"momentum"}
    assert {k.split("/", 1)[1] for k in saved} == set(rounds.spec)
    restored = rounds.strategy.optimizer_state()
    assert set(restored) == set(saved) and all(np.array_equal(restored[k], saved[k]) for k in saved)
    summary, _ = start(2, extra=extra)                                 # and the run completes
    assert summary["rounds"] == 2
    assert (run_dir / "checkpoints" / "round-002" / "server-optimizer.safetensors").is_file()


def test_a_damaged_server_optimizer_state_is_refused_naming_the_file(tmp_path):
    from server.checkpoint import OPTIMIZER_FILE, Checkpoints

    (tmp_path / "checkpoints" / "round-001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "round-001" / OPTIMIZER_FILE).write_bytes(b"not safetensors")
    points = Checkpoints(tmp_path, skeleton=None)
    with pytest.raises(ValueError, match="round-001.*cannot be read as tensors"):
        points.optimizer_state({"checkpoint": "checkpoints/round-001"})
    assert points.optimizer_state({"checkpoint": "checkpoints/round-002"}) == {}    # none kept: a plain rule
