"""server/report.py and server/checkpoint.py on their own: round records, the summary built from
them, and checkpoints that resume only the experiment they were made by."""

import json

import pytest
import torch

from server.report import RoundLog, build_summary, eval_block, headline, stage_results


def _record(rnd, acc, *, stage="main", bytes_up=1000, rejected=(), failed=()):
    return {"round": rnd, "stage": stage, "task": "vqa", "accuracy": acc, "baseline_accuracy": 0.5,
            "hospitals": {"a": {"status": "trained", "bytes_up": bytes_up}, "b": {"status": "trained",
                                                                                  "bytes_up": bytes_up * 3}},
            "rejected": list(rejected), "failed": list(failed), "bytes_down": 4000, "bytes_up": bytes_up * 4,
            "train_loss": 0.1 * rnd, "epsilon": {"a": 2.0 * rnd, "b": 2.5 * rnd}, "budget": {"a": 8.0, "b": 8.0},
            "seconds": 1.5}


def test_eval_block_scores_the_model_and_the_baseline_from_summed_counts():
    counts = {"closed_correct": 3, "closed_total": 4, "open_correct": 1, "open_total": 4,
              "baseline/closed_correct": 2, "baseline/closed_total": 4, "baseline/open_correct": 0,
              "baseline/open_total": 4}
    block = eval_block(counts)
    assert block["model"]["accuracy"] == pytest.approx(4 / 8) and block["model"]["closed_accuracy"] == 0.75
    assert block["baseline"]["accuracy"] == pytest.approx(2 / 8) and block["baseline"]["open_accuracy"] == 0.0
    assert headline({"accuracy": 0.6, "baseline_accuracy": 0.5}) == ("accuracy", 0.6, 0.5)
    assert headline({"finding_f1": 0.4, "baseline_finding_f1": 0.2}) == ("finding-F1", 0.4, 0.2)


def test_the_summary_is_the_last_evaluated_round_and_the_federation_s_totals():
    records = [_record(0, 0.6), _record(1, 0.7, rejected=["x"]), _record(2, None, failed=[{"reason": "t"}])]
    privacy = {"a": {"epsilon": 7.5, "delta": 1e-5}, "b": {"epsilon": 8.0, "delta": 1e-5}}
    s = build_summary(records, privacy, trainable=123, dp=True, wall_seconds=9.0, stopped="completed")
    assert s["final_accuracy"] == 0.7 and s["evaluated_round"] == 1 and s["initial_accuracy"] == 0.6
    assert s["rounds"] == 2 and s["hospitals"] == ["a", "b"] and s["epsilon"] == {"a": 7.5, "b": 8.0}
    assert s["bytes_sent_per_round"] == pytest.approx(2000)            # mean of 1000 and 3000 per hospital
    assert s["bytes_received_per_round"] == pytest.approx(3 * 4000 / 7)   # 6 replies + 1 failure
    assert s["rejected_updates"] == 1 and s["failed_replies"] == 1 and s["delta"] == 1e-5
    assert [st["rounds"] for st in stage_results(records)] == [[1, 2]]


def test_a_round_log_appends_records_prints_a_row_and_draws_plots(tmp_path, capsys):
    log = RoundLog(tmp_path)
    for r in (_record(0, 0.6), _record(1, 0.7)):
        log.add(r)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["accuracy"] for x in lines] == [0.6, 0.7]
    out = capsys.readouterr().out
    assert out.count("round") == 1 and "70.0%" in out and "2.50" in out   # the header once; the largest epsilon
    assert (tmp_path / "plots.png").stat().st_size > 10_000
    RoundLog(tmp_path, records=[_record(0, 0.6)]).rewrite()              # a resume keeps what the state has
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_the_plots_show_each_question_type_against_its_majority_when_the_rounds_report_them(tmp_path):
    from PIL import Image

    typed = [{**_record(0, 0.6), "per_qtype": {"effusion": 0.9}, "baseline_per_qtype": {"effusion": 0.7}},
             {**_record(1, 0.7), "per_qtype": {"effusion": 0.95, "pneumothorax": 0.8},   # a type new this round
              "baseline_per_qtype": {"effusion": 0.7, "pneumothorax": 0.78}}]
    widths = {}
    for name, records in (("plain", [_record(0, 0.6), _record(1, 0.7)]), ("typed", typed)):
        (tmp_path / name).mkdir()
        with Image.open(RoundLog(tmp_path / name, records).plot()) as image:
            widths[name] = image.size[0]
    assert widths["typed"] == pytest.approx(widths["plain"] * 4 / 3, rel=0.01)   # a fourth panel, as wide


def test_checkpoints_resume_only_the_same_experiment(tmp_path, tiny_cfg):
    from dataclasses import replace

    from medvlm.build import build_skeleton
    from medvlm.config import to_dict
    from server.checkpoint import Checkpoints

    skeleton = build_skeleton(tiny_cfg.model)
    state = {k: v + 0.25 for k, v in skeleton.trainable_state().items()}
    points = Checkpoints(tmp_path, skeleton)
    assert points.load(tiny_cfg) is None                               # a fresh run folder
    path = points.save(3, state, {"config": to_dict(tiny_cfg), "note": "kept"})
    assert path.name == "round-003" and (tmp_path / "global" / "fusion.safetensors").is_file()
    server_state, loaded = Checkpoints(tmp_path, build_skeleton(tiny_cfg.model)).load(tiny_cfg)
    assert server_state["round"] == 3 and server_state["note"] == "kept"
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    longer = replace(tiny_cfg, federation=replace(tiny_cfg.federation, rounds=9))
    assert Checkpoints(tmp_path, skeleton).load(longer) is not None     # extending a run is allowed
    other = replace(tiny_cfg, train=replace(tiny_cfg.train, lr=0.5))
    with pytest.raises(ValueError, match=r"train.lr: 0.001 -> 0.5"):
        Checkpoints(tmp_path, skeleton).load(other)
    (tmp_path / "server-state.json").write_text("{broken")
    with pytest.raises(ValueError, match="server-state.json is not valid JSON"):
        Checkpoints(tmp_path, skeleton).load(tiny_cfg)
