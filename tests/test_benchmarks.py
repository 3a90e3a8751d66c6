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
