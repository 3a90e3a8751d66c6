"""Aggregation that fits LoRA and DP: robust rules (median, trimmed mean), compact transport
(bf16 / int8 on the wire, float32 for aggregation) and FFA-LoRA (A frozen, only B sent)."""

import json
import shlex

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client import app as client_app
from medvlm.config import load_config
from medvlm.tensors import spec_of
from medvlm.wire import encode, to_wire
from server.app import run_federation
from server.strategy import MedFedAvg, make_strategy
from tests.conftest import TINY_OVERRIDES, wire_arrays
from simulations.inprocess import InProcessGrid, set_task_identity

GLOBAL = {"fusion.w": torch.zeros(3, 4), "language.lora_B": torch.zeros(5)}


def _strategy(aggregation="fedavg", **kw):
    set_task_identity()
    return make_strategy(aggregation, spec=spec_of(GLOBAL), num_rounds=1, local_epochs=1, lr=1e-3,
                         max_update_bytes=10**6, min_available_nodes=1, min_train_nodes=1, **kw)


def _reply(state, *, hospital, transport="fp32", reference=None, examples=10):
    out = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")
    arrays = ArrayRecord({k: Array(v) for k, v in encode(state, transport, reference).items()})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": examples}),
                               "status": ConfigRecord({"hospital": hospital, "status": "trained"})}), reply_to=out)


def _global_record():
    return ArrayRecord({k: Array(v) for k, v in to_wire(GLOBAL).items()})


@pytest.mark.parametrize("poison", [-20.0, 50.0])   # sign-flipped and scaled, or only scaled
def test_robust_rules_ignore_one_poisoned_hospital_where_fedavg_follows_it(poison):
    rng = np.random.default_rng(0)
    honest = [{k: torch.ones_like(v) + 0.1 * torch.from_numpy(rng.standard_normal(v.shape).astype(np.float32))
               for k, v in GLOBAL.items()} for _ in range(4)]
    bad = {k: poison * torch.ones_like(v) for k, v in GLOBAL.items()}
    results = {}
    for rule in ("fedavg", "median", "trimmed-mean"):
        strategy = _strategy(rule, trim_fraction=0.2)
        replies = [_reply(s, hospital=f"h{i}") for i, s in enumerate(honest)] + [_reply(bad, hospital="bad")]
        arrays, _ = strategy.aggregate_train(1, replies)
        results[rule] = arrays["fusion.w"].numpy()
    assert np.abs(results["fedavg"] - 1.0).max() > 3.0                  # the mean follows the attacker
    for rule in ("median", "trimmed-mean"):
        assert np.abs(results[rule] - 1.0).max() < 0.2, rule              # the robust rules do not


def test_robust_rules_cannot_follow_central_dp_or_secagg():
    with pytest.raises(ValueError, match="central DP"):
        load_config("tiny", ["federation.aggregation=median", "federation.central_dp.enabled=true"])
    with pytest.raises(ValueError, match="SecAgg"):
        load_config("tiny", ["federation.aggregation=trimmed-mean", "federation.secure_aggregation=secagg+"])
    with pytest.raises(ValueError, match="SecAgg"):
        load_config("tiny", ["federation.transport=bf16", "federation.secure_aggregation=secagg+"])
    with pytest.raises(ValueError, match="federation.aggregation"):
        load_config("tiny", ["federation.aggregation=krum"])


