import json

import pytest
import torch

from cli.main import main
from medvlm.recipes.local import train_local_run

TINY = ["model.init=random", "model.vision.source=builtin:tiny-random", "model.language.source=builtin:tiny-random",
        "model.fusion.dim=32", "model.fusion.layers=1", "data.images_per_hospital=12",
        "train.epochs=1", "train.batch_size=32"]

SUMMARY_KEYS = {"final_accuracy", "closed_accuracy", "open_accuracy", "baseline_accuracy", "epsilon", "delta",
                "trainable_parameters", "total_parameters", "wall_seconds"}


def test_train_local_writes_a_run_folder(tmp_path):
    run_dir, summary = train_local_run("tiny", TINY + [f"output_dir={tmp_path}"], run_name="r", progress=False)
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(on_disk)
    assert 0 < on_disk["epsilon"] <= 8.0 and on_disk["delta"] == 1e-5
    from medvlm.recipes.local import evaluate_run

    again = evaluate_run(run_dir, split="test", progress=False)      # the exported adapter, scored again
    assert again["accuracy"] == pytest.approx(on_disk["final_accuracy"])
    n = on_disk["test_questions"]["closed"] + on_disk["test_questions"]["open"]
    assert n > 0 and on_disk["baseline_accuracy"] * n == pytest.approx(round(on_disk["baseline_accuracy"] * n))
    assert on_disk["trainable_parameters"] < on_disk["total_parameters"]
    assert (run_dir / "global" / "adapter_config.json").is_file()
    assert (run_dir / "global" / "adapter_model.safetensors").is_file()
    assert (run_dir / "global" / "fusion.safetensors").is_file()
    assert json.loads((run_dir / "accountant.json").read_text())["mechanism"] == "rdp"
    assert (run_dir / "config.yaml").is_file()


def test_exported_adapter_loads_with_peft_and_back(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from medvlm.build import build_medvlm, language_source
    from medvlm.config import load_config
    from medvlm.runs import load_trainable

    run_dir, _ = train_local_run("tiny", TINY + [f"output_dir={tmp_path}", "train.lr=0.05"], run_name="r",
                                 progress=False)
    cfg = load_config("tiny", TINY)
    fresh = build_medvlm(cfg.model, seed=5)
    load_trainable(fresh, run_dir / "global")
    base = AutoModelForCausalLM.from_pretrained(language_source(cfg.model.language))
    peft_model = PeftModel.from_pretrained(base, run_dir / "global")
    ids = torch.tensor([[1, 7, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, fresh.language(input_ids=ids).logits, atol=1e-5)
    fusion_file = {k for k in fresh.trainable_state() if k.startswith("fusion.")}
    assert fusion_file


def test_cli_reports_config_errors(capsys, caplog):
    assert main(["train-local", "model.fusion.kind=nope"]) == 2
    assert "model.fusion.kind" in caplog.text


def test_build_foundation_cli(capsys):
    assert main(["build-foundation", "--variant", "tiny-random"]) == 0
    assert "tiny-random" in capsys.readouterr().out


def test_train_local_on_a_dicom_folder_end_to_end(tmp_path):
    from medvlm.data.synthetic import generate_hospital, write_manifest

    write_manifest(generate_hospital("oncology", 20, seed=0), tmp_path / "pacs", image_format="dicom")
    overrides = TINY + [f"output_dir={tmp_path}", f"data.source={tmp_path / 'pacs'}",
                        f"data.feature_cache={tmp_path / 'features'}"]
    run_dir, summary = train_local_run("tiny", overrides, run_name="dicom", progress=False)
    n = summary["test_questions"]["closed"] + summary["test_questions"]["open"]
    assert summary["train_examples"] > 0 and n > 0
    assert summary["final_accuracy"] * n == pytest.approx(round(summary["final_accuracy"] * n))   # right / asked
    assert 0 < summary["epsilon"] <= 8.0
    assert len(list((tmp_path / "features").glob("*/*/*.safetensors"))) == 20   # every image encoded once


def test_train_local_and_evaluate_score_the_report_task(tmp_path, capsys):
    from medvlm.recipes.local import evaluate_run

    run_dir, s = train_local_run("tiny", TINY + [f"output_dir={tmp_path}", "data.task=report"], run_name="rep",
                                 progress=False)
    assert s["task"] == "report" and s["final_accuracy"] is None
    for key in ("bleu4", "rouge_l", "finding_f1"):
        assert 0 <= s[key] <= 1 and 0 <= s[f"baseline_{key}"] <= 1
    assert json.loads((run_dir / "summary.json").read_text())["bleu4"] == s["bleu4"]
    ev = evaluate_run(run_dir, split="test", progress=False)       # the exported adapter, scored again
    assert ev["bleu4"] == pytest.approx(s["bleu4"]) and ev["finding_f1"] == pytest.approx(s["finding_f1"])
    assert main(["evaluate", str(run_dir), "--split", "test"]) == 0
    assert "BLEU-4" in capsys.readouterr().out


def test_simulate_exits_non_zero_when_the_federation_stopped_short(monkeypatch, capsys):
    """A run stopped by missing or failing hospitals prints its table and reason, and exits 1 (a script
    or CI job must not take it for a result); a completed one, or one ended by spent budgets, exits 0."""
    import cli.federation
    import simulations.run

    shown = []
    monkeypatch.setattr(cli.federation, "print_summary", shown.append)
    for stopped, code in (("stopped after round 1: every hospital failed to train (a, b): crashed: boom", 1),
                          ("completed", 0), ("every hospital's privacy budget is spent (after round 2)", 0)):
        monkeypatch.setattr(simulations.run, "simulate", lambda *a, **k: {"stopped": stopped})
        assert main(["simulate", "--run-dir", "unused"]) == code, stopped
        assert shown[-1] == {"stopped": stopped}
        assert ("crashed: boom" in capsys.readouterr().err) == (code == 1)


def test_write_synthetic_writes_a_checked_folder_and_refuses_no_images(tmp_path, caplog):
    from medvlm.data.manifest import read_manifest

    assert main(["write-synthetic", "--hospital", "rural", "--images", "3", "--out", str(tmp_path / "a")]) == 0
    manifest = read_manifest(tmp_path / "a")
    assert len({r["image"] for r in manifest.rows}) == 3 and len(manifest.rows) > 3
    assert main(["write-synthetic", "--hospital", "rural", "--images", "0", "--out", str(tmp_path / "b")]) != 0
    assert "--images 0: give at least 1 image" in caplog.text
    assert main(["write-synthetic", "--hospital", "rural", "--seed", "-1", "--out", str(tmp_path / "b")]) != 0
    assert "--seed -1: give a seed >= 0" in caplog.text                 # numpy's 'expected non-negative integer'
    assert not (tmp_path / "b" / "manifest.jsonl").exists()


def test_simulate_names_a_run_dir_that_is_a_file_before_anything_starts(tmp_path, caplog):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["simulate", "--run-dir", str(tmp_path / "notes.txt")]) != 0     # was: [Errno 17] File exists
    assert "notes.txt is a file: give a folder" in caplog.text and (tmp_path / "notes.txt").read_text() == "mine"
