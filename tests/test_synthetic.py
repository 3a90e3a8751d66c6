import json

import numpy as np
import pytest

from medvlm.data.synthetic import IMAGE_SIZE, PROFILES, generate_hospital, split_images, write_manifest


def test_deterministic():
    a, b = generate_hospital("general", 12, seed=3), generate_hospital("general", 12, seed=3)
    assert np.array_equal(a.images, b.images) and a.rows == b.rows
    c = generate_hospital("general", 12, seed=4)
    assert not np.array_equal(a.images, c.images)


def test_public_corpus_is_disjoint_from_hospitals():
    streams = [p.stream for p in PROFILES.values()]
    assert len(set(streams)) == len(streams)
    pub, gen = generate_hospital("public", 5, seed=0), generate_hospital("general", 5, seed=0)
    assert not np.array_equal(pub.images, gen.images)


def test_profiles_are_non_iid():
    onc, card = generate_hospital("oncology", 300, seed=0), generate_hospital("cardiac", 300, seed=0)
    nod = lambda ds: np.mean([f.nodules > 0 for f in ds.findings])  # noqa: E731
    cm = lambda ds: np.mean([f.cardiomegaly for f in ds.findings])  # noqa: E731
    ct = lambda ds: np.mean([f.modality == "ct" for f in ds.findings])  # noqa: E731
    assert nod(onc) > nod(card) + 0.3
    assert cm(card) > cm(onc) + 0.3
    assert ct(onc) > ct(card) + 0.3


def test_findings_are_visible_in_pixels():
    """Enlarged hearts cover more bright pixels than normal ones (same modality, no inversion)."""
    ds = generate_hospital("general", 300, seed=1)
    bright = lambda i: float((ds.images[i].astype(float) > 170).mean())  # noqa: E731
    xr = [i for i, f in enumerate(ds.findings) if f.modality == "x-ray" and f.effusion == "none" and not f.nodules]
    big = [bright(i) for i in xr if ds.findings[i].cardiomegaly]
    small = [bright(i) for i in xr if not ds.findings[i].cardiomegaly]
    assert big and small and np.mean(big) > np.mean(small) * 1.5


def test_questions_match_findings():
    ds = generate_hospital("oncology", 40, seed=0)
    for r in ds.rows:
        f = ds.findings[r["image_index"]]
        if r["qtype"] == "count":
            assert r["answer"] == str(f.nodules)
        if r["qtype"] == "effusion":
            assert r["answer"] == ("yes" if f.effusion != "none" else "no")
        assert r["answer_type"] in ("closed", "open")
        assert r["report"]


def test_split_by_image_has_no_overlap():
    parts = split_images(100, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert sum(len(v) for v in parts.values()) == 100
    assert not set(parts["train"]) & set(parts["test"])


def test_write_manifest(tmp_path):
    ds = generate_hospital("rural", 4, seed=0)
    path = write_manifest(ds, tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(ds.rows)
    assert all((tmp_path / r["image"]).is_file() for r in rows)
    assert {"image", "question", "answer", "answer_type", "report"} <= set(rows[0])


def test_unknown_profile():
    with pytest.raises(ValueError, match="unknown hospital profile"):
        generate_hospital("mars", 2)


def test_hospital_only_findings_exist_only_at_hospitals_and_only_when_asked():
    from medvlm.data.synthetic import HOSPITAL_ONLY_QTYPES, public_corpus_text

    plain, extended = generate_hospital("general", 60, seed=2), generate_hospital("general", 60, seed=2,
                                                                                  hospital_only=True)
    assert not {r["qtype"] for r in plain.rows} & set(HOSPITAL_ONLY_QTYPES)          # off: data as before
    assert all(f.pneumothorax == "none" and not f.device for f in plain.findings)
    assert set(HOSPITAL_ONLY_QTYPES) <= {r["qtype"] for r in extended.rows}
    public = generate_hospital("public", 300, seed=0, hospital_only=True)            # the public corpus: never
    assert all(f.pneumothorax == "none" and not f.device for f in public.findings)
    assert np.array_equal(public.images, generate_hospital("public", 300, seed=0).images)
    text = " ".join(public_corpus_text(public.findings))
    assert "pneumothorax" not in text and "pacemaker" not in text
    for r in extended.rows:                                                         # answers follow the findings
        f = extended.findings[r["image_index"]]
        if r["qtype"] == "pneumothorax":
            assert r["answer"] == ("yes" if f.pneumothorax != "none" else "no")
        if r["qtype"] == "device":
            assert r["answer"] == ("yes" if f.device else "no") and ("pacemaker" in r["report"]) == f.device


def test_no_hospital_holds_most_of_the_hospital_only_cases():
    sites = {h: generate_hospital(h, 400, seed=0, hospital_only=True) for h in ("general", "oncology", "cardiac")}
    cases = {h: sum((f.pneumothorax != "none") + f.device for f in d.findings) for h, d in sites.items()}
    assert all(n < 0.5 * sum(cases.values()) for n in cases.values()), cases
    assert not any(f.device for f in sites["oncology"].findings)                    # one site has none of one
    saturated = lambda d, pick: np.mean([(d.images[i] >= 250).sum() for i, f in enumerate(d.findings)  # noqa: E731
                                         if pick(f) and f.modality == "x-ray"])
    general = sites["general"]                                                       # never stored inverted
    assert saturated(general, lambda f: f.device) > saturated(general, lambda f: not f.device) + 15   # metal shows


def test_a_collapsed_lung_never_hides_a_nodule_or_fluid_the_labels_name():
    """The hospital-only findings are drawn under the nodules and the fluid: a nodule in the lung with the
    pneumothorax shows as nodule-bright pixels there, fluid as fluid-bright ones (both were erased before)."""
    ds = generate_hospital("general", 1200, seed=0, hospital_only=True)             # x-ray mostly, never inverted
    half = IMAGE_SIZE // 2                                                           # patient's right: image left
    side_half = lambda i, side: ds.images[i][:, :half] if side == "right" else ds.images[i][:, half:]  # noqa: E731
    ptx = [i for i, f in enumerate(ds.findings) if f.modality == "x-ray" and f.pneumothorax != "none"
           and not f.device]
    nodule_px = lambda pick: np.mean([(side_half(i, ds.findings[i].pneumothorax) >= 235).sum()  # noqa: E731
                                      for i in ptx if pick(ds.findings[i])])
    assert nodule_px(lambda f: f.nodules and f.nodule_side == f.pneumothorax) > nodule_px(lambda f: not f.nodules) + 20
    lower = lambda i: side_half(i, ds.findings[i].pneumothorax)[IMAGE_SIZE * 5 // 8:]  # the base  # noqa: E731
    fluid_px = lambda pick: np.mean([((lower(i) >= 190) & (lower(i) < 235)).sum()  # noqa: E731
                                     for i in ptx if pick(ds.findings[i]) and not ds.findings[i].cardiomegaly])
    assert fluid_px(lambda f: f.effusion == f.pneumothorax) > fluid_px(lambda f: f.effusion == "none") + 40


def test_the_question_types_config_may_name_are_exactly_those_the_hospitals_are_asked():
    """medvlm.data.synthetic.QTYPES is what data.qtypes and a stage's qtypes are checked against: it must
    hold every type the generator asks (a type missing from it would be refused) and nothing else."""
    from medvlm.data.synthetic import QTYPES

    asked = {r["qtype"] for name in ("general", "oncology", "cardiac")
             for r in generate_hospital(name, 60, seed=0, hospital_only=True).rows}
    assert asked == set(QTYPES) and len(QTYPES) == len(set(QTYPES))
