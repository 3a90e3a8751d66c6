"""Each published format, as small hand-made folders shaped exactly like the releases, read into
manifest rows and checked by `medvlm-fl check-data` (planted faults named by row)."""

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from cli.library import check_data
from medvlm.data.formats import VQA_RAD_JSON, FormatError, detect_format, read_rows, report_text
from medvlm.data.manifest import ManifestError, read_manifest, summarize
from medvlm.data.synthetic import generate_hospital, write_manifest

IMAGES = generate_hospital("general", 4, seed=0).images


def save(path, i=0, fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(IMAGES[i]).convert("RGB").save(path, fmt)


def run_check(path, **kw):
    out = io.StringIO()
    code = check_data(path, out=out, **kw)
    return code, out.getvalue()


# ----------------------------------------------------------------------------- VQA-RAD
def vqa_rad_entry(qid, image, question, answer, answer_type, qtype="PRES", phrase="freeform"):
    return {"qid": qid, "phrase_type": phrase, "qid_linked_id": f"link-{qid}",
            "image_case_url": "https://medpix.nlm.nih.gov/case?id=x", "image_name": image, "image_organ": "CHEST",
            "evaluation": "not evaluated", "question": question, "question_rephrase": "NULL",
            "question_relation": "NULL", "question_frame": "NULL", "question_type": qtype, "answer": answer,
            "answer_type": answer_type}


@pytest.fixture
def vqa_rad(tmp_path):
    root = tmp_path / "vqa-rad"
    save(root / "VQA_RAD Image Folder" / "synpic100.jpg", 0)
    save(root / "VQA_RAD Image Folder" / "synpic200.jpg", 1)
    entries = [
        vqa_rad_entry(0, "synpic100.jpg", "Is there a pleural effusion?", "Yes", "CLOSED"),
        vqa_rad_entry(1, "synpic100.jpg", "How many nodules are seen?", 2, "OPEN ", "COUNT"),   # int answer, stray space
        vqa_rad_entry(2, "synpic200.jpg", "What organ is shown?", "lung", "OPEN", "ORGAN", "test_freeform"),
    ]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(entries, indent=4))
    return root, entries


def test_vqa_rad_rows(vqa_rad):
    root, _ = vqa_rad
    manifest = read_manifest(root)
    assert manifest.format == "vqa-rad" and len(manifest.rows) == 3
    first, count, organ = manifest.rows
    assert first["answer_type"] == "closed" and first["qtype"] == "pres" and first["image"].endswith("synpic100.jpg")
    assert count["answer"] == "2" and count["answer_type"] == "open"
    assert organ["split"] == "test" and first["split"] == "train"
    assert summarize(manifest)["images"] == 2


def test_vqa_rad_planted_faults_are_named_by_entry(vqa_rad):
    root, entries = vqa_rad
    entries += [vqa_rad_entry(3, "synpic999.jpg", "Is this normal?", "No", "CLOSED"),          # missing image
                vqa_rad_entry(4, "synpic200.jpg", "", "No", "CLOSED"),                          # empty question
                vqa_rad_entry(5, "synpic200.jpg", "Is it a CT?", "No", "CLOSED, OPEN")]         # unknown type
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(entries))
    code, out = run_check(root)
    assert code == 1
    assert "VQA_RAD Dataset Public.json[3]: image" in out and "synpic999.jpg not found" in out
    assert "VQA_RAD Dataset Public.json[4]: empty or non-text 'question'" in out
    assert "VQA_RAD Dataset Public.json[5]: answer_type 'closed, open'" in out
    assert "3 error(s)" in out


# ----------------------------------------------------------------------------- SLAKE
def slake_entry(qid, img_id, question, answer, answer_type, lang="en"):
    return {"img_id": img_id, "img_name": f"xmlab{img_id}/source.jpg", "question": question, "answer": answer,
            "q_lang": lang, "location": "Lung", "modality": "CT", "answer_type": answer_type, "base_type": "vqa",
            "content_type": "Position", "triple": ["vhead", "_", "_"], "qid": qid}


@pytest.fixture
def slake(tmp_path):
    root = tmp_path / "Slake1.0"
    for i in range(3):
        save(root / "imgs" / f"xmlab{i}" / "source.jpg", i)
    files = {
        "train.json": [slake_entry(0, 0, "Where is the lesion?", "Left Lung", "OPEN"),
                       slake_entry(1, 0, "病灶在哪里?", "左肺", "OPEN", lang="zh"),
                       slake_entry(2, 1, "Is the lung healthy?", "No", "CLOSED")],
        "validate.json": [slake_entry(3, 2, "Which organ is abnormal?", "Lung", "OPEN")],
        "test.json": [slake_entry(4, 2, "Is there a mass?", "Yes", "CLOSED")],
    }
    for name, entries in files.items():
        (root / name).write_text(json.dumps(entries, ensure_ascii=False))
    return root


def test_slake_as_the_hub_copies_it_validation_json_and_images_folder(slake):
    """SLAKE_en on the Hugging Face Hub renames validate.json to validation.json (its 1,053 validation rows were
    read as nothing: a split drawn from train instead) and some copies keep the pictures in images/."""
    (slake / "validate.json").rename(slake / "validation.json")
    (slake / "imgs").rename(slake / "images")
    manifest = read_manifest(slake)
    assert [r["split"] for r in manifest.rows if r["question"] == "Which organ is abnormal?"] == ["val"]
    assert len(manifest.rows) == 4 and all("/images/xmlab" in r["image"] for r in manifest.rows)


def test_slake_rows_english_by_default(slake):
    manifest = read_manifest(slake)
    assert manifest.format == "slake" and len(manifest.rows) == 4                    # the zh row is left out
    assert {r["split"] for r in manifest.rows} == {"train", "val", "test"}
    assert manifest.rows[0]["modality"] == "CT" and manifest.rows[0]["qtype"] == "position"
    zh = read_manifest(slake, language="zh")
    assert [r["answer"] for r in zh.rows] == ["左肺"]