@pytest.mark.parametrize("transport", ["bf16", "int8"])
def test_compact_transport_aggregates_the_changes_onto_the_float32_master(transport):
    strategy = _strategy(transport=transport)
    master = {k: v + 0.37 for k, v in GLOBAL.items()}          # not representable exactly in bf16/int8 steps
    record = ArrayRecord({k: Array(v) for k, v in to_wire(master).items()})
    messages = list(strategy.configure_train(1, record, ConfigRecord({}), _FakeGrid()))
    sent = wire_arrays(messages[0].content["arrays"])
    assert messages[0].content["config"]["transport"] == transport
    assert sum(a.nbytes for a in sent.values()) <= sum(a.numpy().nbytes for a in record.values()) / 2 + 8
    received = {k: torch.from_numpy(np.asarray(v)) for k, v in
                __import__("medvlm.wire", fromlist=["decode"]).decode(
                    sent, spec_of(GLOBAL), transport).items()}
    changes = [{k: torch.full_like(v, 1e-3 * (i + 1)) for k, v in GLOBAL.items()} for i in range(2)]
    replies = [_reply({k: received[k] + c[k] for k in c}, hospital=f"h{i}", transport=transport, reference=received,
                      examples=10 * (i + 1)) for i, c in enumerate(changes)]
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = 0.37 + (10 * 1e-3 + 20 * 2e-3) / 30             # master + the weighted mean change
    assert arrays["fusion.w"].numpy().dtype == np.float32
    assert np.allclose(arrays["fusion.w"].numpy(), expected, atol=2e-5)


class _FakeGrid:
    def get_node_ids(self):
        return [1, 2]


def test_ffa_lora_freezes_a_sends_only_b_and_averages_exactly(tiny_cfg, tiny_splits):
    """Two hospitals train from one start; with A frozen, the mean of their B times A is the mean
    of their BA, so FedAvg over the sent tensors averages the adapters exactly. Without FFA it does not."""
    from dataclasses import replace

    from medvlm.build import build_medvlm
    from medvlm.config import PrivacyConfig
    from medvlm.features import with_frozen_features
    from medvlm.train import train_local

    gaps = {}
    for ffa in (True, False):
        cfg = replace(tiny_cfg.model, lora=replace(tiny_cfg.model.lora, ffa=ffa))
        start = build_medvlm(cfg, seed=0)
        spec = start.trainable_spec()
        assert all(".lora_A." not in n for n in spec) == ffa          # A is neither trained nor sent
        data = with_frozen_features(start, tiny_splits["train"])
        halves = [data.select(data.rows[i::2]) for i in range(2)]
        a_before = {n: p.detach().clone() for n, p in start.language.named_parameters() if ".lora_A." in n}
        states, deltas = [], []
        for i, half in enumerate(halves):
            model = build_medvlm(cfg, seed=0)
            model.load_trainable_state(start.trainable_state())
            train = replace(tiny_cfg.train, epochs=2, lr=5e-2, seed=i)
            states.append(train_local(model, half, train=train, privacy=PrivacyConfig(enabled=False),
                                      progress=False).state)
            deltas.append(_lora_deltas(model))
            if ffa:
                a_after = {n: p for n, p in model.language.named_parameters() if ".lora_A." in n}
                assert all(torch.equal(a_before[n], a_after[n]) for n in a_before)
        strategy = MedFedAvg(spec=spec, num_rounds=1, local_epochs=1, lr=1e-3, max_update_bytes=10**8,
                             min_available_nodes=1, min_train_nodes=1)
        set_task_identity()
        arrays, _ = strategy.aggregate_train(1, [_reply(s, hospital=f"h{i}") for i, s in enumerate(states)])
        merged = build_medvlm(cfg, seed=0)
        merged.load_trainable_state({k: torch.from_numpy(a.numpy()) for k, a in arrays.items()})
        got = _lora_deltas(merged)
        gaps[ffa] = max(float((got[k] - (deltas[0][k] + deltas[1][k]) / 2).abs().max()) for k in got)
        scale = max(float(d.abs().max()) for d in deltas[0].values())
        assert scale > 1e-3                                            # the adapters did move
    assert gaps[True] < 1e-6 * max(1.0, scale)                         # exact (float rounding only)
    assert gaps[False] > 100 * gaps[True] and gaps[False] > 1e-6      # averaging A and B separately is not


def _lora_deltas(model) -> dict[str, torch.Tensor]:
    """Each LoRA layer's weight change B @ A * scaling (PEFT's own get_delta_weight)."""
    from peft.tuners.lora import LoraLayer

    return {name: m.get_delta_weight("default").detach().clone() for name, m in model.language.named_modules()
            if isinstance(m, LoraLayer)}


