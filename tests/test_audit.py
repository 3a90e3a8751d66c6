"""The empirical privacy audit's statistics (medvlm/audit.py): the one-run bound of Steinke, Nasr &
Jagielski (2023) and the canaries. The audit run itself is in the slow suite (test_e2e)."""

import numpy as np
import pytest

from medvlm.audit import (GradientCanaries, bound_ceiling, epsilon_from_guesses, epsilon_lower_bound, make_canaries,
                          make_gradient_canaries, p_value)


def test_the_bound_follows_the_binomial_tail():
    # all of r guesses right: P[Binomial(r, q) >= r] = q^r <= 0.05 gives q, and epsilon = logit(q)
    r = 100
    q = 0.05 ** (1 / r)
    assert epsilon_from_guesses(1000, r, r, delta=0, significance=0.05) == pytest.approx(np.log(q / (1 - q)), abs=1e-3)
    assert epsilon_from_guesses(1000, r, 50, delta=0, significance=0.05) == 0.0        # chance: nothing shown
    # more right guesses, a higher bound; delta's term only lowers it
    bounds = [epsilon_from_guesses(1000, r, v, delta=0, significance=0.05) for v in (70, 80, 90, 100)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    assert epsilon_from_guesses(1000, r, 90, delta=1e-5, significance=0.05) <= bounds[2]
    assert 0 <= p_value(1000, r, 90, 1.0, 1e-5) <= 1


def test_a_perfect_attack_finds_a_large_epsilon_and_chance_finds_none():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    leak = included + rng.normal(0, 0.01, 1000)                    # scores that give membership away
    assert epsilon_lower_bound(leak, included, delta=1e-5)["epsilon"] > 3
    noise = rng.normal(0, 1, 1000)                                 # scores that carry nothing
    assert epsilon_lower_bound(noise, included, delta=1e-5)["epsilon"] < 1


def test_canaries_are_drawn_in_with_probability_one_half():
    c = make_canaries(280, size=16, seed=3)
    assert c.images.shape == (280, 16, 16) and len({r["question"] for r in c.rows}) == 280      # own keys
    assert 0.4 < c.included.mean() < 0.6
    assert np.array_equal(c.included, make_canaries(280, size=16, seed=3).included)            # reproducible
    with pytest.raises(ValueError, match="at least 20 canaries"):
        make_canaries(5, size=16, seed=0)
    with pytest.raises(ValueError, match="distinct keys"):
        make_canaries(1000, size=16, seed=0, words=["a", "b", "c"])


def test_the_ceiling_is_what_perfect_guesses_show():
    rng = np.random.default_rng(1)
    included = rng.random(2000) < 0.5
    perfect = epsilon_lower_bound(included.astype(float), included, delta=1e-5)["epsilon"]
    assert perfect == pytest.approx(bound_ceiling(2000, delta=1e-5), rel=1e-6)
    assert bound_ceiling(200, delta=1e-5) < bound_ceiling(1000, delta=1e-5) < 6      # the one-run audit's reach


SHAPES = {"fusion.w": (8, 16), "lora.a": (4, 32), "lora.b": (32, 4)}


def test_gradient_canaries_sit_on_distinct_coordinates_of_every_tensor_and_round_trip():
    c = make_gradient_canaries(SHAPES, 300, seed=2)
    coords = {(n, int(i)) for n, i in zip(c.names, c.index)}
    assert len(coords) == 300 and set(c.names) == set(SHAPES)                       # distinct, all tensors
    assert all(0 <= i < np.prod(SHAPES[n]) for n, i in coords)
    assert set(np.unique(c.sign)) == {-1.0, 1.0} and 0.4 < c.included.mean() < 0.6
    back = GradientCanaries.from_json(c.to_json())
    assert back.names == c.names and np.array_equal(back.index, c.index) and np.array_equal(back.included, c.included)
    with pytest.raises(ValueError, match="at least 20"):
        make_gradient_canaries(SHAPES, 10, seed=0)
    with pytest.raises(ValueError, match="distinct coordinates"):
        make_gradient_canaries({"x": (3, 3)}, 20, seed=0)
    with pytest.raises(ValueError, match="not a gradient-canary file"):
        GradientCanaries.from_json({"names": []}, source="x.json")
    bad = dict(c.to_json(), sign=[1.0])
    with pytest.raises(ValueError, match="one entry per canary"):
        GradientCanaries.from_json(bad)


@pytest.mark.parametrize("dp", [True, False])
def test_a_drawn_canary_moves_its_coordinate_by_one_clipped_example_and_nothing_else(tiny_cfg, tiny_splits, dp,
                                                                                     monkeypatch):
    """The injection is exact: with no noise and plain SGD, one step with canaries differs from the
    same step without them only on the drawn canaries' coordinates, each by lr * norm / B against its
    sign (under DP clipped to the clip norm, whatever the canary's own norm)."""
    import torch

    from medvlm.config import PrivacyConfig, TrainConfig
    from medvlm.data.dataset import VQARows
    from medvlm.build import build_medvlm
    from medvlm.train import train_local

    data = VQARows(tiny_splits["train"].pixels, tiny_splits["train"].rows[:48])
    train = TrainConfig(epochs=1, batch_size=16, physical_batch_size=8, lr=0.5, optimizer="sgd")
    # the two runs below must draw the same Poisson batch: pin the secret seed DP uses (noise is 0 here)
    monkeypatch.setattr("medvlm.train._secret_seed", lambda: 1234)
    privacy = (PrivacyConfig(target_epsilon=None, noise_multiplier=0.0, max_grad_norm=2.0) if dp
               else PrivacyConfig(enabled=False))
    runs = []
    for with_canaries in (False, True):
        model = build_medvlm(tiny_cfg.model, seed=0)
        model.freeze_base(train.trainable)
        shapes = {n: tuple(p.shape) for n, p in model.trainable_parameters().items() if p.requires_grad}
        # under DP a canary's norm beyond the clip norm is clipped back to it; without DP it is kept
        canaries = make_gradient_canaries(shapes, 60, seed=5, norm=6.0 if dp else 2.0)
        runs.append(train_local(model, data, train=train, privacy=privacy, max_steps=1, progress=False,
                                canaries=canaries if with_canaries else None))
    plain, marked = runs
    draws = marked.metrics["canary_draws"]
    assert draws > 0
    moved = canaries.scores(plain.state, marked.state, scaled=False)   # (without - with) * sign: the canary's step
    step = train.lr * 2.0 / train.batch_size
    per_draw = moved[canaries.included] / step
    assert np.allclose(per_draw, np.round(per_draw), atol=1e-4) and set(np.round(per_draw)) <= {0.0, 1.0}
    assert round(per_draw.sum()) == draws                          # each drawn canary one example's step
    assert np.allclose(moved[~canaries.included], 0, atol=1e-6)
    hit = {(n, int(i)) for n, i, inc in zip(canaries.names, canaries.index, canaries.included) if inc}
    for name, v in marked.state.items():
        diff = (v - plain.state[name]).flatten()
        others = [j for j in range(len(diff)) if (name, j) not in hit]
        assert torch.allclose(diff[others], torch.zeros(len(others)), atol=1e-6), f"{name} moved off the canaries"


def test_gradient_canaries_on_a_tensor_that_does_not_train_are_refused(tiny_model, tiny_splits):
    from medvlm.config import PrivacyConfig, TrainConfig
    from medvlm.data.dataset import VQARows
    from medvlm.train import train_local

    c = make_gradient_canaries({"fusion.nowhere": (10, 10)}, 20, seed=0)
    with pytest.raises(ValueError, match="do not train here: fusion.nowhere"):
        train_local(tiny_model, VQARows(tiny_splits["train"].pixels, tiny_splits["train"].rows[:16]),
                    train=TrainConfig(epochs=1, batch_size=16), privacy=PrivacyConfig(enabled=False),
                    max_steps=1, progress=False, canaries=c)
    with pytest.raises(ValueError, match="ghost clipping"):
        train_local(tiny_model, VQARows(tiny_splits["train"].pixels, tiny_splits["train"].rows[:16]),
                    train=TrainConfig(epochs=1, batch_size=16),
                    privacy=PrivacyConfig(target_epsilon=None, noise_multiplier=1.0, grad_sample_mode="ghost"),
                    max_steps=1, progress=False, canaries=c)


def test_a_site_takes_canaries_only_from_its_node_config_and_names_a_bad_file(tmp_path):
    import json

    from client.site import _canaries

    assert _canaries("h", {}) is None
    path = tmp_path / "canaries.json"
    path.write_text(json.dumps(make_gradient_canaries(SHAPES, 40, seed=0).to_json()))
    assert len(_canaries("h", {"audit-canaries": str(path)})) == 40
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"audit-canaries=.*canaries.json.* cannot be read"):
        _canaries("h", {"audit-canaries": str(path)})
    with pytest.raises(ValueError, match="cannot be read"):
        _canaries("h", {"audit-canaries": str(tmp_path / "missing.json")})


