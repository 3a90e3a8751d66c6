"""Stage 1 at the hospitals (medvlm.tags): the fusion learns each image's answers as tags through a
head that stays at the hospital; one image is one DP record."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from medvlm.build import build_medvlm
from medvlm.config import PrivacyConfig, TrainConfig, load_config
from medvlm.data.dataset import VQARows
from medvlm.tags import (TAG_COLUMNS, TagHead, column, image_tags, load_head, save_head, tag_loss, tag_of,
                         tag_targets, yes_no_columns)
from medvlm.train import dp_records, planned_steps, train_local
from tests.conftest import TINY_OVERRIDES

TAGS = TrainConfig(epochs=1, batch_size=8, physical_batch_size=8, lr=1e-2, trainable=["fusion"])


def _head(model, data, loss: str = "bce", fixed: bool = False) -> TagHead:
    with torch.no_grad():
        width = model.fusion(model.encode_images(data.pixels[:1])).shape[-1]
    torch.manual_seed(0)
    return TagHead(width, loss=loss, fixed=fixed)


def test_tags_are_each_image_s_answers_hashed_into_fixed_columns():
    rows = [{"image_index": 0, "question": "Is there a pneumothorax?", "answer": "Yes", "qtype": "pneumothorax"},
            {"image_index": 0, "question": "Which side?", "answer": "left  lung", "qtype": "nodule_side"},
            {"image_index": 2, "question": "What modality?", "answer": "CT"}]          # no qtype: the question
    data = VQARows(torch.zeros(3, 4, 8), rows, tokens=True)
    assert image_tags(data) == [{"pneumothorax=yes", "nodule_side=left lung"}, set(), {"what modality?=ct"}]
    assert tag_of(rows[1]) == "nodule_side=left lung"
    y = tag_targets(image_tags(data))
    assert y.shape == (3, TAG_COLUMNS) and y.sum(1).tolist() == [2, 0, 1]
    assert y[0, column("pneumothorax=yes")] == 1 and column("pneumothorax=yes") == column("pneumothorax=yes")
    assert column("pneumothorax=yes") != column("pneumothorax=no")   # (a collision would make this test moot)
    # the head's shape never depends on the data: the same columns whatever the answers are
    assert tag_targets([{"a=b"}]).shape[1] == tag_targets([{f"x={i}" for i in range(50)}]).shape[1]
    with pytest.raises(ValueError, match="image_index 7") as bad:
        image_tags(VQARows(torch.zeros(3, 4, 8), [{"image_index": 7, "question": "is it new?", "answer": "a"}],
                           tokens=True))
    assert "is it new" not in str(bad.value)     # an error at a deployed site reaches the coordinator: no question


def test_the_yes_no_loss_is_a_two_way_choice_per_yes_no_answer_of_each_image_alone():
    sets = [{"pneumothorax=yes", "device=no", "modality=ct"}, {"device=yes"}, {"modality=mri"}]
    y = tag_targets(sets, loss="yes-no")
    assert y.shape == (3, 2, 2) and y.dtype == torch.long
    assert sorted(map(tuple, y[0].tolist())) == sorted([(column("pneumothorax=yes"), column("pneumothorax=no")),
                                                        (column("device=no"), column("device=yes"))])
    assert y[1, 1].tolist() == [-1, -1] and (y[2] == -1).all()            # padding: no pair
    torch.manual_seed(0)
    logits = torch.randn(3, TAG_COLUMNS, requires_grad=True)
    loss = tag_loss(logits, y, "yes-no")
    pair = lambda i, no, yes, k: F.cross_entropy(logits[i, [column(no), column(yes)]][None], torch.tensor([k]))  # noqa: E731
    assert loss[0].item() == pytest.approx((pair(0, "pneumothorax=no", "pneumothorax=yes", 1)
                                            + pair(0, "device=no", "device=yes", 0)).item(), rel=1e-6)
    assert loss[1].item() == pytest.approx(pair(1, "device=no", "device=yes", 1).item(), rel=1e-6)
    assert loss[2].item() == 0.0                                           # no yes/no answer: nothing learnt
    loss[0].backward()      # the gradient reaches the image's own pairs' columns and nothing else
    touched = set(logits.grad.nonzero()[:, 1].tolist())
    assert set(logits.grad.nonzero()[:, 0].tolist()) == {0}
    assert touched == {column(t) for t in ("pneumothorax=yes", "pneumothorax=no", "device=yes", "device=no")}
    with pytest.raises(ValueError, match=r"none of the 2 images.*\['count', 'modality'\].*qtypes"):
        tag_targets([{"modality=ct"}, {"count=2"}], loss="yes-no")
    with pytest.raises(ValueError, match="'softmax'.*bce"):
        TagHead(8, loss="softmax")


def test_a_yes_no_kind_whose_two_answers_hash_to_one_column_still_learns():
    """1 kind in TAG_COLUMNS hashes ``=yes`` and ``=no`` to one column (a data set whose kinds are its
    question texts has hundreds of kinds): its two-way choice must not compare a column with itself."""
    kind = next(k for k in (f"is there finding {i}?" for i in range(100_000))
                if column(f"{k}=yes") == column(f"{k}=no"))
    both = yes_no_columns(kind)
    assert both["yes"] == column(f"{kind}=yes") and both["no"] != both["yes"]
    assert both == yes_no_columns(kind)                                    # stable
    assert yes_no_columns("pneumothorax") == {"yes": column("pneumothorax=yes"), "no": column("pneumothorax=no")}
    y = tag_targets([{f"{kind}=yes"}, {f"{kind}=no"}], loss="yes-no")
    assert y[0, 0].tolist() == [both["yes"], both["no"]] and y[1, 0].tolist() == [both["no"], both["yes"]]
    logits = torch.zeros(2, TAG_COLUMNS, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=1.0)
    for _ in range(20):
        opt.zero_grad()
        tag_loss(logits, y, "yes-no").sum().backward()
        opt.step()
    assert tag_loss(logits, y, "yes-no").max().item() < 0.1                # not stuck at log 2


def test_a_tags_step_trains_the_fusion_and_the_head_never_lora(tiny_cfg, tiny_splits):
    model = build_medvlm(tiny_cfg.model, seed=0)
    data = tiny_splits["train"]
    head = _head(model, data)
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    before = model.trainable_state()
    result = train_local(model, data, train=TAGS, privacy=PrivacyConfig(enabled=False), max_steps=3,
                         progress=False, tags=head)
    assert set(result.state) == set(before)                 # the model's state only: no head tensor
    moved = {k for k in before if not torch.equal(result.state[k], before[k])}
    assert moved and all(k.startswith("fusion.") for k in moved)
    assert any(not torch.equal(head.state_dict()[k], head_before[k]) for k in head_before)
    assert result.metrics["examples"] == len(data.pixels) == dp_records(data, tags=True) < len(data)
    with pytest.raises(ValueError, match="fusion alone"):
        train_local(model, data, train=replace(TAGS, trainable=["fusion", "lora"]),
                    privacy=PrivacyConfig(enabled=False), max_steps=1, progress=False, tags=head)
    with pytest.raises(ValueError, match="ghost"):
        train_local(model, data, train=TAGS, privacy=PrivacyConfig(target_epsilon=None, noise_multiplier=1.0,
                                                                  grad_sample_mode="ghost"),
                    max_steps=1, progress=False, tags=head)


@pytest.mark.parametrize("dp", [False, True])
def test_a_fixed_head_is_never_trained_and_the_fusion_learns_towards_it(tiny_cfg, tiny_splits, tmp_path, dp):
    """``tag_head: fixed`` (FedBABU): the head every hospital builds from the seed stays as it is, under DP
    too (it takes no share of the clipped gradient and gets no noise); only the fusion moves, and the
    tag loss still falls."""
    from medvlm.tags import Tagger

    model = build_medvlm(tiny_cfg.model, seed=0)
    data = tiny_splits["train"]
    head = _head(model, data, "bce", fixed=True)
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    before = model.trainable_state()
    targets = tag_targets(image_tags(data))

    def scored() -> float:
        with torch.no_grad():
            return tag_loss(Tagger(model.fusion, head)(model.encode_images(data.pixels)), targets).mean().item()

    first = scored()
    privacy = PrivacyConfig(target_epsilon=None, noise_multiplier=0.3) if dp else PrivacyConfig(enabled=False)
    result = train_local(model, data, train=replace(TAGS, epochs=5), privacy=privacy, progress=False, tags=head)
    assert all(torch.equal(v, head_before[k]) for k, v in head.state_dict().items())
    assert not any(p.requires_grad for p in head.parameters())
    moved = {k for k in before if not torch.equal(result.state[k], before[k])}
    assert moved and all(k.startswith("fusion.") for k in moved)
    model.load_trainable_state(result.state)
    assert scored() < first
    # a hospital's fixed head is the seeded one in every round: a head file in its state dir is not read
    width = head.proj.in_features
    save_head(TagHead(width), tmp_path)
    again = load_head(tmp_path, width, seed=0, fixed=True)
    assert again.fixed and torch.equal(again.proj.weight, head_before["proj.weight"])


@pytest.mark.parametrize("mode, loss", [("hooks", "bce"), ("functorch", "bce"), ("hooks", "yes-no")])
def test_a_dp_tags_step_equals_a_plain_one_without_noise_or_clipping(tiny_cfg, tiny_splits, mode, loss):
    data = tiny_splits["train"]
    train = replace(TAGS, batch_size=len(data.pixels), physical_batch_size=len(data.pixels), optimizer="sgd", lr=0.5)
    states, heads = [], []
    for privacy in (PrivacyConfig(enabled=False),
                    PrivacyConfig(target_epsilon=None, noise_multiplier=0.0, max_grad_norm=1e9, grad_sample_mode=mode)):
        model = build_medvlm(tiny_cfg.model, seed=0)
        head = _head(model, data, loss)
        states.append(train_local(model, data, train=train, privacy=privacy, max_steps=1, progress=False,
                                  tags=head).state)
        heads.append(head.state_dict())
    for k, v in states[0].items():
        assert torch.allclose(v, states[1][k], rtol=1e-4, atol=1e-6), f"{mode}: {k} differs"
    for k, v in heads[0].items():
        assert torch.allclose(v, heads[1][k], rtol=1e-4, atol=1e-6), f"{mode}: head {k} differs"


def test_a_dp_tags_stage_samples_images_and_its_spending_is_recorded(tiny_cfg, tiny_splits):
    model = build_medvlm(tiny_cfg.model, seed=0)
    data = tiny_splits["train"]
    result = train_local(model, data, train=TAGS, privacy=PrivacyConfig(target_epsilon=None, noise_multiplier=1.0),
                         max_steps=4, progress=False, tags=_head(model, data))
    q, _ = planned_steps(len(data.pixels), TAGS)
    assert result.privacy.sample_rate == pytest.approx(q) and result.privacy.steps == 4
    assert result.accountant_state["history"] == [(1.0, pytest.approx(q), 4)]
    assert 0 < result.privacy.epsilon < float("inf")


@pytest.mark.parametrize("loss, qtypes", [("bce", []), ("yes-no", ["pneumothorax", "device"])])
def test_the_tags_stage_learns_a_finding_the_fusion_did_not_carry(loss, qtypes):
    """Without DP, a few hundred steps on one hospital's images teach the fusion + head to read a
    hospital-only finding (pneumothorax) the random fusion's mean output does not separate. With the
    yes-no loss, the images' own answers are learnt, not only how often each is given."""
    import math

    from medvlm.tags import Tagger

    cfg = load_config("tiny", TINY_OVERRIDES + ["data.images_per_hospital=120", "data.hospital_only=true",
                                                f"data.qtypes=[{','.join(qtypes)}]"])
    from medvlm.build import vision_encoder
    from medvlm.data.dataset import load_splits

    data = load_splits(cfg.data, vision_encoder(cfg.model.vision).preprocess, hospitals=["general"])["train"]
    model = build_medvlm(cfg.model, seed=0)
    head = _head(model, data, loss)
    tags = image_tags(data)
    targets = tag_targets(tags, loss=loss)

    def scored() -> float:
        with torch.no_grad():
            logits = Tagger(model.fusion, head)(model.encode_images(data.pixels))
            return tag_loss(logits, targets, loss).mean().item()

    first = scored()
    train_local(model, data, train=replace(TAGS, epochs=100, batch_size=32, physical_batch_size=32, lr=3e-3),
                privacy=PrivacyConfig(enabled=False), progress=False, tags=head)
    last = scored()
    assert last < 0.5 * first
    if loss == "yes-no":   # below the loss of answering every image by the answers' base rates
        rates = [sum(f"{q}=yes" in t for t in tags) / len(tags) for q in qtypes]
        assert all(0 < p < 1 for p in rates)
        assert last < 0.5 * sum(-p * math.log(p) - (1 - p) * math.log(1 - p) for p in rates)


