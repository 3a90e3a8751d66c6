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


def test_utility_trains_each_hospital_alone_without_the_tags_stage_on_the_whole_budget(tmp_path, monkeypatch,
                                                                                       capsys):
    import benchmarks.utility as utility
    from medvlm.config import stages

    plans = []

    def trained(cfg, train, *, dp):
        plans.append((dp, [(s.task, s.first_round, s.last_round, s.budget_end) for s in stages(cfg)]))
        raise RuntimeError("stop after the first hospital")

    monkeypatch.setattr(utility, "trained", trained)
    with pytest.raises(RuntimeError, match="stop after"):
        utility.one_seed("tiny-consortium-tags", [*TINY_OVERRIDES, "data.seed=3"], ["fp32"], tmp_path,
                         ("alone-no-tags",))
    # the tags stage (5 rounds, a third of the budget) gone: the 10 VQA rounds spend all of it
    assert plans == [(True, [("vqa", 1, 10, 1.0)])]
    assert "training general alone without tags (DP)" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"alone-no-tags needs a curriculum with a tags stage.*tasks \[\]"):
        utility.one_seed("tiny-consortium", [*TINY_OVERRIDES, "data.seed=3"], ["fp32"], tmp_path, ("alone-no-tags",))


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


def test_probe_fits_a_separable_finding_and_reads_nothing_from_noise():
    import torch

    from benchmarks.probe import fit_probe

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    y = (x[:, 3] - 0.5 * x[:, 7] > 0).double()
    predict = fit_probe(x[:300], y[:300])
    assert (predict(x[300:]).double() == y[300:]).double().mean() >= 0.95
    noise = fit_probe(torch.randn(300, 16, generator=g), y[:300])   # features that carry nothing
    assert (noise(x[300:]).double() == y[300:]).double().mean() < 0.8
    with pytest.raises(ValueError, match="no training images"):
        fit_probe(x[:0], y[:0])


def test_probe_labels_only_the_images_asked_yes_or_no():
    from benchmarks.probe import yes_no_kinds, yes_no_labels

    tags = [{"device=yes", "modality=x-ray"}, {"count=2"}, {"device=no", "count=0"}, {"device=no"}]
    index, y = yes_no_labels(tags, "device")
    assert index == [0, 2, 3] and y.tolist() == [1.0, 0.0, 0.0]
    assert yes_no_kinds(tags) == ["device"]


def test_probe_scores_the_consortium_findings_against_their_majority():
    from benchmarks.probe import probe
    from medvlm.build import build_medvlm
    from medvlm.config import load_config
    from medvlm.data.dataset import load_splits
    from medvlm.features import with_frozen_features
    from medvlm.tags import image_tags

    cfg = load_config("tiny-consortium", [*TINY_OVERRIDES, "data.images_per_hospital=40"])
    model = build_medvlm(cfg.model, seed=0)
    splits = load_splits(cfg.data, model.vision.preprocess)
    train, val = (with_frozen_features(model, splits[k]) for k in ("train", "val"))
    result = probe(model, train, val, ["device", "pneumothorax"])
    assert set(result) == {"device", "pneumothorax"}
    for kind, r in result.items():
        asked = [t for t in image_tags(val) if f"{kind}=yes" in t or f"{kind}=no" in t]
        yes = sum(f"{kind}=yes" in t for t in asked) / len(asked)
        assert r["val_images"] == len(asked) and r["majority"] == pytest.approx(max(yes, 1 - yes))
        assert 0.0 <= r["probe"] <= 1.0 and r["train_images"] > 0
    with pytest.raises(ValueError, match="not yes/no question types"):
        probe(model, train, val, ["count"])


def test_probe_cli_names_a_question_type_it_cannot_probe(capsys):
    from benchmarks.probe import main

    with pytest.raises(SystemExit) as exit_:
        main(["--config", "tiny-consortium", "--qtypes", "count", *TINY_OVERRIDES])
    assert exit_.value.code == 2
    assert "['count'] are not yes/no question types" in capsys.readouterr().err


def _seed_run(fed: float, alone: dict[str, float], device: float = 0.9) -> dict:
    base = {"effusion": 0.6, "device": 0.8, "modality": 0.4}
    return {"start": _typed(0.5, 0.0, base), **{f"{h} alone (DP)": {**_typed(a, device), "eps": 7.9 + a / 100}
                                                  for h, a in alone.items()},
            "federated DP": {**_typed(fed, device), "eps": 7.99}}