def test_slake_corrupt_image_and_contradiction_are_named(slake):
    (slake / "imgs" / "xmlab1" / "source.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    entries = json.loads((slake / "test.json").read_text())
    entries.append(slake_entry(5, 2, "Is there a mass?", "No", "CLOSED"))      # contradicts test.json[0]
    entries.append(slake_entry(6, 2, "Is there a mass?", "Yes", "CLOSED"))     # exact repeat: a warning
    (slake / "test.json").write_text(json.dumps(entries))
    code, out = run_check(slake)
    assert code == 1
    assert "train.json[2]: image" in out and "cannot be decoded" in out
    assert "test.json[1]: contradicts test.json[0]" in out
    assert "WARNING test.json[2]: repeats test.json[0]" in out
    with pytest.raises(ManifestError) as info:      # what the ClientApp refuses with: the same lines
        read_manifest(slake)
    assert any(p.startswith("train.json[2]: image") for p in info.value.problems)
    kept = read_manifest(slake, on_bad_row="skip")
    assert len(kept.rows) == 3 and len(kept.problems) == 2 and len(kept.warnings) == 1


# ----------------------------------------------------------------------------- PMC-VQA
PMC_COLUMNS = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]


@pytest.fixture
def pmc_vqa(tmp_path):
    root = tmp_path / "PMC-VQA"
    save(root / "images" / "PMC1_fig1.jpg", 0)
    save(root / "images" / "PMC2_fig3.jpg", 1)
    rows = {"train_2.csv": [["PMC1_fig1.jpg", "What imaging modality was used?", "CT scan", " A:CT scan ",
                             " B:MRI", " C:PET", " D:Ultrasound", "A"],
                            ["PMC2_fig3.jpg", "Which side is the lesion on?", "Left", "A:Right", "B:Left",
                             "C:Both", "D:Neither", "B"]],
            "test_2.csv": [["PMC2_fig3.jpg", "What does the arrow show?", "A cyst", "A:A cyst", "B:A tumour",
                            "C:Fluid", "D:Air", "A"]]}
    for name, lines in rows.items():
        with (root / name).open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(PMC_COLUMNS)
            writer.writerows(lines)
    return root


def test_pmc_vqa_rows(pmc_vqa):
    manifest = read_manifest(pmc_vqa)
    assert manifest.format == "pmc-vqa" and len(manifest.rows) == 3
    first = manifest.rows[0]
    assert first["answer"] == "CT scan" and first["choices"] == ["CT scan", "MRI", "PET", "Ultrasound"]
    assert first["answer_type"] == "open" and manifest.rows[2]["split"] == "test"


def test_pmc_vqa_malformed_rows_are_named_by_line(pmc_vqa):
    with (pmc_vqa / "train_2.csv").open("a", newline="") as fh:
        csv.writer(fh).writerows([["PMC3_fig2.jpg", "Is it normal?", "No", "A:Yes", "B:No", "", "", "B"],   # line 4
                                  ["PMC1_fig1.jpg", "Is it normal?", "", "A:Yes", "B:No", "", "", ""]])   # line 5
    code, out = run_check(pmc_vqa)
    assert code == 1
    assert "train_2.csv:4: image" in out and "PMC3_fig2.jpg not found" in out
    assert "train_2.csv:5: empty or non-text 'answer'" in out


def test_pmc_vqa_missing_columns(tmp_path):
    (tmp_path / "train.csv").write_text("path,q,a\nx.jpg,q,a\n")
    with pytest.raises(FormatError, match="Figure_path"):
        read_rows(tmp_path)


# ----------------------------------------------------------------------------- MIMIC-CXR-style reports
REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old woman with cough.

 FINDINGS:
 There is a small left pleural effusion.  The heart size is normal.
 No pneumothorax.

 IMPRESSION:
 Small left effusion.
