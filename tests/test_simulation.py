"""The real Flower path: ``medvlm-fl simulate`` through Flower's simulation engine (Ray), then
``medvlm-fl evaluate`` on the exported adapter reproduces the accuracy the federation reported."""

import json

from cli.main import main
from medvlm.recipes.local import evaluate_run
from tests.conftest import TINY_OVERRIDES


def test_simulate_then_evaluate_reproduces_the_reported_accuracy(tmp_path, capsys):
    run_dir = tmp_path / "fed"
    assert main(["simulate", "--run-dir", str(run_dir), *TINY_OVERRIDES, "federation.rounds=1",
                 "federation.local_epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "per-question majority" in out and "DP-SGD steps" in out          # the final table
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["hospitals"] == ["cardiac", "general", "oncology"]
    assert all(0 < e <= 8.0 for e in summary["epsilon"].values())
    for name, p in summary["privacy"].items():
        from medvlm.privacy import epsilon

        assert abs(epsilon([(p["noise_multiplier"], p["sample_rate"], p["steps"])], delta=p["delta"],
                           accountant=p["accountant"]) - p["epsilon"]) < 1e-6, name   # auditable
    assert summary["bytes_sent_per_round"] > 0 and summary["rejected_updates"] == 0
    for name in ("metrics.jsonl", "plots.png", "server-state.json", "config.yaml", "global/adapter_config.json",
                 "global/adapter_model.safetensors", "global/fusion.safetensors"):
        assert (run_dir / name).is_file(), name
    again = evaluate_run(run_dir, progress=False)
    assert again["accuracy"] == summary["final_accuracy"]
    assert again["baseline"]["accuracy"] == summary["baseline_accuracy"]


def test_a_tags_stage_runs_in_flower_s_simulation_and_keeps_each_head_at_its_hospital(tmp_path, capsys):
    """The curriculum's tags stage in real ClientApp processes (not the in-process grid): each
    hospital's head lands in its own state dir, never in the global model, and the summary states
    both stages' mechanisms, which recompute each epsilon."""
    from safetensors.torch import load_file

    from medvlm.privacy import epsilon
    from medvlm.tags import TAG_COLUMNS
    from tests.test_tags import TAG_STAGES

    run_dir = tmp_path / "fed"
    assert main(["simulate", "--run-dir", str(run_dir), *TINY_OVERRIDES, "data.hospitals=[general,oncology]",
                 "federation.local_epochs=1", TAG_STAGES]) == 0
    out = " ".join(capsys.readouterr().out.split())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and [s["stage"] for s in summary["stages"]] == ["tags", "vqa"]
    for name, p in summary["privacy"].items():
        assert [m["stage"] for m in p["mechanisms"]] == ["tags", "vqa"], name
        history = [(m["noise_multiplier"], m["sample_rate"], m["steps"]) for m in p["mechanisms"]]
        assert abs(epsilon(history, delta=p["delta"], accountant=p["accountant"]) - p["epsilon"]) < 1e-6
        assert 0 < p["epsilon"] <= 8.0
        assert "tags: sigma" in out and "vqa: sigma" in out
        head = load_file(str(run_dir / "hospitals" / name / "tag-head.safetensors"))
        assert head["proj.weight"].shape[0] == TAG_COLUMNS
    shipped = {}
    for f in (run_dir / "global").glob("*.safetensors"):
        shipped.update(load_file(str(f)))
    assert shipped and not any(k.startswith("proj") or tuple(v.shape) == tuple(head["proj.weight"].shape)
                               for k, v in shipped.items())