def test_utility_draws_train_only_the_dp_models_again_and_report_each_seeds_mean(tmp_path, monkeypatch, capsys):
    import json

    import benchmarks.utility as utility

    asked, draws = [], iter([_seed_run(0.80, {"general": 0.76, "cardiac": 0.70}),
                             _seed_run(0.78, {"general": 0.72, "cardiac": 0.74})])

    def one_seed(preset, overrides, variants, tmp, models):
        asked.append(models)
        return next(draws)

    monkeypatch.setattr(utility, "one_seed", one_seed)
    utility.main(["--seeds", "0", "--draws", "2", "--models", "alone,federated-no-dp,federated",
                  "--out", str(tmp_path)])
    assert asked == [("alone", "federated-no-dp", "federated"), ("alone", "federated")]
    out = capsys.readouterr().out
    # the best hospital alone is the best mean (general 74.0 against cardiac 72.0), not each draw's best:
    # the federation's mean 79.0 leads it by 5.0; the draws' own leads are +4.0 (0.80 - 0.76) and +4.0 (0.78 - 0.74)
    assert "federated DP - best hospital alone (DP): +5.0 points (per seed +5.0; goal >= +5 on every seed: met)" in out
    assert "seed 0: +4.0, +4.0; >= +5 in 0 of 2 draws" in out
    saved = json.loads((tmp_path / "utility.json").read_text())
    assert saved["seeds"]["0"]["federated DP"]["acc"] == pytest.approx(0.79)
    assert saved["seeds"]["0"]["federated DP"]["acc_draws"] == [0.80, 0.78]
    assert saved["seeds"]["0"]["cardiac alone (DP)"]["eps"] == pytest.approx(7.9 + 0.74 / 100)   # the largest
    assert len(saved["draws"]["0"]) == 2


def test_utility_merge_reads_runs_as_draws_and_refuses_another_config(tmp_path, capsys):
    import json

    from benchmarks.utility import main

    head = {"config": "tiny-consortium-tags", "overrides": ["data.images_per_hospital=2400"],
            "models": ["federated", "alone"]}
    old = tmp_path / "a.json"      # a file written before --draws: one run per seed
    old.write_text(json.dumps({**head, "seeds": {"0": _seed_run(0.80, {"general": 0.75}),
                                                 "1": _seed_run(0.70, {"general": 0.66})}}))
    new = tmp_path / "b.json"
    new.write_text(json.dumps({**head, "draws": {"0": [_seed_run(0.82, {"general": 0.75})]}}))
    main(["--merge", str(old), str(new), "--out", str(tmp_path / "m")])
    out = capsys.readouterr().out
    assert "per seed +6.0, +4.0; goal >= +5 on every seed: not met" in out
    assert "seed 0: +5.0, +7.0; seed 1: +4.0; >= +5 in 2 of 3 draws" in out
    assert json.loads((tmp_path / "m" / "utility.json").read_text())["seeds"]["0"]["federated DP"]["acc"] == \
        pytest.approx(0.81)

    other = tmp_path / "c.json"
    other.write_text(json.dumps({**head, "overrides": [], "seeds": {"0": _seed_run(0.9, {"general": 0.7})}}))
    with pytest.raises(SystemExit, match=r"c\.json has overrides \[\] but .*a\.json has \['data\.images_per_hospital"):
        main(["--merge", str(old), str(other)])
    broken = tmp_path / "d.json"
    broken.write_text("{not json")
    with pytest.raises(SystemExit, match=r"cannot read .*d\.json"):
        main(["--merge", str(broken)])


def test_utility_merge_lines_up_files_of_other_models_and_judges_the_better_plan_alone(tmp_path, capsys):
    import json

    from benchmarks.utility import main

    head = {"config": "tiny-consortium-tags", "overrides": ["data.images_per_hospital=2400"]}
    fed = tmp_path / "fed.json"     # two draws of the federation and the hospitals on its plan
    fed.write_text(json.dumps({**head, "models": ["federated", "alone"], "draws": {"0": [
        _seed_run(0.80, {"general": 0.74}), _seed_run(0.82, {"general": 0.76})]}}))
    no_tags = tmp_path / "no-tags.json"   # one draw of the hospitals alone without the tags stage
    run = _seed_run(0.0, {})
    del run["federated DP"]
    run["general alone without tags (DP)"] = {**_typed(0.78, 0.9), "eps": 7.99}
    no_tags.write_text(json.dumps({**head, "models": ["alone-no-tags"], "draws": {"0": [run]}}))
    main(["--merge", str(fed), str(no_tags), "--out", str(tmp_path / "m")])
    out = capsys.readouterr().out
    assert "federated DP - best hospital alone (DP) on the federation's plan: +6.0 points (per seed +6.0)" in out
    # the better plan alone (78.0 without tags against 75.0) is the baseline the goal is judged on
    assert ("federated DP - best hospital alone (DP) on either plan (the federation's, or without its tags "
            "stages): +3.0 points (per seed +3.0; goal >= +5 on every seed: not met)") in out
    assert "seed 0: +2.0; >= +5 in 0 of 1 draws" in out   # only the draw that has both plans
    saved = json.loads((tmp_path / "m" / "utility.json").read_text())
    assert saved["models"] == ["alone", "alone-no-tags", "federated"]
    assert len(saved["draws"]["0"]) == 2   # the second file's start is not a third draw
    assert saved["seeds"]["0"]["general alone without tags (DP)"]["acc_draws"] == [0.78]
    assert (tmp_path / "m" / "utility.png").stat().st_size > 0
    assert (tmp_path / "m" / "goal.png").stat().st_size > 5_000   # the goal as a picture: alone and federated