"""


@pytest.fixture
def mimic(tmp_path):
    root = tmp_path / "mimic-cxr-jpg"
    study = root / "files" / "p10" / "p10000032" / "s50414267"
    save(study / "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg", 0)
    save(study / "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962.jpg", 1)
    (root / "files" / "p10" / "p10000032" / "s50414267.txt").write_text(REPORT)
    study2 = root / "files" / "p10" / "p10000033" / "s50000001"
    save(study2 / "aaaa.jpg", 2)
    (root / "files" / "p10" / "p10000033" / "s50000001.txt").write_text(" IMPRESSION:\n No acute process.\n")
    with (root / "mimic-cxr-2.0.0-split.csv").open("w") as fh:
        fh.write("dicom_id,study_id,subject_id,split\naaaa,50000001,10000033,test\n")
    return root


def test_mimic_cxr_report_rows(mimic):
    manifest = read_manifest(mimic)
    assert manifest.format == "mimic-cxr" and len(manifest.report_rows) == 3 and not manifest.vqa_rows
    first = manifest.rows[0]
    assert first["report"] == "There is a small left pleural effusion. The heart size is normal. No pneumothorax."
    assert manifest.rows[2]["report"] == "No acute process." and manifest.rows[2]["split"] == "test"
    info = summarize(manifest)
    assert info["report_rows"] == 3 and info["images"] == 3 and info["modalities"] == {"CXR": 3}


def test_mimic_cxr_split_from_the_gzipped_csv_the_jpg_release_ships_or_drawn_without_one(mimic):
    import gzip

    from medvlm.data.dataset import VQARows, published_splits

    split = mimic / "mimic-cxr-2.0.0-split.csv"
    (mimic / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(gzip.compress(split.read_bytes()))
    split.unlink()
    rows = read_manifest(mimic).rows
    assert [r["split"] for r in rows] == ["train", "train", "test"]      # was: every row "train", test empty
    (mimic / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    rows = read_manifest(mimic).rows
    assert len(rows) == 3 and not any("split" in r for r in rows)        # none published: none claimed
    assert published_splits(VQARows(None, rows), val_fraction=0.2, seed=0) is None   # so one is drawn
    (mimic / "mimic-cxr-2.0.0-split.csv.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated")
    with pytest.raises(FormatError, match="mimic-cxr-2.0.0-split.csv.gz: not a readable gzip file"):
        read_manifest(mimic)


def test_mimic_cxr_study_without_report_is_named(mimic):
    save(mimic / "files" / "p11" / "p11000001" / "s59999999" / "bbbb.jpg", 3)
    code, out = run_check(mimic)
    assert code == 1 and "files/p11/p11000001/s59999999: study has 1 image(s) but no report s59999999.txt" in out


def test_report_sections():
    assert report_text("FINDINGS: a.  b.\nIMPRESSION: c.") == "a. b."
    assert report_text("no headers here") == "no headers here"


# ----------------------------------------------------------------------------- the project's JSONL, detection
def test_synthetic_hospital_folders_pass(tmp_path):
    for name in ("general", "oncology", "cardiac"):
        write_manifest(generate_hospital(name, 6, seed=0), tmp_path / name)
        code, out = run_check(tmp_path / name)
        assert code == 0 and "(jsonl format: the project's manifest.jsonl)" in out and "OK; 0 warning(s)" in out
        assert "closed" in out and "answer vocabulary" in out


def test_dicom_manifest_passes(tmp_path):
    write_manifest(generate_hospital("oncology", 3, seed=0), tmp_path, image_format="dicom")
    code, out = run_check(tmp_path)
    assert code == 0 and "'.dcm': 3" in out


def test_detection_and_unknown_folders(tmp_path, vqa_rad, slake, pmc_vqa, mimic):
    assert detect_format(vqa_rad[0]) == "vqa-rad" and detect_format(slake) == "slake"
    assert detect_format(pmc_vqa) == "pmc-vqa" and detect_format(mimic) == "mimic-cxr"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FormatError, match="--format"):
        read_rows(empty)
    with pytest.raises(FormatError, match="not a vqa-rad folder"):   # the wrong format named explicitly
        read_rows(slake, "vqa-rad")
    with pytest.raises(FormatError, match="not a pmc-vqa folder"):
        read_rows(slake, "pmc-vqa")


def test_a_folder_holding_two_layouts_is_refused_naming_both_until_the_format_is_named(slake, vqa_rad, caplog):
    import shutil

    shutil.copy(vqa_rad[0] / VQA_RAD_JSON, slake / VQA_RAD_JSON)        # VQA-RAD's file dropped into SLAKE's folder
    with pytest.raises(FormatError) as info:
        read_rows(slake)
    assert "more than one layout" in str(info.value) and VQA_RAD_JSON in str(info.value)
    assert "train.json" in str(info.value) and "--format" in str(info.value)
    assert read_rows(slake, "slake")[0] == "slake"                   # naming the format reads the one asked for
    from cli.main import main

    assert main(["check-data", str(slake)]) == 2 and "more than one layout" in caplog.text
    assert main(["check-data", str(slake), "--format", "slake"]) == 0


def test_ones_own_manifest_beside_an_images_folder_named_files_is_still_ones_own(tmp_path):
    write_manifest(generate_hospital("oncology", 2, seed=0), tmp_path)
    (tmp_path / "files").mkdir()
    assert detect_format(tmp_path) == "jsonl"


def test_check_data_cli_exit_codes(tmp_path, vqa_rad):
    from cli.main import main

    assert main(["check-data", str(vqa_rad[0])]) == 0
    assert main(["check-data", str(tmp_path / "nowhere")]) == 2


def test_the_client_refuses_a_broken_folder_with_the_same_lines(tmp_path, slake):
    import shlex

    from client.site import build_site
    from tests.conftest import TINY_OVERRIDES

    (slake / "imgs" / "xmlab1" / "source.jpg").unlink()
    _, out = run_check(slake)
    errors = [line.strip().removeprefix("ERROR ") for line in out.splitlines() if line.strip().startswith("ERROR")]
    assert errors and "train.json[2]" in errors[0]
    from client.site import SiteDataError

    with pytest.raises(SiteDataError) as info:       # the coordinator hears how many; the site keeps which
        build_site({"preset": "tiny", "overrides": shlex.join(TINY_OVERRIDES)},
                   {"hospital": "h", "data-path": str(slake), "state-dir": str(tmp_path / "state"), "epsilon": 8.0})
    assert f"({len(errors)} bad row(s))" in str(info.value) and info.value.__cause__.problems == errors


# ----------------------------------------------------------------------------- the releases as downloaded (issue 20)
PMC_V2_COLUMNS = ["index", "Figure_path", "Caption", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
                  "Answer", "split"]


def test_pmc_vqa_v2_letters_become_the_choice_text_and_images_2_figures_is_found(tmp_path):
    root = tmp_path / "PMC-VQA"
    save(root / "images_2" / "figures" / "PMC9_fig2.jpg", 0)
    with (root / "train_2.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(PMC_V2_COLUMNS)
        writer.writerow([0, "PMC9_fig2.jpg", "a caption", "Which modality?", "A:CT", "B:MRI", "C:PET", "D:X-ray",
                         "B", "train"])
        writer.writerow([1, "PMC9_fig2.jpg", "a caption", "Which side?", "A:Left", "B:Right", "C:Both", "",
                         "D", "train"])                                                # names an empty choice
    code, out = run_check(root)
    assert code == 1 and "train_2.csv:3: Answer 'D' names choice D, which is empty" in out
    assert "PMC-VQA v2" in out
    manifest = read_manifest(root, on_bad_row="skip")
    assert [r["answer"] for r in manifest.rows] == ["MRI"]                     # the text, never the letter
    assert manifest.rows[0]["image"].endswith("images_2/figures/PMC9_fig2.jpg")


def test_vqa_rad_in_the_mevf_split_layout(tmp_path):
    root = tmp_path / "data_RAD"
    save(root / "images" / "synpic100.jpg", 0)
    save(root / "images" / "synpic200.jpg", 1)
    (root / "trainset.json").write_text(json.dumps([
        vqa_rad_entry(0, "synpic100.jpg", "Is there a pleural effusion?", "Yes", "CLOSED"),
        vqa_rad_entry(1, "synpic200.jpg", "Is there a pleural effusion?", "No", "CLOSED")]))
    (root / "testset.json").write_text(json.dumps([vqa_rad_entry(2, "synpic200.jpg", "What organ?", "lung", "OPEN")]))
    assert detect_format(root) == "vqa-rad"
    manifest = read_manifest(root)
    assert [r["split"] for r in manifest.rows] == ["train", "train", "test"]
    assert manifest.layout.startswith("VQA-RAD, MEVF")
    code, out = run_check(root)
    assert code == 0 and "MEVF split layout" in out


def test_r2gen_annotation_json_one_row_per_study_on_its_first_view(tmp_path):
    root = tmp_path / "iu_xray"
    for study in ("CXR1_1_IM-0001", "CXR2_1_IM-0002"):
        save(root / "images" / study / "0.png", 0, "PNG")
        save(root / "images" / study / "1.png", 1, "PNG")
    ann = {"train": [{"id": "CXR1_1_IM-0001", "report": "The heart is normal. No effusion.",
                      "image_path": ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png"], "split": "train"}],
           "val": [],
           "test": [{"id": "CXR2_1_IM-0002", "report": "Small left effusion.",
                     "image_path": ["CXR2_1_IM-0002/0.png", "CXR2_1_IM-0002/1.png"], "split": "test"}]}
    (root / "annotation.json").write_text(json.dumps(ann))
    assert detect_format(root) == "r2gen"
    manifest = read_manifest(root)
    assert len(manifest.report_rows) == 2 and manifest.rows[0]["image"].endswith("CXR1_1_IM-0001/0.png")
    assert manifest.rows[1]["split"] == "test" and manifest.rows[1]["report"] == "Small left effusion."
    assert manifest.left_out == {"another view of a study (its first view is used)": 2}
    code, out = run_check(root)
    assert code == 0 and "left out: 2 row(s): another view" in out
    ann["test"][0]["image_path"] = "CXR2_1_IM-0002/0.png"          # one view written without its list: read
    ann["train"][0]["image_path"] = 7                                 # not paths at all: that study's problem
    (root / "annotation.json").write_text(json.dumps(ann))
    manifest = read_manifest(root, on_bad_row="skip")
    assert [r["image"].endswith("CXR2_1_IM-0002/0.png") for r in manifest.rows] == [True]   # was: image "C"
    assert manifest.problems == ["annotation.json[train][0]: image_path is a int: give a list of image paths"]
    ann["val"] = 0.5                                                  # a split that is not a list (was TypeError)
    (root / "annotation.json").write_text(json.dumps(ann))
    with pytest.raises(FormatError, match='annotation.json: "val" is a float; R2Gen\'s splits are lists'):
        read_manifest(root)


def test_an_image_path_the_file_system_cannot_look_up_is_a_bad_row(tmp_path):
    write_manifest(generate_hospital("general", 2, seed=0), tmp_path)
    manifest = tmp_path / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[0]["image"] = "is there a pleural effusion on the left? " * 10     # a shifted column: 410 characters
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = read_manifest(tmp_path, on_bad_row="skip")                       # was: OSError, File name too long
    assert len(kept.problems) == 1 and "cannot be looked up (File name too long): is the data file's image column" \
        in kept.problems[0] and len(kept.rows) == len(rows) - 1


def test_nothing_is_dropped_silently_and_the_site_decides_on_bad_rows(slake):
    entries = json.loads((slake / "train.json").read_text())
    entries.append(slake_entry(7, 1, "What is shown?", "", "OPEN"))                   # SLAKE 1.0's empty answer
    (slake / "train.json").write_text(json.dumps(entries, ensure_ascii=False))
    code, out = run_check(slake)
    assert code == 1 and "train.json[3]: empty or non-text 'answer'" in out and "--on-bad-row skip" in out
    assert "left out: 1 row(s): question in 'zh' (data.language=en)" in out
    code, out = run_check(slake, on_bad_row="skip")
    assert code == 0 and "SKIPPED train.json[3]" in out and "1 bad row(s) skipped" in out
    assert "WARNING split 'test' has only 1 row(s)" in out
    manifest = read_manifest(slake, on_bad_row="skip")
    assert manifest.left_out["question in 'zh' (data.language=en)"] == 1


def test_a_release_one_folder_down_is_pointed_at(tmp_path, slake):
    with pytest.raises(FormatError, match="one level down, in 'Slake1.0'"):
        detect_format(slake.parent)


def test_contradictions_read_the_right_way_round(slake):
    entries = json.loads((slake / "test.json").read_text())
    entries.append(slake_entry(5, 2, "Is there a mass?", "No", "CLOSED"))
    (slake / "test.json").write_text(json.dumps(entries))
    manifest = read_manifest(slake, on_bad_row="skip")
    assert any("test.json[1]: contradicts test.json[0]" in p and "answer 'no' here but 'yes' at test.json[0]" in p
               for p in manifest.problems)


def test_the_published_splits_are_kept(slake):
    from medvlm.config import DataConfig
    from medvlm.data.dataset import load_splits

    preprocess = lambda im: __import__("torch").zeros(3, 8, 8)   # noqa: E731 (no encoder needed)
    splits = load_splits(DataConfig(source=str(slake)), preprocess)
    assert {k: len(v) for k, v in splits.items()} == {"train": 2, "val": 1, "test": 1}
    assert [r["question"] for r in splits["val"].rows] == ["Which organ is abnormal?"]
    redrawn = load_splits(DataConfig(source=str(slake), split_source="redraw", val_fraction=0.0, test_fraction=0.0),
                          preprocess)
    assert len(redrawn["train"]) == 4


def test_a_missing_image_is_one_problem_naming_the_rows_that_use_it(vqa_rad):
    root, entries = vqa_rad
    entries += [vqa_rad_entry(3 + i, "synpic999.jpg", f"Question {i}?", "No", "CLOSED") for i in range(4)]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(entries))
    manifest = read_manifest(root, on_bad_row="skip")
    assert len(manifest.problems) == 1
    assert "[3]: image" in manifest.problems[0] and "also used by 3 more row(s)" in manifest.problems[0]
    assert manifest.left_out["bad row, skipped (on_bad_row=skip)"] == 4 and len(manifest.rows) == 3


def test_a_question_type_a_site_s_data_lacks_is_said_with_the_types_it_has(vqa_rad, caplog):
    """data.qtypes names types of a site's own data: one that no row has is said (it was trained on silently
    as nothing), with the types the rows do have."""
    from medvlm.build import build_medvlm
    from medvlm.config import DataConfig, load_config
    from medvlm.data.dataset import from_manifest
    from tests.conftest import TINY_OVERRIDES

    preprocess = build_medvlm(load_config("tiny", TINY_OVERRIDES).model, seed=0).vision.preprocess
    root, _ = vqa_rad
    with caplog.at_level("WARNING"):
        data = from_manifest(str(root), preprocess, cfg=DataConfig(source=str(root), qtypes=["pres", "presence"]))
    assert {r["qtype"] for r in data.rows} == {"pres"}
    assert "no question of type 'presence' here (the types here: count, organ, pres)" in caplog.text


BOM = b"\xef\xbb\xbf"


def test_a_byte_order_mark_is_read_past_in_every_text_format(tmp_path, vqa_rad, pmc_vqa):
    # Excel and Windows editors start UTF-8 files with a byte-order mark: it is not part of the first column's
    # name, the first manifest row or the JSON
    root, _ = vqa_rad
    json_file = root / "VQA_RAD Dataset Public.json"
    json_file.write_bytes(BOM + json_file.read_bytes())
    assert len(read_manifest(root).rows) == 3
    csv_file = pmc_vqa / "train_2.csv"
    csv_file.write_bytes(BOM + csv_file.read_bytes().replace(b"\n", b"\r\n"))
    assert len(read_manifest(pmc_vqa).rows) == 3
    write_manifest(generate_hospital("general", 3, seed=0), tmp_path / "site")
    manifest = tmp_path / "site" / "manifest.jsonl"
    manifest.write_bytes(BOM + manifest.read_bytes())
    assert len(read_manifest(tmp_path / "site").rows) == len(read_manifest(tmp_path / "site", on_bad_row="skip").rows)
    assert run_check(tmp_path / "site")[0] == 0


def test_bytes_that_are_not_utf8_are_named_by_file_line_and_column(tmp_path, pmc_vqa):
    write_manifest(generate_hospital("general", 3, seed=0), tmp_path / "site")
    manifest = tmp_path / "site" / "manifest.jsonl"
    lines = manifest.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"question": "', b'"question": "caf\xe9 ', 1)     # Latin-1, as a Windows export
    manifest.write_bytes(b"".join(lines))
    kept = read_manifest(tmp_path / "site", on_bad_row="skip")      # one bad line is that line's problem
    assert len(kept.rows) == len(lines) - 1
    assert any(p.startswith("manifest.jsonl:2: not UTF-8 text (byte 0xe9 at column") and "save the file as UTF-8"
               in p for p in kept.problems)
    csv_file = pmc_vqa / "train_2.csv"
    csv_file.write_bytes(csv_file.read_bytes().replace(b"Which side", b"Quel c\xf4t\xe9"))
    with pytest.raises(FormatError, match=r"train_2.csv:3: not UTF-8 text \(byte 0xf4 at column 21\)"):
        read_rows(pmc_vqa)


def test_a_windows_image_path_or_a_name_in_another_case_is_named_with_the_fix(tmp_path):
    write_manifest(generate_hospital("general", 2, seed=0), tmp_path)
    manifest = tmp_path / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert "/" in rows[0]["image"]
    rows[0]["image"] = rows[0]["image"].replace("/", "\\")
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = read_manifest(tmp_path, on_bad_row="skip")
    problem = kept.problems[0]
    assert problem.startswith("manifest.jsonl:1: image") and "not found (a Windows path: write its" in problem
    rows[0]["image"] = rows[0]["image"].replace("\\", "/").replace(".png", ".PNG")   # copied from a Windows disk
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problem = read_manifest(tmp_path, on_bad_row="skip").problems[0]
    assert "00000.PNG not found (the folder has '00000.png': names differ in case" in problem
    rows[0]["image"] = "elsewhere/00000.PNG"                             # no such folder: no hint, no crash
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_manifest(tmp_path, on_bad_row="skip").problems[0].endswith("00000.PNG not found")


def test_rows_that_name_a_patient_are_split_whole_patients_at_a_time(tmp_path, mimic):
    """A patient's images stay in one split (views of one study share a report, follow-ups share a
    chest); rows naming no patient split by image exactly as before."""
    import torch

    from medvlm.config import DataConfig
    from medvlm.data.dataset import VQARows, load_splits, split_rows
    from medvlm.data.synthetic import split_images

    rows = [{"image_index": i, "question": "q?", "answer": "no", "answer_type": "closed",
             "patient": f"p{i // 4}"} for i in range(200)]                   # 50 patients, 4 images each
    data = VQARows(torch.zeros(200, 1, 1, 1), rows)
    parts = split_rows(data, val_fraction=0.2, test_fraction=0.2, seed=3)
    held = {name: {r["patient"] for r in part.rows} for name, part in parts.items()}
    assert not held["train"] & held["test"] and not held["train"] & held["val"] and not held["val"] & held["test"]
    assert sum(len(p) for p in held.values()) == 50 and len(held["test"]) == len(held["val"]) == 10
    plain = [{k: v for k, v in r.items() if k != "patient"} for r in rows]
    by_image = split_rows(VQARows(torch.arange(200.0).view(200, 1, 1, 1), plain), val_fraction=0.2,
                          test_fraction=0.2, seed=3)
    expected = split_images(200, val_fraction=0.2, test_fraction=0.2, seed=3)
    assert {k: v.pixels.flatten().long().tolist() for k, v in by_image.items()} == expected   # unchanged

    (mimic / "mimic-cxr-2.0.0-split.csv").unlink()                       # no published split: one is drawn
    assert [r["patient"] for r in read_manifest(mimic).rows] == ["p10000032", "p10000032", "p10000033"]
    splits = load_splits(DataConfig(source=str(mimic), task="report", val_fraction=0.4, test_fraction=0.4),
                         lambda im: torch.zeros(3, 8, 8))
    where = {}
    for name, part in splits.items():
        for r in part.rows:
            where.setdefault(r["patient"], set()).add(name)
    assert where.keys() == {"p10000032", "p10000033"} and all(len(w) == 1 for w in where.values())
    assert sorted(len(v.pixels) for v in splits.values()) == [0, 1, 2]   # p10000032's two views together


def test_check_data_counts_patients_and_warns_of_one_in_two_splits(mimic):
    code, out = run_check(mimic)
    assert code == 0 and "on 3 images {'.jpg': 3} of 2 patients" in out and "more than one split" not in out
    split = mimic / "mimic-cxr-2.0.0-split.csv"                         # one view of p10000032 moved to test
    split.write_text(split.read_text() + "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,50414267,10000032,test\n")
    code, out = run_check(mimic)
    assert code == 0 and "WARNING 1 patient(s) have rows in more than one split (e.g. p10000032)" in out


# ----------------------------------------------------------------------------- Hugging Face parquet
def png_bytes(i):
    buf = io.BytesIO()
    Image.fromarray(IMAGES[i]).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def write_parquet(path, rows):
    """A dataset as the Hub stores it: the Image feature is a struct of the file's bytes and its name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": pa.array([r[0] for r in rows], type=image),
                             "question": [r[1] for r in rows], "answer": [r[2] for r in rows]}), path)


