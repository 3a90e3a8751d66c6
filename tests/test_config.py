import pytest

from medvlm.config import ExperimentConfig, available_presets, load_config, stages


@pytest.mark.parametrize("preset", available_presets())
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.model.fusion.kind in ("qformer", "mlp")


def test_presets_exist():
    assert {"tiny", "tiny-mlp", "biomedclip-7b"} <= set(available_presets())


def test_base_chain_and_overrides():
    cfg = load_config("tiny-mlp", ["train.epochs=3", "privacy.target_epsilon=4"])
    assert cfg.model.fusion.kind == "mlp"          # from tiny-mlp
    assert cfg.model.lora.target_modules == load_config("tiny").model.lora.target_modules  # inherited from tiny
    assert len(cfg.model.lora.target_modules) == 7                                       # every linear layer
    assert cfg.train.epochs == 3 and cfg.privacy.target_epsilon == 4


def test_biomedclip_preset_points_at_local_dirs():
    cfg = load_config("biomedclip-7b")
    assert cfg.model.vision.source.startswith("local-dir:")
    assert cfg.model.language.source.startswith("/")


@pytest.mark.parametrize("override, key", [
    ("model.fusion.kind=transformer", "model.fusion.kind"),
    ("privacy.delta=2", "privacy.delta"),
    ("model.vision.source=ViT-B-16", "model.vision.source"),
    ("train.optimizer=lion", "train.optimizer"),
    ("train.momentum=1.5", "train.momentum"),
    ("privacy.max_grad_norm=inf", "privacy.max_grad_norm"),      # passed "> 0"; every hospital then crashed
    ("federation.timeout_s=.inf", "federation.timeout_s"),
    ("federation.stages.0.lr=nan", "federation.stages.0.lr"),
    ("model.lora.alpha=0", "model.lora.alpha"),                  # LoRA scaled by 0: trained nothing, said nothing
    ("train.weight_decay=-0.5", "train.weight_decay"),
    ("train.eval_max_new_tokens=0", "train.eval_max_new_tokens"),  # every answer empty: accuracy 0
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + "=.* is invalid"):
        load_config("tiny-curriculum" if ".stages." in key else "tiny", [override])


@pytest.mark.parametrize("overrides, key", [
    (["federation.secure_aggregation=secagg+", "federation.central_dp.enabled=true"], "federation.secure_aggregation"),
    (["federation.aggregation=median", "federation.central_dp.enabled=true"], "federation.aggregation"),
    (["federation.aggregation=median", "federation.secure_aggregation=secagg+"], "federation.aggregation"),
    (["federation.transport=int8", "federation.secure_aggregation=secagg+"], "federation.transport"),
    (["federation.aggregation=fedadam"], "federation.server_lr"),          # Adam's step size has no safe default
    (["federation.aggregation=fedavgm", "federation.central_dp.enabled=true"], "federation.aggregation"),
    (["federation.aggregation=fedyogi", "federation.server_lr=0.01", "federation.secure_aggregation=secagg+"],
     "federation.aggregation"),
    (["federation.aggregation=fedavgm", "federation.server_momentum=1"], "federation.server_momentum"),
    (["federation.server_tau=1e-6"], "federation.server_tau"),         # FedAvg has no second moment to floor
    (["federation.aggregation=fedadam", "federation.server_lr=0.01", "federation.server_tau=0"],
     "federation.server_tau"),
])
def test_rules_across_fields_are_the_config_s_and_name_a_key(overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config("tiny", overrides)


def test_unknown_key_and_malformed_override():
    with pytest.raises(ValueError, match="nonexistent"):
        load_config("tiny", ["train.nonexistent=1"])
    with pytest.raises(ValueError, match="key=value"):
        load_config("tiny", ["train.epochs"])
    with pytest.raises(ValueError, match="not found"):
        load_config("no-such-preset")


@pytest.mark.parametrize("text, said", [
    ("model: [\n", r"c\.yaml is not valid YAML: did not find expected node content \(line 2, column 1\)"),
    ("- train\n", r"c\.yaml holds a list at its top, not settings"),
    ("model: {vision: 3}\n", r"c\.yaml: int is not a subclass of VisionConfig\. value: 3$"),   # was ': None'
    ("train: {epochs: abc}\n", r"c\.yaml: train\.epochs: Value 'abc' of type 'str' could not be converted to Float$"),
])
def test_a_config_file_that_is_not_settings_is_named_by_file_line_and_key_on_one_line(tmp_path, text, said):
    """A hand-written preset with a YAML slip (a parser traceback before), a list, a value where a section
    belongs ('config file c.yaml: None' before) or a wrong type (four lines of OmegaConf internals)."""
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=said) as info:
        load_config(str(tmp_path / "c.yaml"))
    assert "\n" not in str(info.value)
    (tmp_path / "c.yaml").write_bytes(b"\xff\xfetrain: {}")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_config(str(tmp_path / "c.yaml"))


def test_a_run_folder_whose_config_is_empty_is_refused_not_read_as_defaults(tmp_path):
    from medvlm.runs import saved_config

    (tmp_path / "config.yaml").write_text("\n")
    with pytest.raises(ValueError, match="config.yaml is empty: the run's settings are lost"):
        saved_config(tmp_path)


def test_the_simulated_hospitals_are_checked_before_anything_starts(caplog):
    """An empty list, a name twice (two SuperNodes shared one ledger) or an unknown profile (every hospital
    crashed at round 0): refused at once, naming data.hospitals and the way out. These settings mean nothing
    to a deployed site (it reads its own data), so the schema itself accepts them."""
    from cli.main import main
    from medvlm.data.dataset import check_synthetic

    for hospitals, said in (("[]", "data.hospitals is empty"), ("[general,oncology,general]",
                            "general named twice.*e.g. general-1"), ("[general,nosuch]",
                            "data.hospitals: unknown hospital profile 'nosuch'")):
        cfg = load_config("tiny", [f"data.hospitals={hospitals}"])
        with pytest.raises(ValueError, match=said):
            check_synthetic(cfg.data)
        assert main(["simulate", "--run-dir", "unused", f"data.hospitals={hospitals}"]) == 2    # before Ray starts
        assert "data.hospitals" in caplog.text
    check_synthetic(load_config("tiny", ["data.hospitals=[general,general-1]"]).data)
    with pytest.raises(ValueError, match=r"data\.seed=-1 is invalid: must be >= 0"):   # every hospital crashed
        load_config("tiny", ["data.seed=-1"])


def test_a_question_type_the_synthetic_hospitals_never_ask_is_refused_naming_it():
    """A typo in data.qtypes (or a stage's qtypes) matched no row and was trained on silently; a hospital-only
    type without data.hospital_only asked nothing either. A deployed consortium's run config names its
    release's own types (VQA-RAD's pres, abn): the schema accepts them, the sites' rows decide."""
    from medvlm.data.dataset import check_synthetic

    cfg = load_config("tiny", ["data.qtypes=[nodule,nodles]"])
    with pytest.raises(ValueError, match=r"data\.qtypes=\['nodule', 'nodles'\].*ask no 'nodles' question"):
        check_synthetic(cfg.data)
    cfg = load_config("tiny-consortium-tags", ["federation.stages.0.qtypes=[pneumo]"])
    with pytest.raises(ValueError, match=r"federation\.stages\[tags\]\.qtypes.*ask no 'pneumo' question"):
        check_synthetic(cfg.data, cfg.federation.stages)
    with pytest.raises(ValueError, match="pneumothorax questions are asked only with data.hospital_only=true"):
        check_synthetic(load_config("tiny", ["data.qtypes=[pneumothorax]"]).data)
    check_synthetic(load_config("tiny", ["data.qtypes=[pneumothorax]", "data.hospital_only=true"]).data)
    assert load_config("tiny", ["data.qtypes=[pres, abn]"]).data.qtypes == ["pres", "abn"]   # a deployment's


def test_an_override_names_a_list_entry_by_its_index():
    cfg = load_config("tiny-consortium-tags", ["federation.stages.0.budget=0.2"])
    assert cfg.federation.stages[0].budget == 0.2
    assert cfg.federation.stages[1].budget is None          # the other entry is untouched
    assert cfg.federation.stages[0].task == "tags"          # and so is the rest of this one
    with pytest.raises(ValueError, match=r"federation\.stages is a list of 2 entries; .*0\.\.1"):
        load_config("tiny-consortium-tags", ["federation.stages.2.budget=0.2"])
    with pytest.raises(ValueError, match=r"federation\.stages\[0\]\.budget"):
        load_config("tiny-consortium-tags", ["federation.stages.0.budget=abc"])
    whole = load_config("tiny-consortium-tags", ["federation.stages=[{name: a, rounds: 2}]"])
    assert [s.name for s in whole.federation.stages] == ["a"]   # a whole list is replaced


def test_a_tags_stage_s_loss_and_head_are_checked_and_named_when_wrong():
    cfg = load_config("tiny-consortium-tags")
    first = stages(cfg)[0]
    assert (first.task, first.tag_loss, first.qtypes) == ("tags", "yes-no", ("pneumothorax", "device"))
    assert stages(cfg)[1].tag_loss == "bce"                 # the default, unused by a vqa stage
    with pytest.raises(ValueError, match=r"federation\.stages\[tags\]\.tag_loss.*'focal'.*yes-no"):
        load_config("tiny-consortium-tags", ["federation.stages.0.tag_loss=focal"])
    with pytest.raises(ValueError, match=r"federation\.stages\[vqa\]\.tag_loss.*tags stage only"):
        load_config("tiny-consortium-tags", ["federation.stages.1.tag_loss=yes-no"])
    assert stages(load_config("tiny-consortium-tags", ["federation.stages.0.tag_head=fixed"]))[0].tag_head == "fixed"
    with pytest.raises(ValueError, match=r"federation\.stages\[tags\]\.tag_head.*'shared'.*fixed"):
        load_config("tiny-consortium-tags", ["federation.stages.0.tag_head=shared"])
    with pytest.raises(ValueError, match=r"federation\.stages\[vqa\]\.tag_head.*tags stage only"):
        load_config("tiny-consortium-tags", ["federation.stages.1.tag_head=fixed"])


def test_the_large_consortium_preset_is_the_tags_preset_s_vqa_rounds_alone():
    """docs/benchmarks.md compares the two presets as the same VQA rounds with and without the tags stage
    before them: the large preset's one stage must be the tags preset's VQA stage, on the same data and
    batches, at the size the tags preset was measured at."""
    from dataclasses import replace

    large, tags = load_config("tiny-consortium-large"), load_config("tiny-consortium-tags")
    (only,), (first, vqa) = stages(large), stages(tags)
    assert first.task == "tags" and only.task == "vqa"
    assert replace(only, name=vqa.name, first_round=vqa.first_round, last_round=vqa.last_round) == vqa
    assert only.last_round - only.first_round == vqa.last_round - vqa.first_round    # as many rounds
    assert large.data == replace(tags.data, images_per_hospital=2400) and large.data.hospital_only
    assert (large.train, large.privacy, large.model) == (tags.train, tags.privacy, tags.model)


def test_rounds_beside_a_curriculum_must_be_its_stages_sum():
    # a curriculum's length is its stages' rounds: federation.rounds=10 on one was dropped without a word
    with pytest.raises(ValueError, match=r"federation\.rounds=10 disagrees with federation\.stages.*add up to 3 "
                                         r"\(align 1, vqa-general 1, vqa-domain 1\).*federation\.stages\.N\.rounds"):
        load_config("tiny-curriculum", ["federation.rounds=10"])
    assert load_config("tiny-curriculum", ["federation.rounds=3"]).federation.rounds == 3   # agrees: fine
    longer = load_config("tiny-curriculum", ["federation.stages.2.rounds=4"])
    assert longer.federation.rounds == 6                      # the stages say how long
    assert load_config("tiny", ["federation.rounds=10"]).federation.rounds == 10   # no curriculum: as given
    assert load_config("tiny-curriculum", ["federation.stages=[]", "federation.rounds=7"]).federation.rounds == 7