def test_a_hospital_loads_its_head_for_the_loss_its_stage_names(tmp_path, tiny_splits):
    from types import SimpleNamespace

    from client.app import _tag_head
    from medvlm.config import stages

    cfg = load_config("tiny-consortium-tags", TINY_OVERRIDES)
    model = build_medvlm(cfg.model, seed=0)
    with torch.no_grad():
        tokens = model.encode_images(tiny_splits["train"].pixels[:1])    # what a site trains on: patch tokens
    for stage in stages(cfg)[:1] + [replace(stages(cfg)[0], tag_loss="bce", tag_head="fixed")]:
        site = SimpleNamespace(state_dir=tmp_path, model=model, stage=stage, train=SimpleNamespace(pixels=tokens))
        head = _tag_head(site, cfg)
        assert (head.loss, head.fixed) == (stage.tag_loss, stage.tag_head == "fixed")


def test_a_hospital_s_head_round_trips_and_a_broken_one_is_named(tmp_path):
    torch.manual_seed(1)
    head = TagHead(16)
    save_head(head, tmp_path)
    again = load_head(tmp_path, 16, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values()))
    fresh = load_head(tmp_path / "new", 16, seed=5)
    assert not torch.equal(fresh.proj.weight, head.proj.weight)
    (tmp_path / "tag-head.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="tag-head.safetensors"):
        load_head(tmp_path, 16)


TAG_STAGES = "federation.stages=[{name: tags, rounds: 1, task: tags, tag_loss: yes-no, trainable: [fusion], " \
             "lr: 0.003}, " \
             "{name: vqa, rounds: 1, local_epochs: 1}]"


@pytest.fixture(scope="module")
def tags_run(tmp_path_factory):
    import shlex

    from client import app as client_app
    from server.app import run_federation
    from simulations.inprocess import InProcessGrid

    run_dir = tmp_path_factory.mktemp("tags") / "run"
    overrides = TINY_OVERRIDES + ["data.hospitals=[general,oncology]", "federation.local_epochs=1", TAG_STAGES]
    grid = InProcessGrid({10 + i: {"partition-id": i} for i in range(2)},
                         {"train": client_app.train, "evaluate": client_app.evaluate},
                         {"preset": "tiny", "overrides": shlex.join(overrides)})
    summary = run_federation(grid, load_config("tiny", overrides), run_dir)
    return run_dir, summary, grid


def test_a_federated_tags_stage_keeps_each_head_at_its_hospital_and_sends_the_fusion(tags_run):
    from safetensors.torch import load_file

    from tests.conftest import assert_round_trained_the_fusion_only, wire_arrays

    run_dir, summary, grid = tags_run
    for name in ("general", "oncology"):
        head = load_file(str(run_dir / "hospitals" / name / "tag-head.safetensors"))
        assert head["proj.weight"].shape[0] == TAG_COLUMNS
        for reply in grid.received:                    # no reply carries a tensor of the head's shape
            for arr in wire_arrays(reply.content["arrays"]).values() if "arrays" in reply.content else ():
                assert tuple(arr.shape) != tuple(head["proj.weight"].shape)
    assert_round_trained_the_fusion_only(run_dir, 1)


def test_the_tags_stage_is_charged_per_image_on_the_ledger_and_recomputable(tags_run):
    import json

    from medvlm.privacy import epsilon

    run_dir, summary, _ = tags_run
    cfg = load_config("tiny", TINY_OVERRIDES)
    for name, p in summary["privacy"].items():
        tags, vqa = p["mechanisms"]
        assert (tags["stage"], vqa["stage"]) == ("tags", "vqa")
        # the tags stage samples images (20 per hospital, 80% for training), the VQA stage questions
        assert tags["sample_rate"] > vqa["sample_rate"]
        history = [(m["noise_multiplier"], m["sample_rate"], m["steps"]) for m in p["mechanisms"]]
        assert epsilon(history, delta=p["delta"]) == pytest.approx(p["epsilon"], rel=1e-6)
        assert p["epsilon"] <= cfg.privacy.target_epsilon + 1e-6
        # no single (sigma, q) beside the total steps: that would recompute a wrong epsilon
        assert p["noise_multiplier"] is None and p["sample_rate"] is None
        assert p["steps"] == tags["steps"] + vqa["steps"]
        ledger = json.loads((run_dir / "hospitals" / name / "privacy-ledger.json").read_text())
        assert ledger["rounds"] == [1, 2]
    assert [s["stage"] for s in summary["stages"]] == ["tags", "vqa"]
    card = (run_dir / "global" / "README.md").read_text()
    assert "| tags | 1-1 | tags | fusion |" in card


def test_the_run_summary_prints_each_stage_s_mechanism(tags_run, capsys):
    from cli.federation import print_summary

    summary = tags_run[1]
    print_summary(summary)
    out = " ".join(capsys.readouterr().out.split())
    for name, p in summary["privacy"].items():
        tags, vqa = p["mechanisms"]
        assert f"tags: sigma {tags['noise_multiplier']:.3f}, q {tags['sample_rate']:.4f}, {tags['steps']} DP-SGD steps" in out
        assert f"vqa: sigma {vqa['noise_multiplier']:.3f}" in out


def test_a_head_is_kept_only_once_its_round_is_charged(tmp_path, monkeypatch):
    """A crash between training and charging must not leave a head trained by uncharged steps: every
    later fusion update would carry them."""
    import json
    import shlex

    from client import app as client_app
    from client.ledger import Ledger
    from server.app import run_federation
    from simulations.inprocess import InProcessGrid

    def crash(self, **_):
        raise RuntimeError("power cut while charging the ledger")

    monkeypatch.setattr(Ledger, "record", crash)
    overrides = TINY_OVERRIDES + ["data.hospitals=[general]", "federation.stages=[{name: tags, task: tags, "
                                  "trainable: [fusion]}, {name: vqa}]"]
    grid = InProcessGrid({10: {"partition-id": 0}}, {"train": client_app.train, "evaluate": client_app.evaluate},
                         {"preset": "tiny", "overrides": shlex.join(overrides)})
    run_federation(grid, load_config("tiny", overrides), tmp_path / "run")   # the round fails at the hospital
    state = tmp_path / "run" / "hospitals" / "general"
    assert not (state / "privacy-ledger.json").exists() or not json.loads((state / "privacy-ledger.json").read_text())["rounds"]
    assert not (state / "tag-head.safetensors").exists()