def test_a_hugging_face_parquet_dataset_is_read_with_its_splits_and_its_images_written_once(tmp_path, monkeypatch):
    """flaviagiammarino/vqa-rad as the Hub serves it (data/train-00000-of-00001.parquet, data/test-…): the
    images live inside the files; each distinct picture is written once under the cache, named by its content;
    the split comes from the file's name; yes/no answers are closed questions."""
    monkeypatch.setenv("MEDVLM_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "vqa-rad"
    chest = {"bytes": png_bytes(0), "path": "synpic100.jpg"}          # the Hub keeps the original name
    write_parquet(root / "data" / "train-00000-of-00001.parquet", [
        (chest, "is there a pleural effusion?", "yes"), (chest, "what organ is shown?", "lung"),
        ({"bytes": png_bytes(1), "path": None}, "is the heart enlarged?", "No"),
        (None, "is this an mri?", "no")])                             # a row without its image
    write_parquet(root / "data" / "test-00000-of-00001.parquet", [(chest, "how many nodules?", "2")])
    assert detect_format(root) == "parquet"
    code, out = run_check(root)
    assert code == 1 and "train-00000-of-00001.parquet[3]: no image in the row" in out and "Hugging Face" in out
    manifest = read_manifest(root, on_bad_row="skip")
    rows = {r["question"]: r for r in manifest.rows}
    assert {(q, r["answer_type"], r["split"]) for q, r in rows.items()} == {
        ("is there a pleural effusion?", "closed", "train"), ("what organ is shown?", "open", "train"),
        ("is the heart enlarged?", "closed", "train"), ("how many nodules?", "open", "test")}
    extracted = sorted((tmp_path / "cache" / "extracted-images").iterdir())
    assert len(extracted) == 2 and {p.suffix for p in extracted} == {".jpg", ".png"}   # one file per picture
    assert rows["is there a pleural effusion?"]["image"] == rows["how many nodules?"]["image"]
    from medvlm.data.images import load_image

    heart = np.asarray(load_image(rows["is the heart enlarged?"]["image"]).convert("L"))
    assert np.array_equal(heart, IMAGES[1])
    before = {p: p.stat().st_mtime_ns for p in extracted}
    read_manifest(root, on_bad_row="skip")                            # read again: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in extracted} == before


def test_the_hubs_parquet_conversion_layout_and_a_parquet_that_is_not_vqa_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVLM_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "path-vqa"
    write_parquet(root / "default" / "validation" / "0000.parquet", [({"bytes": png_bytes(2), "path": "a.png"},
                                                                      "is this tissue?", "yes")])
    assert detect_format(root) == "parquet"
    assert read_manifest(root).rows[0]["split"] == "val"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [7], "question": ["q?"], "answer": ["yes"]}), tmp_path / "ids.parquet")
    assert read_rows(tmp_path / "ids.parquet")[1][0].problem == ("its image cell holds int data, not an image's "
                                                                 "bytes or path")      # not 7 zero bytes
    pq.write_table(pa.table({"images": [b"x"], "texts": ["q"]}), tmp_path / "finevision.parquet")
    with pytest.raises(FormatError, match=r"finevision.parquet: no image, question, answer column \(it has"):
        read_rows(tmp_path / "finevision.parquet")
    (tmp_path / "cut.parquet").write_bytes((root / "default" / "validation" / "0000.parquet").read_bytes()[:200])
    with pytest.raises(FormatError, match="cut.parquet: not a readable parquet file"):
        read_rows(tmp_path / "cut.parquet")


