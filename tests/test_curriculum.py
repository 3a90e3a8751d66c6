"""The federated curriculum: stages in the config, the ledger's budget across stages, a two-stage
federation (report alignment training the fusion only, then VQA) that resumes across the stage
boundary, the model card, and inference (answer / report) on a DICOM file from the run folder."""

import json
import shlex

import numpy as np
import pytest

from client import app as client_app
from client.ledger import Ledger
from medvlm.config import load_config, lr_window, stage_at, stages
from medvlm.privacy import epsilon
from server.app import run_federation
from tests.conftest import TINY_OVERRIDES, assert_round_trained_the_fusion_only
from simulations.inprocess import InProcessGrid, Killed

STAGES = "federation.stages=[{name: align, rounds: 1, task: report, trainable: [fusion], lr: 0.003}, " \
         "{name: vqa, rounds: 1, local_epochs: 2}]"


def test_stages_resolve_in_order_with_defaults_and_budget_shares():
    cfg = load_config("tiny", ["federation.stages=[{name: a, rounds: 2, task: report, trainable: [fusion]}, "
                               "{name: b, rounds: 3, qtypes: [modality]}]", "federation.lr=0.01"])
    a, b = stages(cfg)
    assert cfg.federation.rounds == 5
    assert (a.first_round, a.last_round, a.task, a.trainable, a.lr, a.budget_end) == (1, 2, "report", ("fusion",),
                                                                                      0.01, 0.4)
    assert (b.first_round, b.last_round, b.qtypes, b.trainable, b.budget_end) == (3, 5, ("modality",),
                                                                                ("fusion", "lora"), 1.0)
    assert [stage_at(cfg, r).name for r in range(7)] == ["a", "a", "a", "b", "b", "b", "b"]
    # one learning-rate curve per stage (federation.lr_schedule=stage), or a whole one every round
    assert [lr_window(cfg, stage_at(cfg, r), r) for r in range(1, 6)] == [(0.0, 1.0)] * 5
    shared = load_config("tiny", ["federation.stages=[{name: a, rounds: 2}, {name: b, rounds: 3}]",
                                  "federation.lr_schedule=stage"])
    assert [lr_window(shared, stage_at(shared, r), r) for r in range(1, 6)] == [
        (0, 0.5), (0.5, 1), (0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1)]
    with pytest.raises(ValueError, match="federation.lr_schedule"):
        load_config("tiny", ["federation.lr_schedule=cosine"])
    single = stages(load_config("tiny", ["data.task=report"]))
    assert len(single) == 1 and single[0].task == "report" and single[0].last_round == 3
    # a stage's own budget share; the stages without one share the rest by rounds, the last ends at 1
    shared = stages(load_config("tiny", ["federation.stages=[{name: a, rounds: 2, budget: 0.1}, {name: b, rounds: 1}, "
                                         "{name: c, rounds: 3}]"]))
    assert [s.budget_end for s in shared] == pytest.approx([0.1, 0.1 + 0.9 / 4, 1.0])
    for bad in ("[{name: a, budget: 0.6}, {name: b, budget: 0.6}]", "[{name: a, budget: 0.3}, {name: b, budget: 0.3}]",
                "[{name: a, budget: 1.0}, {name: b}]", "[{name: a, budget: 0}, {name: b}]"):
        with pytest.raises(ValueError, match="budget"):
            load_config("tiny", [f"federation.stages={bad}"])
    with pytest.raises(ValueError, match="unique"):
        load_config("tiny", ["federation.stages=[{name: a}, {name: a}]"])
    with pytest.raises(ValueError, match=r"federation.stages\[a\].task"):
        load_config("tiny", ["federation.stages=[{name: a, task: caption}]"])


def test_the_ledger_spends_each_stage_s_share_and_ends_at_the_budget():
    ledger = Ledger("h", budget=4.0, delta=1e-5, accountant="rdp", max_grad_norm=1.0)
    s1 = ledger.plan(sample_rate=0.25, steps_per_round=20, rounds_left=2, stage="align", target=1.6)
    assert ledger.plan(sample_rate=0.25, steps_per_round=20, rounds_left=1, stage="align", target=1.6) == s1
    ledger.history = [(s1, 0.25, 40)]
    assert epsilon(ledger.history, delta=1e-5) == pytest.approx(1.6, abs=0.02)
    s2 = ledger.plan(sample_rate=0.05, steps_per_round=60, rounds_left=3, stage="vqa")   # another data set
    assert s2 != s1 and ledger.stage == "vqa"
    ledger.history.append((s2, 0.05, 180))
    assert epsilon(ledger.history, delta=1e-5) == pytest.approx(4.0, abs=0.02)
    with pytest.raises(ValueError, match="sample rate changed"):
        ledger.plan(sample_rate=0.1, steps_per_round=60, rounds_left=1, stage="vqa")


@pytest.fixture(scope="module")
def curriculum_run(tmp_path_factory):
    """Two stages (align: reports, fusion only; vqa) on three tiny hospitals, killed at the start of
    stage 2 and started again: one run folder the other tests read."""
    run_dir = tmp_path_factory.mktemp("curriculum") / "run"
    overrides = TINY_OVERRIDES + ["data.hospitals=[general,oncology,cardiac]", "federation.local_epochs=1", STAGES]
    run_config = {"preset": "tiny", "overrides": shlex.join(overrides)}
    cfg = load_config("tiny", overrides)
    nodes = {10 + i: {"partition-id": i} for i in range(3)}

    def grid(**kw):
        return InProcessGrid(nodes, {"train": client_app.train, "evaluate": client_app.evaluate}, run_config, **kw)

    with pytest.raises(Killed):
        run_federation(grid(kill_at_round=2), cfg, run_dir)          # the coordinator dies at the boundary
    after_align = json.loads((run_dir / "server-state.json").read_text())
    after_align["card"] = (run_dir / "global" / "README.md").read_text()   # written after every round
    resumed = grid()
    summary = run_federation(resumed, cfg, run_dir)
    return run_dir, summary, after_align, resumed


