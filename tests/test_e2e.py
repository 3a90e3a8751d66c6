"""End-to-end on the built-in foundation (built once per session: ~2 min), training for real
(1-3 min each on 2 cores). Marked slow; CI runs them with ``-m slow``.

Thresholds come from measured runs (see the issue notes) and are the issues' targets: pooled
train-local at epsilon <= 8 is 25 points above the per-question majority (measured 79.7% vs
49.6%; 82.1% without DP), the default federation 20 points above each hospital's own majority
(measured 80.6% vs 58.0%). Most of that is the public start (stages 1-2 on public data, 80.3%):
the DP rounds keep it, they do not add to it.
"""

import json

import pytest

from medvlm.recipes.local import train_local_run


@pytest.mark.slow
def test_non_dp_train_local_learns_from_images(tmp_path):
    run_dir, s = train_local_run("tiny", [f"output_dir={tmp_path}", "privacy.enabled=false"], run_name="plain",
                                 progress=False)
    assert json.loads((run_dir / "summary.json").read_text())["final_accuracy"] == s["final_accuracy"]
    assert s["epsilon"] is None and not s["dp"]
    assert s["final_accuracy"] >= s["baseline_accuracy"] + 0.25, s
    assert s["per_qtype"]["modality"] >= s["baseline_per_qtype"]["modality"] + 0.3, s


@pytest.mark.slow
def test_default_dp_train_local_keeps_its_privacy_contract(tmp_path):
    run_dir, s = train_local_run("tiny", [f"output_dir={tmp_path}"], run_name="dp", progress=False)
    assert s["dp"] and 0 < s["epsilon"] <= 8.0 and s["delta"] == 1e-5
    p = s["privacy"]
    assert p["total_steps"] == s["steps"] and p["noise_multiplier"] > 0 and p["accountant"] == "rdp"
    history = json.loads((run_dir / "accountant.json").read_text())["history"]
    from medvlm.privacy import epsilon

    assert abs(epsilon(history, delta=1e-5) - s["epsilon"]) < 1e-9  # recomputable from the mechanism
    assert s["final_accuracy"] >= s["baseline_accuracy"] + 0.25, s  # issue 2's target


@pytest.mark.slow
def test_default_federation_keeps_every_budget_and_beats_the_baseline(tmp_path):
    """The README's main command (`medvlm-fl simulate`) on the built-in default."""
    from medvlm.recipes.local import evaluate_run
    from simulations.run import simulate

    s = simulate("tiny", [f"output_dir={tmp_path}"], run_dir=tmp_path / "default")
    assert s["rounds"] == 3 and s["stopped"] == "completed" and s["rejected_updates"] == 0
    assert all(0 < e <= 8.0 for e in s["epsilon"].values()) and len(s["epsilon"]) == 3
    # issue 3's target: 20 points above each hospital's own per-question majority (measured 80.4-81.2%
    # vs 58.0% over three runs: DP noise is fresh in each), and the DP rounds do not wash out the public start
    assert s["final_accuracy"] >= s["baseline_accuracy"] + 0.20, s
    assert s["final_accuracy"] >= s["initial_accuracy"] - 0.02, s
    assert evaluate_run(tmp_path / "default", progress=False)["accuracy"] == s["final_accuracy"]


@pytest.mark.slow
def test_robust_aggregation_keeps_accuracy_when_one_hospital_is_poisoned(tmp_path):
    """Five hospitals on the built-in foundation, one round; hospital 5 sends its change sign-flipped
    and scaled by 100. FedAvg follows it; the median and the trimmed mean (20% each tail) do not.
    Measured: clean FedAvg 54.1%, poisoned FedAvg 42.9%, median 53.4%, trimmed mean 53.7%."""
    from client import app as client_app
    from simulations.inprocess import poisoned, run_inprocess

    base = ["data.hospitals=[general,oncology,cardiac,rural,imaging]", "data.images_per_hospital=60",
            "federation.rounds=1", "federation.local_epochs=1", "privacy.enabled=false"]
    attack = {14: {"train": poisoned(client_app.train, -100.0)}}
    acc = {"clean": run_inprocess("tiny", base, tmp_path / "clean")["final_accuracy"]}
    for rule in ("fedavg", "median", "trimmed-mean"):
        acc[rule] = run_inprocess("tiny", base + [f"federation.aggregation={rule}"], tmp_path / rule,
                                  node_overrides=attack)["final_accuracy"]
    assert acc["fedavg"] < acc["clean"] - 0.06, acc
    assert acc["median"] >= acc["clean"] - 0.03 and acc["trimmed-mean"] >= acc["clean"] - 0.03, acc


@pytest.mark.slow
def test_report_federation_beats_the_most_common_report_on_every_metric(tmp_path):
    """`medvlm-fl simulate --config tiny-report` in one process: three DP hospitals learn to write
    findings reports. Measured (issue notes): BLEU-4, ROUGE-L and finding-F1 a few points above
    always writing each hospital's most common report, every round."""
    from simulations.inprocess import run_inprocess

    s = run_inprocess("tiny-report", [], tmp_path / "reports")
    assert s["task"] == "report" and s["rounds"] == 5 and all(0 < e <= 8.0 for e in s["epsilon"].values())
    for key in ("bleu4", "rouge_l", "finding_f1"):
        assert s[key] > s[f"baseline_{key}"], (key, s)
    assert s["per_finding"]["cardiomegaly"] > 0.3, s["per_finding"]      # it reads the heart off the image
    records = [json.loads(line) for line in (tmp_path / "reports" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["bleu4"] is not None and r["finding_f1"] is not None for r in records)
    assert (tmp_path / "reports" / "plots.png").stat().st_size > 30_000        # the report panel drawn
    assert "finding-F1" in (tmp_path / "reports" / "global" / "README.md").read_text()