def test_a_pickled_release_is_refused_saying_why_and_where_a_readable_copy_is(tmp_path):
    """PathVQA ships its questions as pickles (qas/train/train_qa.pkl): reading one would run whatever code it
    holds, so it is refused with the Hub's parquet copy named, not 'no manifest.jsonl here'."""
    (tmp_path / "pvqa" / "qas" / "train").mkdir(parents=True)
    (tmp_path / "pvqa" / "qas" / "train" / "train_qa.pkl").write_bytes(b"\x80\x04N.")
    for target in (tmp_path / "pvqa", tmp_path / "pvqa" / "qas" / "train" / "train_qa.pkl"):
        with pytest.raises(FormatError, match="train_qa.pkl: a pickle file is not read.*path-vqa"):
            read_rows(target)


# ----------------------------------------------------------------------------- ImageCLEF VQA-Med
@pytest.fixture
def vqa_med(tmp_path):
    """VQA-Med 2019 as downloaded: one folder per split, QA pairs beside their images folder."""
    root = tmp_path / "VQA-Med-2019"
    train = root / "ImageClef-2019-VQA-Med-Training"
    for i, image in enumerate(("synpic100", "synpic200")):
        save(train / "Train_images" / f"{image}.jpg", i)
    (train / "All_QA_Pairs_train.txt").write_text(
        "synpic100|what modality is shown?|xr - plain film\n"
        "synpic100|is \tthis a t1 weighted image?|no\n"            # the release's stray tab
        "synpic200|what is abnormal in the ct scan?|meningioma\n"
        "\n"
        "synpic200|what organ?\n")                                   # a field short: a bad row, named by line
    (train / "QAPairsByCategory").mkdir()
    (train / "QAPairsByCategory" / "C1_Modality_train.txt").write_text(
        "synpic100|what modality is shown?|xr - plain film\nsynpic100|is \tthis a t1 weighted image?|no\n")
    (train / "QAPairsByCategory" / "C4_Abnormality_train.txt").write_text(
        "synpic200|what is abnormal in the ct scan?|meningioma\n")
    val = root / "ImageClef-2019-VQA-Med-Validation"
    save(val / "Val_images" / "synpic300.jpg", 2)
    (val / "All_QA_Pairs_val.txt").write_text("synpic300|in which plane is the mri displayed?|axial\n")
    test = root / "VQAMed2019Test"
    save(test / "VQAMed2019_Test_Images" / "synpic400.jpg", 3)
    (test / "VQAMed2019_Test_Questions.txt").write_text("synpic400|what is the primary abnormality in this image?\n")
    (test / "VQAMed2019_Test_Questions_w_Ref_Answers.txt").write_text(
        "synpic400|abnormality|what is the primary abnormality in this image?|anaplastic oligodendroglioma#cystic "
        "mass\n")
    return root


