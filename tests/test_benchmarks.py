"""The benchmarks' own behaviour (their figures live in docs/benchmarks.md, not in tests)."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_OVERRIDES


def test_utility_prints_each_model_when_scored_so_a_dying_run_keeps_it(tmp_path, monkeypatch, capsys):
    import benchmarks.utility as utility

    def dies(*args, **kwargs):
        raise RuntimeError("killed while training the first hospital")

    monkeypatch.setattr(utility, "trained", dies)
    with pytest.raises(RuntimeError, match="killed"):
        utility.one_seed("tiny", [*TINY_OVERRIDES, "data.seed=3"], ["fp32"], tmp_path, ("alone",))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("benchmarks.utility: seed 3: ")]
    assert len(lines) == 1 and lines[0].startswith("benchmarks.utility: seed 3: start: overall "), lines
    overall = float(lines[0].split("overall ")[1].split(",")[0])
    assert 0.0 <= overall <= 100.0


def test_utility_line_names_what_each_model_has():
    from benchmarks.utility import finished_line

    line = finished_line(1, "general alone (DP)", {"acc": 0.769, "only": 0.754, "rest": 0.773, "own": 0.793,
                                                    "eps": 7.996, "s": 126.1})
    assert line == ("benchmarks.utility: seed 1: general alone (DP): overall 76.9, h-only 75.4, rest 77.3, "
                    "own val 79.3, epsilon 8.00, 126 s")
    assert finished_line(0, "start", {"acc": 0.5, "only": None, "rest": 0.5}) == \
        "benchmarks.utility: seed 0: start: overall 50.0, h-only -, rest 50.0"


def test_utility_trains_each_hospital_alone_without_dp_when_asked(tmp_path, monkeypatch, capsys):
    import benchmarks.utility as utility

    asked = []

    def trained(cfg, train, *, dp):
        asked.append(dp)
        raise RuntimeError("stop after the first hospital")

    monkeypatch.setattr(utility, "trained", trained)
    with pytest.raises(RuntimeError, match="stop after"):
        utility.one_seed("tiny", [*TINY_OVERRIDES, "data.seed=3"], ["fp32"], tmp_path, ("alone-no-dp",))
    assert asked == [False]
    assert "training general alone (no DP)" in capsys.readouterr().err


def _typed(acc: float, device: float | None, base: dict | None = None) -> dict:
    return {"acc": acc, "types": {"effusion": acc, "device": device, "modality": 1.0},
            **({"base_types": base, "questions": {"effusion": 40, "device": 30, "modality": 50}} if base else {})}


def test_utility_tables_each_question_type_with_the_hospital_only_ones_last(capsys):
    from benchmarks.utility import by_type, print_by_type

    base = {"effusion": 0.6, "device": 0.8, "modality": 0.4}
    runs = {0: {"start": _typed(0.5, 0.0, base), "general alone (DP)": _typed(0.7, 0.8),
                "federated DP": _typed(0.8, 0.9)},
            1: {"start": _typed(0.7, 0.0, base), "general alone (DP)": _typed(0.9, None),
                "federated DP": _typed(0.9, 1.0)}}
    qtypes, table, majority = by_type(runs)
    assert qtypes == ["effusion", "modality", "device"]          # the public corpus's types, then hospital-only
    assert table["general alone (DP)"]["effusion"] == pytest.approx(0.8)   # mean over seeds
    assert table["general alone (DP)"]["device"] == pytest.approx(0.8)     # a seed without it is left out
    assert table["federated DP"]["device"] == pytest.approx(0.95) and majority["device"] == pytest.approx(0.8)

    print_by_type(runs)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["question", "type", "start", "general", "fed", "DP", "majority", "questions"]
    assert lines[-1].split() == ["device", "*", "0.0", "80.0", "95.0", "80.0", "30"]


def test_utility_plots_accuracy_by_question_type(tmp_path):
    from benchmarks.utility import plot_by_type

    base = {"effusion": 0.6, "device": 0.8, "modality": 0.4}
    path = plot_by_type({0: {"start": _typed(0.5, None, base), "federated DP": _typed(0.8, 0.9)}},
                        tmp_path / "utility.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000


def test_utility_out_keeps_every_finished_seed_when_a_later_one_dies(tmp_path, monkeypatch, capsys):
    import json

    import benchmarks.utility as utility

    def one_seed(preset, overrides, variants, tmp, models):
        if "data.seed=1" in overrides:
            raise RuntimeError("killed during seed 1")
        return {"start": _typed(0.5, 0.0, {"effusion": 0.6, "device": 0.8, "modality": 0.4}),
                "federated DP": _typed(0.8, 0.9)}

    monkeypatch.setattr(utility, "one_seed", one_seed)
    with pytest.raises(RuntimeError, match="seed 1"):
        utility.main(["--seeds", "0,1", "--models", "federated", "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "utility.json").read_text())
    assert list(saved["seeds"]) == ["0"] and saved["seeds"]["0"]["federated DP"]["types"]["device"] == 0.9

    utility.main(["--seeds", "0", "--models", "federated", "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "utility.png").stat().st_size > 5_000
    assert "device *" in capsys.readouterr().out