def test_a_curriculum_runs_its_stages_in_order_and_resumes_across_the_boundary(curriculum_run):
    run_dir, summary, after_align, resumed = curriculum_run
    assert after_align["round"] == 1 and "in progress (round 1 of 2)" in after_align["card"]
    sent = [m for m in resumed.sent if m.metadata.message_type == "train"]
    assert {(int(m.content["config"]["server-round"]), m.content["config"]["stage"]) for m in sent} == {(2, "vqa")}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["stage"], r["task"]) for r in records] == [(0, "align", "report"), (1, "align", "report"),
                                                                      (2, "vqa", "vqa")]
    assert records[1]["bleu4"] is not None and records[1]["baseline_finding_f1"] is not None
    assert records[1]["accuracy"] is None and records[2]["accuracy"] is not None
    assert [s["stage"] for s in summary["stages"]] == ["align", "vqa"]
    assert summary["task"] == "vqa" and summary["final_accuracy"] is not None
    for name, p in summary["privacy"].items():             # one mechanism per stage, recomputable
        assert [m["stage"] for m in p["mechanisms"]] == ["align", "vqa"]
        history = [(m["noise_multiplier"], m["sample_rate"], m["steps"]) for m in p["mechanisms"]]
        assert epsilon(history, delta=p["delta"]) == pytest.approx(p["epsilon"], rel=1e-6)
        assert p["epsilon"] <= 8.0 + 1e-6
        ledger = json.loads((run_dir / "hospitals" / name / "privacy-ledger.json").read_text())
        assert ledger["rounds"] == [1, 2] and ledger["stage"] == "vqa"


def test_the_align_stage_trains_the_fusion_module_only(curriculum_run):
    from safetensors.torch import load_file

    run_dir = curriculum_run[0]
    assert_round_trained_the_fusion_only(run_dir, 1)
    after = load_file(str(run_dir / "checkpoints" / "round-001" / "adapter_model.safetensors"))
    lora2 = load_file(str(run_dir / "checkpoints" / "round-002" / "adapter_model.safetensors"))
    assert max(float(np.abs(after[k].numpy() - lora2[k].numpy()).max()) for k in after) > 1e-5   # vqa trains LoRA


def test_the_exported_adapter_carries_a_model_card(curriculum_run):
    run_dir, summary = curriculum_run[:2]
    card = (run_dir / "global" / "README.md").read_text()
    assert "rounds: 2 (completed)" in card
    for needle in ("builtin:tiny-random", "| fusion |", "| lora |", "cardiac, general, oncology", "fedavg",
                   "| align | 1-1 | report | fusion |", "| vqa | 2-2 | vqa | fusion + lora |", "per-question majority",
                   "## Intended use", "## Limitations", "not validated for clinical use"):
        assert needle in card, needle
    for name, p in summary["privacy"].items():
        assert f"| {name} | {p['epsilon']:.2f} | {p['delta']:g} |" in card


def test_answer_and_report_on_a_dicom_file_from_the_run_folder(curriculum_run, tmp_path, capsys):
    from cli.main import main
    from medvlm.data.synthetic import generate_hospital, write_manifest

    run_dir = curriculum_run[0]
    folder = tmp_path / "site"
    write_manifest(generate_hospital("general", 3, seed=9), folder, image_format="dicom")
    dicom = folder / "images" / "00000.dcm"
    assert main(["answer", "--run", str(run_dir), "--image", str(dicom), "--question", "is the heart enlarged?"]) == 0
    assert main(["report", "--run", str(run_dir), "--image", str(dicom)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 2 and all(line.strip() for line in printed)
    # batch mode over a manifest: one prediction per row, with the reference next to it
    assert main(["answer", "--run", str(run_dir), "--manifest", str(folder), "--out", str(tmp_path / "a.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    questions = sum(1 for _ in (folder / "manifest.jsonl").open())
    assert len(rows) == questions and {"image", "question", "answer", "reference"} <= set(rows[0])
    assert main(["report", "--run", str(run_dir), "--manifest", str(folder), "--out", str(tmp_path / "r.csv")]) == 0
    import csv

    reports = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(reports) == 3 and reports[0]["image"].endswith(".dcm") and "reference" in reports[0]


def test_an_adapter_for_another_base_model_is_refused_by_name(curriculum_run, tmp_path, caplog):
    from cli.main import main
    from medvlm.data.synthetic import generate_hospital, write_manifest

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from medvlm.recipes.foundation import ensure_foundation

    run_dir = curriculum_run[0]
    write_manifest(generate_hospital("general", 1), tmp_path, image_format="png")
    base = ensure_foundation("tiny-random") / "lm"       # another LM: same tokenizer, half the width
    config = AutoConfig.from_pretrained(base)
    config.hidden_size, config.intermediate_size = 64, 128
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "other-lm")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "other-lm")
    code = main(["report", "--run", str(run_dir), "--image", str(tmp_path / "images" / "00000.png"),
                 f"model.language.source={tmp_path / 'other-lm'}"])
    assert code == 2
    assert "not the base model loaded here" in caplog.text and "builtin:tiny-random" in caplog.text
    assert "hidden_size: adapter 128, this model 64" in caplog.text
    assert main(["report", "--run", str(tmp_path), "--image", "x.png"]) == 2
    assert "not a medvlm-fl run folder" in caplog.text