def test_vqa_med_as_downloaded_every_split_its_categories_and_a_short_line_named(vqa_med):
    assert detect_format(vqa_med) == "vqa-med"
    with pytest.raises(ManifestError, match=r"All_QA_Pairs_train\.txt:5: 2 field\(s\) where VQA-Med has "
                                            r"image-id\|question\|answer"):
        read_manifest(vqa_med)
    manifest = read_manifest(vqa_med, on_bad_row="skip")
    rows = {(r["split"], r["question"]): r for r in manifest.rows}
    assert len(rows) == 5 and {r["split"] for r in manifest.rows} == {"train", "val", "test"}
    modality = rows[("train", "what modality is shown?")]
    assert modality["image"].endswith("Train_images/synpic100.jpg") and modality["answer_type"] == "open"
    assert modality["qtype"] == "modality"                          # from QAPairsByCategory/C1_Modality_train.txt
    t1 = rows[("train", "is this a t1 weighted image?")]          # the tab read as a space, still categorised
    assert t1["answer_type"] == "closed" and t1["qtype"] == "modality"
    assert rows[("train", "what is abnormal in the ct scan?")]["qtype"] == "abnormality"
    assert rows[("val", "in which plane is the mri displayed?")]["image"].endswith("Val_images/synpic300.jpg")
    test = rows[("test", "what is the primary abnormality in this image?")]
    assert test["qtype"] == "abnormality" and test["answer"] == "anaplastic oligodendroglioma"   # first of a#b
    assert test["alternatives"] == ["cystic mass"] and "alternatives" not in modality
    from medvlm.metrics import vqa_counts                             # any of a#b scores, as VQA-Med's evaluation
    assert [vqa_counts([said], [test])["open_correct"] for said in ("Cystic mass", "mass", "anaplastic "
                                                                    "oligodendroglioma")] == [1.0, 0.0, 1.0]
    assert test["image"].endswith("VQAMed2019_Test_Images/synpic400.jpg")
    code, text = run_check(vqa_med / "ImageClef-2019-VQA-Med-Validation" / "All_QA_Pairs_val.txt")
    assert code == 0 and "1 question" in text                       # one file, read on its own
    assert "WARNING split 'val' has only 1 row(s)" in text and "OK; 1 warning(s)" in text   # counted as said
    _, text = run_check(vqa_med, on_bad_row="skip")
    assert "question types (data.qtypes) {'modality': 2, 'abnormality': 2}" in text   # what data.qtypes can name