@pytest.fixture
def federation(tmp_path):
    def start(extra=(), *, node_overrides=None, hospitals=("general", "oncology", "cardiac")):
        overrides = TINY_OVERRIDES + [f"data.hospitals=[{','.join(hospitals)}]", "federation.local_epochs=1",
                                      "federation.rounds=1", *extra]
        run_config = {"preset": "tiny", "overrides": shlex.join(overrides)}
        nodes = {10 + i: {"partition-id": i} for i in range(len(hospitals))}
        grid = InProcessGrid(nodes, {"train": client_app.train, "evaluate": client_app.evaluate}, run_config,
                             overrides=node_overrides)
        return run_federation(grid, load_config("tiny", overrides), tmp_path / "run"), grid
    return start, tmp_path / "run"


def test_ffa_lora_with_bf16_transport_in_the_federation(federation, tiny_cfg):
    from dataclasses import replace

    from medvlm.build import build_medvlm
    from medvlm.runs import load_trainable

    start, run_dir = federation
    summary, grid = start(["model.lora.ffa=true", "federation.transport=bf16"])
    cfg = replace(tiny_cfg.model, lora=replace(tiny_cfg.model.lora, ffa=True))
    model = build_medvlm(cfg, seed=0)
    trainable = sum(p.numel() for p in model.trainable_parameters().values())
    record = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert {h["status"] for h in record["hospitals"].values()} == {"trained"} and not record["rejected"]
    headers = 200 * len(model.trainable_spec())             # each array's serialised (npy) header
    # B + fusion at 2 bytes each (plus headers); fp32 with A would be 4 bytes for every LoRA tensor
    assert all(2 * trainable <= h["bytes_up"] <= 2 * trainable + headers for h in record["hospitals"].values())
    assert 3 * 2 * trainable <= record["bytes_down"] <= 3 * (2 * trainable + headers)
    sent = [m for m in grid.sent if m.metadata.message_type == "train"][0].content
    assert sent["config"]["frozen-digest"] == model.frozen_digest()
    assert not any(".lora_A." in n for n in wire_arrays(sent["arrays"]))
    a_start = {n: p.detach().clone() for n, p in model.language.named_parameters() if ".lora_A." in n}
    load_trainable(model, run_dir / "global")                        # the exported adapter holds A unchanged
    assert all(torch.equal(a_start[n], p) for n, p in model.language.named_parameters() if ".lora_A." in n)
    assert summary["final_accuracy"] is not None


def test_a_hospital_with_other_frozen_a_matrices_refuses_to_train(federation):
    start, run_dir = federation
    # the coordinator's seed differs from the hospitals' (their run config): different frozen A
    summary, grid = start(["model.lora.ffa=true"], node_overrides={11: {"train": _with_seed(1)}})
    record = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    failed = [f for f in record["failed"] if f.get("phase") != "evaluate"]
    assert len(failed) == 1 and "frozen LoRA A matrices" in failed[0]["reason"] and failed[0]["node"] == 11
    assert sum(h["status"] == "trained" for h in record["hospitals"].values()) == 2


def _with_seed(seed):
    def train(msg, context):
        context.run_config = {**context.run_config,
                              "overrides": context.run_config["overrides"] + f" federation.seed={seed}"}
        return client_app.train(msg, context)
    return train


def test_many_hospital_sites_are_distinct_and_named_clearly():
    from medvlm.data.synthetic import generate_hospital, resolve_profile, site_names

    names = site_names(12)
    assert names[:6] == ["general-0", "oncology-0", "cardiac-0", "rural-0", "imaging-0", "general-1"]
    assert len({resolve_profile(n).stream for n in names} | {resolve_profile("public").stream}) == 13
    a, b = generate_hospital("oncology-0", 4), generate_hospital("oncology-1", 4)
    assert not np.array_equal(a.images, b.images) and resolve_profile("oncology-1").p_nodule == 0.7
    with pytest.raises(ValueError, match="oncology-7"):
        resolve_profile("public-3")