@pytest.mark.slow
def test_the_audit_sees_a_leak_without_dp_and_none_beyond_the_accountant_with_it(tmp_path):
    """``medvlm-fl audit`` on the built-in model: three trainings through the ClientApp (node-config
    policy and canaries, ledger, egress), a report, a plot and a card. Its power is shown: without DP,
    and with noise far too low, the bound is clearly above 1; with DP it stays at or below the
    accountant's epsilon. A change that drops the noise, or leaves a tensor unclipped, fails here."""
    import json

    from simulations.audit import run_audit

    # the built-in model (a random one's unclipped gradients drown a canary without DP), a small site
    report = run_audit("tiny", ["data.images_per_hospital=100", "federation.rounds=1", "federation.local_epochs=4"],
                       tmp_path, canaries=2000)
    names = [r["variant"] for r in report["results"]]
    assert names == ["DP at epsilon 8", "DP, noise far too low (budget 100000)", "no DP"]
    dp, weak, off = report["results"]
    assert dp["accountant_epsilon"] == pytest.approx(8.0, abs=0.05) and weak["accountant_epsilon"] > 1000
    assert off["accountant_epsilon"] is None and weak["noise_multiplier"] < dp["noise_multiplier"]
    assert dp["lower_bound"]["epsilon"] <= dp["accountant_epsilon"]
    assert off["lower_bound"]["epsilon"] > 1.0 and weak["lower_bound"]["epsilon"] > 1.0, (off, weak)
    assert off["auc"]["dirac"] > 0.8 and dp["auc"]["dirac"] < off["auc"]["dirac"]
    assert len(dp["scores_in"]) + len(dp["scores_out"]) == 2000
    audit = tmp_path / "audit"
    assert json.loads((audit / "report.json").read_text())["kind"] == "gradient"
    assert (audit / "audit.png").stat().st_size > 10_000 and "empirical lower bound" in (audit / "README.md").read_text()