def test_vqa_med_test_images_still_zipped_are_named(vqa_med):
    test = vqa_med / "VQAMed2019Test"
    for image in (test / "VQAMed2019_Test_Images").iterdir():
        image.unlink()
    (test / "VQAMed2019_Test_Images").rmdir()
    (test / "VQAMed2019_Test_Images.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    with pytest.raises(FormatError, match=r"VQAMed2019_Test_Questions_w_Ref_Answers\.txt: its images are still "
                                          r"zipped \(VQAMed2019_Test_Images\.zip beside it\): unzip it there"):
        read_rows(vqa_med)


def test_vqa_med_2020_train_and_validation_sets_as_downloaded(tmp_path):
    root = tmp_path / "VQA-Med-2020-Task1-VQAnswering-TrainVal-Sets"
    for folder, split, image in (("VQAMed2020-VQAnswering-TrainingSet", "Train", "synpic1"),
                                 ("VQAMed2020-VQAnswering-ValidationSet", "Val", "synpic2")):
        save(root / folder / f"VQAnswering_2020_{split}_images" / f"{image}.jpg")
        name = "VQAnswering_2020_Train_QA_pairs.txt" if split == "Train" else "VQAnswering_2020_Val_QA_Pairs.txt"
        (root / folder / name).write_text(f"{image}|what abnormality is seen in the image?|meningioma\n")
    manifest = read_manifest(root)
    assert manifest.format == "vqa-med"
    assert {r["split"]: r["image"].split("/")[-2] for r in manifest.rows} == {
        "train": "VQAnswering_2020_Train_images", "val": "VQAnswering_2020_Val_images"}