def test_utility_merge_judges_the_ratio_to_pooled_per_seed_to_three_places(tmp_path, capsys):
    import json

    from benchmarks.utility import main

    head = {"config": "tiny-consortium-tags", "overrides": ["data.images_per_hospital=2400"]}
    fed = tmp_path / "fed.json"
    fed.write_text(json.dumps({**head, "models": ["federated", "alone"], "draws": {
        "0": [_seed_run(0.79, {"general": 0.74})], "1": [_seed_run(0.7895, {"general": 0.74})]}}))
    pooled = tmp_path / "pooled.json"   # pooled without DP, trained in another run
    pooled.write_text(json.dumps({**head, "models": ["pooled"], "draws": {
        s: [{"start": _typed(0.5, 0.0), "pooled no DP": _typed(acc, 0.95)}] for s, acc in (("0", 0.85), ("1", 0.88))}}))
    main(["--merge", str(fed), str(pooled)])
    # seed 1: 0.7895 / 0.88 = 0.897, under the goal although two places would print 0.90
    assert "federated DP / pooled no DP: 0.91 (per seed 0.929, 0.897; goal >= 0.9 on every seed: not met)" \
        in capsys.readouterr().out
    only_0 = tmp_path / "pooled-0.json"   # pooling for seed 0 alone: seed 1 is named, not judged (nor a crash)
    only_0.write_text(json.dumps({**head, "models": ["pooled"], "draws": {
        "0": [{"start": _typed(0.5, 0.0), "pooled no DP": _typed(0.78, 0.95)}]}}))
    main(["--merge", str(fed), str(only_0)])
    assert ("federated DP / pooled no DP: 1.01 (per seed 0: 1.013; seeds 1 lack one of the two; goal >= 0.9 on "
            "every seed: not met)") in capsys.readouterr().out


def test_utility_goal_plot_draws_the_better_lone_plan_plus_five_and_each_draw(tmp_path):
    from benchmarks.utility import goal_bars, over_draws, plot_goal

    first, second = _seed_run(0.80, {"general": 0.74, "cardiac": 0.76}), _seed_run(0.84, {"general": 0.75})
    first["oncology alone without tags (DP)"] = {**_typed(0.78, 0.9), "eps": 8.0}
    first["pooled no DP"] = _typed(0.86, 0.95)
    runs = {0: over_draws([first, second]), 1: over_draws([_seed_run(0.81, {"general": 0.70})])}

    bars = goal_bars(runs, ("alone", "alone-no-tags"))
    # seed 0: cardiac's one draw (0.76) beats general's mean (0.745); the plan without tags is better still
    assert list(bars[0]["bars"]) == ["best alone: cardiac", "best alone without tags: oncology", "federated DP",
                                     "pooled no DP"]
    assert bars[0]["goal"] == pytest.approx(0.83)
    assert bars[0]["bars"]["federated DP"] == (pytest.approx(0.82), [0.80, 0.84])   # the mean and each draw
    assert bars[0]["bars"]["pooled no DP"][1] == []          # no DP noise: no draws to dot
    assert bars[1]["goal"] == pytest.approx(0.75) and "best alone without tags: oncology" not in bars[1]["bars"]

    path = plot_goal(runs, ("alone", "alone-no-tags"), tmp_path / "goal.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000


def test_utility_pools_at_the_federations_noise_with_sqrt_k_times_the_calibrated_noise(tmp_path, monkeypatch,
                                                                                      capsys):
    """K hospitals at one epsilon and sample rate, summing their noisy batches every step, carry sqrt(K)
    times one curator's noise: ``pooled-dp-fed-noise`` trains the pooled data at that noise."""
    import math

    import benchmarks.utility as utility
    from medvlm.build import build_medvlm
    from medvlm.config import load_config
    from medvlm.data.dataset import load_splits

    real, asked = utility.trained, []

    def trained(cfg, train, *, dp, noise_scale=1.0):
        asked.append((dp, noise_scale))
        raise RuntimeError("stop at the pooled model")

    monkeypatch.setattr(utility, "trained", trained)
    with pytest.raises(RuntimeError, match="stop at"):
        utility.one_seed("tiny", [*TINY_OVERRIDES, "data.hospitals=[general,oncology,cardiac]"], ["fp32"], tmp_path,
                         ("pooled-dp-fed-noise",))
    assert asked == [(True, pytest.approx(math.sqrt(3)))]
    assert "training pooled DP at the federation's noise" in capsys.readouterr().err
    assert utility._model_of("pooled DP at the federation's noise") == "pooled-dp-fed-noise"
    assert utility._is_dp("pooled DP at the federation's noise") and "pooled-dp-fed-noise" not in utility.DEFAULT_MODELS

    cfg = load_config("tiny", TINY_OVERRIDES)
    train = load_splits(cfg.data, build_medvlm(cfg.model, seed=0).vision.preprocess, hospitals=["general"])["train"]
    _, at_target = real(cfg, train, dp=True)
    _, louder = real(cfg, train, dp=True, noise_scale=math.sqrt(3))
    assert cfg.privacy.target_epsilon - 0.1 < at_target <= cfg.privacy.target_epsilon + 1e-6
    assert louder < at_target / 1.5          # the same steps at sqrt(3) times the noise spend far less
