"""The empirical privacy audit's statistics (medvlm/audit.py): the one-run bound of Steinke, Nasr &
Jagielski (2023) and the canaries. The audit run itself is in the slow suite (test_e2e)."""

import numpy as np
import pytest

from medvlm.audit import epsilon_from_guesses, epsilon_lower_bound, make_canaries, p_value


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


@pytest.mark.slow
def test_the_audit_runs_through_the_hospital_path_and_reports_next_to_the_accountant(tmp_path):
    """``medvlm-fl audit`` on the tiny random model: three trainings through the ClientApp (site data
    with canaries, node-config policy, ledger, egress), a report, a plot and a card. The bound under
    DP stays at or below the accountant's epsilon (a leak beyond it fails here)."""
    import json

    from simulations.audit import run_audit
    from tests.conftest import TINY_OVERRIDES

    report = run_audit("tiny", TINY_OVERRIDES + ["data.images_per_hospital=30", "federation.rounds=1",
                                                 "federation.local_epochs=2"], tmp_path, canaries=60)
    names = [r["variant"] for r in report["results"]]
    assert names == ["DP at epsilon 8", "DP, noise far too low (budget 100000)", "no DP"]
    dp, weak, off = report["results"]
    assert dp["accountant_epsilon"] == pytest.approx(8.0, abs=0.05) and weak["accountant_epsilon"] > 1000
    assert off["accountant_epsilon"] is None and weak["noise_multiplier"] < dp["noise_multiplier"]
    assert dp["lower_bound"]["epsilon"] <= dp["accountant_epsilon"]
    assert len(dp["scores_in"]) + len(dp["scores_out"]) == 60
    audit = tmp_path / "audit"
    assert json.loads((audit / "report.json").read_text())["canaries"] == 60
    assert (audit / "audit.png").stat().st_size > 10_000 and "empirical lower bound" in (audit / "README.md").read_text()