def test_a_hugging_face_report_dataset_reads_as_report_rows(tmp_path, monkeypatch):
    """ROCO's Hub copies (image, image_id, caption) and MIMIC-CXR's (image, findings, impression): one report row
    per image, the findings first and the impression when a study has none; an empty report is a bad row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("MEDVLM_CACHE", str(tmp_path / "cache"))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": png_bytes(i), "path": f"{i}.png"} for i in range(3)]
    roco = tmp_path / "roco" / "data"
    roco.mkdir(parents=True)
    pq.write_table(pa.table({"image": pa.array(cells[:2], type=image), "image_id": ["ROCO_1", "ROCO_2"],
                             "caption": [" CT of the chest showing a  right pleural effusion. ", ""]}),
                   roco / "validation-00000-of-00001.parquet")
    rows = read_rows(tmp_path / "roco")[1]
    assert rows[0].row == {"image": rows[0].row["image"], "report": "CT of the chest showing a right pleural effusion.",
                           "split": "val"}
    assert rows[1].problem == "no report in the row (its caption cell is empty)"
    mimic = tmp_path / "mimic.parquet"
    pq.write_table(pa.table({"image": pa.array(cells, type=image), "findings": ["No effusion.", None, "  "],
                             "impression": ["Normal.", "Small left effusion.", None]}), mimic)
    rows = read_rows(mimic)[1]
    assert [r.row and r.row["report"] for r in rows[:2]] == ["No effusion.", "Small left effusion."]
    assert rows[2].problem == "no report in the row (its findings / impression cell is empty)"
    manifest = read_manifest(mimic, on_bad_row="skip")
    assert len(manifest.report_rows) == 2 and not manifest.vqa_rows


def test_vqa_med_2021_validation_and_a_test_whose_answers_are_in_their_own_file(tmp_path):
    """2021's validation set (image-id|question|answer) and the 2020 / 2021 tests: image-id|question in
    *Questions.txt, image-id|answer in *ReferenceAnswers.txt, joined by image."""
    root = tmp_path / "VQA-Med-2021"
    val = root / "VQA-Med-2021-Tasks-1-2-NewValidationSets"
    save(val / "ImageCLEF-2021-VQA-Med-New-Validation-Images" / "synpic1.jpg")
    (val / "VQA-Med-2021-VQAnswering-Task1-New-ValidationSet.txt").write_text(
        "synpic1|what abnormality is seen in the image?|pulmonary embolus\n")
    test = root / "Task1-VQA-2021-TestSet-w-GroundTruth"
    save(test / "VQA-Med-2021-Test-Images" / "synpic2.jpg", 1)
    save(test / "VQA-Med-2021-Test-Images" / "synpic3.jpg", 2)
    (test / "Task1-VQA-2021-TestSet-Questions.txt").write_text(
        "synpic2|what is most alarming about this ct scan?\nsynpic3|what is the primary abnormality?\n")
    (test / "Task1-VQA-2021-TestSet-ReferenceAnswers.txt").write_text(
        "synpic2|appendicitis#acute appendicitis\nsynpic3|meningioma\nsynpic9|osteoma\n")
    with pytest.raises(ManifestError, match=r"ReferenceAnswers\.txt:3: image 'synpic9' has no question in "
                                            r"Task1-VQA-2021-TestSet-Questions\.txt"):
        read_manifest(root)
    rows = {r["question"]: r for r in read_manifest(root, on_bad_row="skip").rows}
    assert rows["what abnormality is seen in the image?"]["split"] == "val"
    alarming = rows["what is most alarming about this ct scan?"]
    assert (alarming["split"], alarming["answer"], alarming["alternatives"]) == ("test", "appendicitis",
                                                                                ["acute appendicitis"])
    assert alarming["image"].endswith("VQA-Med-2021-Test-Images/synpic2.jpg")
    (test / "Task1-VQA-2021-TestSet-Questions.txt").unlink()
    with pytest.raises(FormatError, match=r"reference answers without their questions "
                                          r"\(Task1-VQA-2021-TestSet-Questions\.txt beside them\)"):
        read_rows(root)
