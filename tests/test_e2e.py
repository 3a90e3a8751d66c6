"""End-to-end on the built-in foundation (built once per session: ~1.5 min), training for real
(1-2 min each on 2 cores). Marked slow; CI runs them with ``-m slow``.

Thresholds come from measured runs (see the issue notes): without DP the model reads the images
(+19 points over the per-question majority, modality 0.90 vs 0.40); with DP at epsilon <= 8 the
tiny default does not yet beat the baseline, so the DP test checks the privacy contract only.
"""

import json

import pytest

from medvlm.cli import train_local_run


@pytest.mark.slow
def test_non_dp_train_local_learns_from_images(tmp_path):
    run_dir, s = train_local_run("tiny", [f"output_dir={tmp_path}", "privacy.enabled=false"], run_name="plain",
                                 progress=False)
    assert json.loads((run_dir / "summary.json").read_text())["final_accuracy"] == s["final_accuracy"]
    assert s["epsilon"] is None and not s["dp"]
    assert s["final_accuracy"] >= s["baseline_accuracy"] + 0.12, s
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
    assert s["final_accuracy"] > 0.3  # answers come from the answer vocabulary, not garbage