@pytest.mark.slow
def test_the_input_canary_audit_runs_through_the_hospital_data_path(tmp_path):
    """``--kind input``: canary images and questions in the hospital's data folder, two attacks (the
    answer's loss, the update's alignment with each canary's gradient), the bound never above the
    accountant's epsilon under DP."""
    from simulations.audit import run_audit
    from tests.conftest import TINY_OVERRIDES

    report = run_audit("tiny", TINY_OVERRIDES + ["data.images_per_hospital=30", "federation.rounds=1",
                                                 "federation.local_epochs=2"], tmp_path, canaries=60, kind="input")
    dp = report["results"][0]
    assert set(dp["bounds"]) == {"loss", "gradient"} and dp["lower_bound"]["attack"] in dp["bounds"]
    assert dp["lower_bound"]["epsilon"] <= dp["accountant_epsilon"]
    rows = (tmp_path / "audit" / "site" / "manifest.jsonl").read_text().count('"qtype": "canary"')
    assert rows == sum(1 for r in report["results"][0]["scores_in"])          # the included ones, in its data


def test_an_audit_puts_its_line_into_the_run_s_model_card_once(tmp_path):
    from server.model_card import add_audit

    report = {"canaries": 1000, "kind": "gradient", "hospital": "general", "federated": False, "delta": 1e-5,
              "ceiling": 4.4, "results": [
                  {"variant": "DP at epsilon 8", "accountant_epsilon": 7.99, "lower_bound": {"epsilon": 0.29}},
                  {"variant": "no DP", "accountant_epsilon": None, "lower_bound": {"epsilon": 2.27}}]}
    assert add_audit(tmp_path, report) is None                        # no exported adapter: nothing to change
    (tmp_path / "global").mkdir()
    card = tmp_path / "global" / "README.md"
    card.write_text("# card\n\n## Privacy\n\nDP-SGD.\n\n## Intended use\n\nResearch.\n")
    add_audit(tmp_path, report)
    add_audit(tmp_path, {**report, "results": report["results"][:1]})  # a second audit replaces the first
    text = card.read_text()
    assert text.count("## Privacy audit") == 1 and text.index("## Privacy audit") < text.index("## Intended use")
    assert "DP at epsilon 8: accountant epsilon 7.99, empirical lower bound 0.29" in text and "no DP" not in text
    assert text.startswith("# card\n\n## Privacy\n\nDP-SGD.") and text.rstrip().endswith("Research.")
