"""The published Med-VQA / report formats, each normalised into the project's manifest rows.

A reader turns a data folder (or file) into :class:`RawRow` s: where the row came from (``file:line``
or ``file[index]``, what a person opens to fix it) and the row in manifest vocabulary:

    image        absolute path of the image file (PNG, JPEG or DICOM)
    question     } VQA rows
    answer       }
    answer_type  } closed | open
    report       report rows (report generation): the findings text
    qtype, modality, organ, split, choices, patient   optional, kept when the format has them

Validation (missing files, unreadable images, empty fields, duplicates) is one pass for every
format, in :mod:`medvlm.data.manifest`. Layouts recognised by ``detect_format``:

    jsonl      manifest.jsonl (or any .jsonl): the project's own rows, image paths relative to it
    vqa-rad    "VQA_RAD Dataset Public.json" + "VQA_RAD Image Folder/" (OSF release), or the MEVF
               split layout most Med-VQA code ships: trainset.json / testset.json + images/
    slake      train.json, validate.json, test.json + imgs/ (Slake1.0); rows in data.language
    pmc-vqa    train_2.csv/test_2.csv (v2: Answer is the choice letter, mapped to that choice's text)
               or train.csv/test.csv (v1), images in images_2/figures/, images/ or figures/
    r2gen      annotation.json {"train": [{id, report, image_path: [...], split}], "val", "test"}
               + images/ (R2Gen's IU X-Ray and MIMIC-CXR layout); one report row per study, on
               its first listed view (IU X-Ray: the frontal one); the other views are left out
    mimic-cxr  files/pXX/pNNNNNNNN/sNNNNNNNN/*.jpg|*.dcm with the study's report
               files/pXX/pNNNNNNNN/sNNNNNNNN.txt (in the same tree or under mimic-cxr-reports/);
               mimic-cxr-2.0.0-split.csv (or the .csv.gz MIMIC-CXR-JPG ships) is used for the
               split when present; without it the rows carry no split and one is drawn by patient
    vqa-med    ImageCLEF VQA-Med: image-id|question|answer lines (All_QA_Pairs_train.txt, All_QA_Pairs_val.txt,
               2020's *QA_pairs*.txt) or image-id|category|question|answer (VQAMed2019_Test_Questions_w_Ref_Answers
               .txt), each beside its *images/ folder of <image-id>.jpg; the folder as downloaded (one level up from
               ImageClef-2019-VQA-Med-Training/, -Validation/, VQAMed2019Test/) reads every split; 2021's
               *ValidationSet.txt; the 2020 / 2021 tests' *ReferenceAnswers.txt joined to their *Questions.txt
    parquet    a Hugging Face dataset's parquet files (*.parquet, data/*.parquet or <config>/<split>/*.parquet,
               as the Hub serves them: flaviagiammarino/vqa-rad, path-vqa): one image, question and answer
               per row, or one image and its report (a report / findings / impression / caption column: ROCO's
               and MIMIC-CXR's copies); the split from each file's name; the images, stored inside the files,
               written once (named by their content) under the cache (MEDVLM_CACHE)/extracted-images/

A folder holding the files of two layouts (a manifest.jsonl beside VQA-RAD's json) is refused, naming both, until
the format is named: reading one of them without a word would train on rows nobody chose.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"
MEVF_FILES = {"trainset.json": "train", "testset.json": "test"}
R2GEN_FILE = "annotation.json"
PMC_IMAGE_DIRS = ("images_2/figures", "images_2", "figures", "images")
# validation.json: the Hugging Face copies of SLAKE (SLAKE_en) rename the release's validate.json
SLAKE_FILES = {"train.json": "train", "validate.json": "val", "validation.json": "val", "test.json": "test"}
SLAKE_IMAGE_DIRS = ("imgs", "images")    # the release's imgs/; some Hub copies call it images/
PMC_CSVS = (("train_2.csv", "test_2.csv"), ("train.csv", "test.csv"))
MIMIC_SPLIT = "mimic-cxr-2.0.0-split.csv"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
# Text files are read as UTF-8, a leading byte-order mark (what Excel and Windows editors write) dropped:
# it is not part of the first column's name or the first row.
ENCODING = "utf-8-sig"


@dataclass
class RawRow:
    where: str                    # "manifest.jsonl:5", "train.json[12]", "test_2.csv:8"
    row: Optional[dict]           # normalised fields; None when the row could not be parsed
    problem: Optional[str] = None
    left_out: Optional[str] = None   # a row deliberately not used, and why (counted, never silent)


PICKLE = ("a pickle file is not read (unpickling runs whatever code the file holds): use a copy in a data format, "
          "e.g. PathVQA's on the Hugging Face Hub (flaviagiammarino/path-vqa, parquet)")


class FormatError(ValueError):
    """A data folder that no reader recognises, or a file a reader cannot parse at all."""


def detect_format(path: Path) -> str:
    if path.is_file():
        if path.suffix == ".jsonl":
            return "jsonl"
        if path.name == VQA_RAD_JSON or path.name in MEVF_FILES:
            return "vqa-rad"
        if path.name == R2GEN_FILE:
            return "r2gen"
        if path.suffix == ".csv":
            return "pmc-vqa"
        if path.suffix == ".parquet":
            return "parquet"
        if _vqa_med_file(path):
            return "vqa-med"
        if path.suffix in (".pkl", ".pickle"):
            raise FormatError(f"{path}: {PICKLE}")
        raise FormatError(f"{path}: not a recognised data file (a .jsonl manifest, {VQA_RAD_JSON!r}, a PMC-VQA "
                          ".csv, a VQA-Med QA-pairs .txt or a .parquet); pass a data folder or --format")
    if not path.is_dir():
        raise FileNotFoundError(f"data {path} not found")
    found = {fmt: files for fmt, files in _marker_files(path).items() if files}
    if len(found) > 1:
        raise FormatError(f"{path}: holds the files of more than one layout ("
                          + "; ".join(f"{fmt}: {', '.join(files)}" for fmt, files in found.items())
                          + "); name the one to read with --format (data.format, a site's data-format), or move "
                          "the other files out")
    if found:
        return next(iter(found))
    if (path / "files").is_dir():
        return "mimic-cxr"
    if pickles := [*path.glob("*.pkl"), *path.glob("qas/*/*.pkl")]:    # PathVQA's release: qas/train/train_qa.pkl
        raise FormatError(f"{pickles[0]}: {PICKLE}")
    below = sorted(sub.name for sub in path.iterdir() if sub.is_dir() and _recognised(sub))
    hint = (f"; the data look one level down, in {', '.join(repr(b) for b in below[:3])}: point at that folder"
            if below else "")
    raise FormatError(f"{path}: no manifest.jsonl, {VQA_RAD_JSON!r} (or MEVF trainset.json / testset.json), SLAKE "
                      f"train/validate/test.json, PMC-VQA train/test csv, R2Gen {R2GEN_FILE}, VQA-Med QA-pairs "
                      f".txt, parquet files or MIMIC-CXR files/ tree here{hint}; otherwise name the format with "
                      "--format (data.format) or point at the file")


def _marker_files(folder: Path) -> dict[str, list[str]]:
    """The files in ``folder`` that mark each layout (a MIMIC-CXR ``files/`` tree is looked for only when none do:
    one's own manifest may keep its images in a folder of that name)."""
    markers = {"jsonl": ["manifest.jsonl"], "vqa-rad": [VQA_RAD_JSON, *MEVF_FILES], "r2gen": [R2GEN_FILE],
               "slake": list(SLAKE_FILES), "pmc-vqa": [f for pair in PMC_CSVS for f in pair]}
    found = {fmt: [name for name in names if (folder / name).is_file()] for fmt, names in markers.items()}
    found["parquet"] = [str(f.relative_to(folder)) for f in parquet_files(folder)][:3]
    found["vqa-med"] = [str(f.relative_to(folder)) for f in vqa_med_files(folder)][:3]
    return found


def _recognised(path: Path) -> bool:
    try:
        detect_format(path)
    except (FormatError, OSError):
        return False
    return True


def describe_layout(path: Path, fmt: str) -> str:
    """The layout a reader recognised, in words (check-data and the site log say it)."""
    folder = path if path.is_dir() else path.parent
    if fmt == "vqa-rad":
        return ("VQA-RAD, MEVF split layout (trainset.json / testset.json + images/)"
                if any((folder / f).is_file() for f in MEVF_FILES) and not (folder / VQA_RAD_JSON).is_file()
                else "VQA-RAD, OSF release (VQA_RAD Dataset Public.json + VQA_RAD Image Folder/)")
    if fmt == "pmc-vqa":
        v2 = any((folder / f).is_file() for f in PMC_CSVS[0])
        return "PMC-VQA v2 (train_2.csv / test_2.csv, answers as choice letters)" if v2 else \
            "PMC-VQA v1 (train.csv / test.csv)"
    return {"jsonl": "the project's manifest.jsonl", "slake": "SLAKE 1.0 (train / validate / test.json + imgs/)",
            "r2gen": f"R2Gen {R2GEN_FILE} (train / val / test studies + images/)",
            "mimic-cxr": "MIMIC-CXR files/ tree with the studies' reports",
            "parquet": "Hugging Face parquet (image, question, answer per row; images extracted to the cache)",
            "vqa-med": "ImageCLEF VQA-Med (image-id|question|answer .txt files beside their images folders)"
            }.get(fmt, fmt)


def read_rows(path: str | Path, fmt: str = "auto", *, language: str = "en") -> tuple[str, list[RawRow]]:
    """(format, rows) for a data folder or file, in file order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data {path} not found")
    fmt = detect_format(path) if fmt == "auto" else fmt
    readers: dict[str, Callable[[Path], list[RawRow]]] = {
        "jsonl": read_jsonl, "vqa-rad": read_vqa_rad, "slake": lambda p: read_slake(p, language=language),
        "pmc-vqa": read_pmc_vqa, "mimic-cxr": read_mimic_cxr, "r2gen": read_r2gen, "parquet": read_parquet,
        "vqa-med": read_vqa_med}
    if fmt not in readers:
        raise FormatError(f"unknown data format {fmt!r}: use one of {sorted(readers)} or auto")
    return fmt, readers[fmt](path)


def _need(files: list[Path], path: Path, fmt: str, what: str) -> list[Path]:
    if not files:
        raise FormatError(f"{path}: no {what} here, so not a {fmt} folder; check the path or the format "
                          "(--format / data.format; auto recognises the folder)")
    return files


def _text(value: object) -> str:
    """Published files carry numbers (VQA-RAD counts) and stray spaces in text fields."""
    if value is None or isinstance(value, (dict, list)):
        return ""
    return str(value).strip()


def _not_utf8(raw: bytes, err: UnicodeDecodeError) -> tuple[int, str]:
    """(line, what is wrong) for bytes that are not UTF-8: the line and column a person opens."""
    line = raw.count(b"\n", 0, err.start) + 1
    column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
    return line, f"not UTF-8 text (byte 0x{raw[err.start]:02x} at column {column}): save the file as UTF-8"


def _read_text(path: Path) -> str:
    """A text file's contents (UTF-8; a ``.gz`` file as its releases ship it, decompressed)."""
    raw = path.read_bytes()
    if path.suffix.lower() == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise FormatError(f"{path}: not a readable gzip file ({err}): download it again") from None
    try:
        return raw.decode(ENCODING)
    except UnicodeDecodeError as err:
        line, problem = _not_utf8(raw, err)
        raise FormatError(f"{path}:{line}: {problem}") from None


def _load_json_list(path: Path) -> list:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise FormatError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise FormatError(f"{path}: expected a JSON list of questions, found a {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- the project's JSONL
def read_jsonl(path: Path) -> list[RawRow]:
    path = path / "manifest.jsonl" if path.is_dir() else path
    _need([path] if path.is_file() else [], path.parent, "jsonl", "manifest.jsonl")
    out = []
    with path.open("rb") as fh:     # bytes, so that one line that is not UTF-8 is that line's problem
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path.name}:{lineno}"
            try:
                line = raw.decode(ENCODING)
            except UnicodeDecodeError as err:
                out.append(RawRow(where, None, _not_utf8(raw, err)[1]))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                out.append(RawRow(where, None, f"malformed JSON ({err.msg})"))
                continue
            if not isinstance(row, dict):
                out.append(RawRow(where, None, f"row is a {type(row).__name__}, expected a JSON object"))
                continue
            if isinstance(row.get("image"), str) and row["image"].strip():
                row = dict(row, image=str((path.parent / row["image"]).resolve()))
            out.append(RawRow(where, row))
    return out


# ----------------------------------------------------------------------------- VQA-RAD
def read_vqa_rad(path: Path) -> list[RawRow]:
    """The OSF release (one JSON, the split in ``phrase_type``) or MEVF's trainset.json / testset.json
    (the same entries, split by file, images in ``images/``)."""
    if path.is_dir() and not (path / VQA_RAD_JSON).is_file():
        files = [path / f for f in MEVF_FILES if (path / f).is_file()]
    else:
        files = [path / VQA_RAD_JSON if path.is_dir() else path]
    _need([f for f in files if f.is_file()], path, "vqa-rad", f"{VQA_RAD_JSON!r} or trainset.json / testset.json")
    out = []
    for file in files:
        mevf = file.name in MEVF_FILES
        images = file.parent / ("images" if mevf else VQA_RAD_IMAGES)
        for i, item in enumerate(_load_json_list(file)):
            where = f"{file.name}[{i}]"
            if not isinstance(item, dict):
                out.append(RawRow(where, None, f"entry is a {type(item).__name__}, expected an object"))
                continue
            phrase = _text(item.get("phrase_type")).lower()
            out.append(RawRow(where, {
                "image": str(images / _text(item.get("image_name"))) if _text(item.get("image_name")) else "",
                "question": _text(item.get("question")), "answer": _text(item.get("answer")),
                "answer_type": _text(item.get("answer_type")).lower(),
                "qtype": _text(item.get("question_type")).lower() or None,
                "organ": _text(item.get("image_organ")).lower() or None,
                "split": MEVF_FILES[file.name] if mevf else ("test" if phrase.startswith("test") else "train")}))
    return out


# ----------------------------------------------------------------------------- SLAKE
def read_slake(path: Path, *, language: str = "en") -> list[RawRow]:
    files = [path] if path.is_file() else [path / f for f in SLAKE_FILES if (path / f).is_file()]
    _need(files, path, "slake", "train.json / validate.json (or validation.json) / test.json")
    out = []
    for file in files:
        images = next((file.parent / d for d in SLAKE_IMAGE_DIRS if (file.parent / d).is_dir()), file.parent / "imgs")
        for i, item in enumerate(_load_json_list(file)):
            where = f"{file.name}[{i}]"
            if not isinstance(item, dict):
                out.append(RawRow(where, None, f"entry is a {type(item).__name__}, expected an object"))
                continue
            lang = _text(item.get("q_lang") or language)
            if lang != language:   # SLAKE is bilingual: one language per run (data.language), the rest counted
                out.append(RawRow(where, None, left_out=f"question in {lang!r} (data.language={language})"))
                continue
            out.append(RawRow(where, {
                "image": str(images / _text(item.get("img_name"))) if _text(item.get("img_name")) else "",
                "question": _text(item.get("question")), "answer": _text(item.get("answer")),
                "answer_type": _text(item.get("answer_type")).lower(),
                "qtype": _text(item.get("content_type")).lower() or None,
                "modality": _text(item.get("modality")) or None,
                "organ": _text(item.get("location")).lower() or None,
                "split": SLAKE_FILES.get(file.name, "train")}))
    return out


# ----------------------------------------------------------------------------- PMC-VQA
_CHOICE_PREFIX = re.compile(r"^\s*[A-D]\s*[:.)]\s*")
_LETTER = re.compile(r"^\s*[A-Da-d]\s*[:.)]?\s*$")


def read_pmc_vqa(path: Path) -> list[RawRow]:
    if path.is_file():
        files = [path]
    else:
        files = next(([path / f for f in pair if (path / f).is_file()] for pair in PMC_CSVS
                      if any((path / f).is_file() for f in pair)), [])
    _need(files, path, "pmc-vqa", "train_2.csv / test_2.csv (or train.csv / test.csv)")
    out = []
    for file in files:
        images = next((file.parent / d for d in PMC_IMAGE_DIRS if (file.parent / d).is_dir()),
                      file.parent / "images")
        reader = _csv_reader(file, {"Figure_path", "Question", "Answer"}, "PMC-VQA")
        for item in reader:
            choices = [_CHOICE_PREFIX.sub("", _text(item.get(f"Choice {c}"))) for c in "ABCD"]
            where = f"{file.name}:{reader.line_num}"
            raw = _text(item.get("Answer"))
            if _LETTER.match(raw):       # v2: the answer is the letter of a choice; the model learns its text
                letter = raw.strip()[0].upper()
                answer = choices["ABCD".index(letter)]
                if not answer:
                    out.append(RawRow(where, None, f"Answer {raw!r} names choice {letter}, which is empty"))
                    continue
            else:
                answer = _CHOICE_PREFIX.sub("", raw)
            split = _text(item.get("split")).lower()
            out.append(RawRow(where, {
                "image": str(images / _text(item["Figure_path"])) if _text(item["Figure_path"]) else "",
                "question": _text(item["Question"]), "answer": answer,
                # the generative ("blank") setting: the model writes the answer, it does not pick a letter
                "answer_type": "open", "choices": [c for c in choices if c] or None,
                "split": {"validate": "val", "valid": "val"}.get(split, split) if split in (
                    "train", "val", "valid", "validate", "test") else
                ("test" if file.name.startswith("test") else "train")}))
    return out


def _csv_reader(file: Path, need: set[str], what: str) -> csv.DictReader:
    """A reader over a CSV's rows, refused (naming the file) unless it has the ``need`` columns."""
    reader = csv.DictReader(io.StringIO(_read_text(file), newline=""))
    if not need <= set(reader.fieldnames or []):
        raise FormatError(f"{file}: {what} columns {sorted(need)} expected, found {reader.fieldnames}")
    return reader


# ----------------------------------------------------------------------------- R2Gen annotation.json
def read_r2gen(path: Path) -> list[RawRow]:
    """R2Gen's ``annotation.json``: studies per split, each with its report and image paths (relative
    to ``images/``). One report row per study, on its first view; the other views are counted as left
    out (IU X-Ray lists the frontal view first)."""
    file = path / R2GEN_FILE if path.is_dir() else path
    _need([file] if file.is_file() else [], path, "r2gen", R2GEN_FILE)
    try:
        data = json.loads(_read_text(file))
    except json.JSONDecodeError as err:
        raise FormatError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not any(isinstance(data.get(k), list) for k in ("train", "val", "test")):
        raise FormatError(f"{file}: expected R2Gen's {{\"train\": [...], \"val\": [...], \"test\": [...]}}")
    wrong = [k for k in ("train", "val", "test") if data.get(k) is not None and not isinstance(data[k], list)]
    if wrong:
        raise FormatError(f"{file}: \"{wrong[0]}\" is a {type(data[wrong[0]]).__name__}; R2Gen's splits are lists "
                          "of studies")
    images = file.parent / "images"
    out = []
    for split in ("train", "val", "test"):
        for i, item in enumerate(data.get(split) or []):
            where = f"{file.name}[{split}][{i}]"
            if not isinstance(item, dict):
                out.append(RawRow(where, None, f"entry is a {type(item).__name__}, expected an object"))
                continue
            paths = item.get("image_path")
            paths = [paths] if isinstance(paths, str) else paths     # one view written without its list
            if paths is not None and not isinstance(paths, list):
                out.append(RawRow(where, None, f"image_path is a {type(paths).__name__}: give a list of image paths"))
                continue
            views = [_text(v) for v in (paths or []) if _text(v)]
            if not views:
                out.append(RawRow(where, None, "no image_path"))
                continue
            out.append(RawRow(where, {"image": str(images / views[0]), "report": report_text(_text(item.get("report"))),
                                      "split": split, "study": _text(item.get("id")) or None}))
            out += [RawRow(f"{where} view {v}", None, left_out="another view of a study (its first view is used)")
                    for v in views[1:]]
    return out


# ----------------------------------------------------------------------------- MIMIC-CXR-style reports
_SECTION = re.compile(r"^\s*([A-Z][A-Z /&]+):", re.MULTILINE)


def report_sections(text: str) -> dict[str, str]:
    """MIMIC-CXR free-text report -> {"findings": ..., "impression": ...} (upper-case headers)."""
    marks = list(_SECTION.finditer(text))
    out = {}
    for m, nxt in zip(marks, marks[1:] + [None]):
        body = text[m.end(): nxt.start() if nxt else len(text)]
        out[m.group(1).strip().lower()] = " ".join(body.split())
    return out


def report_text(text: str) -> str:
    """The findings section (what report generation targets); else the impression; else the text."""
    sections = report_sections(text)
    return sections.get("findings") or sections.get("impression") or " ".join(text.split())


def read_mimic_cxr(path: Path) -> list[RawRow]:
    root = path / "files"
    if not root.is_dir():
        raise FormatError(f"{path}: a MIMIC-CXR-style folder has a files/pXX/pNNNNNNNN/sNNNNNNNN/ tree")
    report_roots = [root] + [d / "files" for d in (path / "mimic-cxr-reports", path.parent / "mimic-cxr-reports")
                             if (d / "files").is_dir()]
    splits = None                          # without the release's split file, one is drawn by patient
    split_csv = next((f for f in (path / MIMIC_SPLIT, path / f"{MIMIC_SPLIT}.gz") if f.is_file()), None)
    if split_csv is not None:
        splits = {r["dicom_id"]: {"validate": "val"}.get(r["split"], r["split"])
                  for r in _csv_reader(split_csv, {"dicom_id", "split"}, "MIMIC-CXR split")}
    out = []
    for study in sorted(p for p in root.glob("p*/p*/s*") if p.is_dir()):
        rel = study.relative_to(root)
        report = next((r / rel.parent / f"{study.name}.txt" for r in report_roots
                       if (r / rel.parent / f"{study.name}.txt").is_file()), None)
        images = sorted(p for p in study.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        where = f"files/{rel}"
        if report is None:
            out.append(RawRow(where, None, f"study has {len(images)} image(s) but no report {study.name}.txt"))
            continue
        text = report_text(report.read_text(encoding=ENCODING, errors="replace"))
        if not images:
            out.append(RawRow(where, None, "study has a report but no images"))
        for image in images:
            row = {"image": str(image), "report": text, "modality": "CXR", "patient": rel.parts[1]}
            if splits is not None:
                row["split"] = splits.get(image.stem, "train")
            out.append(RawRow(f"{where}/{image.name}", row))
    return out


# ----------------------------------------------------------------------------- ImageCLEF VQA-Med
# 2019: All_QA_Pairs_*.txt, VQAMed2019_Test_Questions_w_Ref_Answers.txt; 2020: VQAnswering_2020_*_QA_Pairs.txt;
# 2021: VQA-Med-2021-VQAnswering-Task1-New-ValidationSet.txt; the 2020 / 2021 tests: *ReferenceAnswers.txt (image-id|
# answer) beside *Questions.txt (image-id|question)
_VQA_MED_NAME = re.compile(r"(qa_pairs|questions_w_ref_answers|validationset|referenceanswers).*\.txt$",
                           re.IGNORECASE)
_REFERENCES = "referenceanswers"
_VQA_MED_CATEGORY = re.compile(r"^C\d+_(.+?)_(train|val|valid|validation|test)\.txt$", re.IGNORECASE)


def _bar_fields(line: str) -> list[str]:
    """A VQA-Med line's ``|``-separated fields, stripped."""
    return [f.strip() for f in line.split("|")]


def _yes_no_closed(answer: str) -> str:
    """The answer type of a release that gives none (VQA-Med, the Hub's VQA-RAD): yes/no closed, the rest open."""
    return "closed" if answer.lower() in ("yes", "no") else "open"


def _vqa_med_file(path: Path) -> bool:
    return bool(_VQA_MED_NAME.search(path.name))


def vqa_med_files(folder: Path) -> list[Path]:
    """VQA-Med's question files in ``folder`` or one level down (the download holds one folder per split)."""
    return sorted(f for pattern in ("*.txt", "*/*.txt") for f in folder.glob(pattern)
                  if f.is_file() and _vqa_med_file(f))


def _vqa_med_split(file: Path) -> Optional[str]:
    name = file.name.lower()
    if "ref_answers" in name or "test" in name:
        return "test"
    return "val" if re.search(r"(^|[_\-.])(val|valid|validation)(set)?([_\-.]|$)", name) else \
        "train" if "train" in name else None


def _vqa_med_categories(folder: Path) -> dict[tuple[str, str], str]:
    """(image id, question) -> category from the release's QAPairsByCategory/C1_Modality_train.txt, ... files."""
    out: dict[tuple[str, str], str] = {}
    for file in sorted((folder / "QAPairsByCategory").glob("*.txt")):
        if m := _VQA_MED_CATEGORY.match(file.name):
            for fields in map(_bar_fields, _read_text(file).splitlines()):
                if len(fields) == 3:
                    out[(fields[0], " ".join(fields[1].split()).lower())] = m.group(1).lower()
    return out


def _vqa_med_questions(references: Path) -> tuple[str, dict[str, str]]:
    """The Questions file beside a test's ReferenceAnswers file: its name, and image id -> question."""
    name = re.sub(_REFERENCES, "Questions", references.name, flags=re.IGNORECASE)
    file = references.parent / name
    if not file.is_file():
        raise FormatError(f"{references}: reference answers without their questions ({name} beside them): put the "
                          "test's questions file there")
    out: dict[str, str] = {}
    for fields in map(_bar_fields, _read_text(file).splitlines()):
        if len(fields) == 2 and fields[0]:
            out.setdefault(fields[0], fields[1])
    return name, out


def _vqa_med_images(file: Path) -> Path:
    """The images folder beside a question file (Train_images/, Val_images/, VQAMed2019_Test_Images/)."""
    folders = sorted(d for d in file.parent.iterdir() if d.is_dir() and d.name.lower().endswith("images"))
    if folders:
        split = _vqa_med_split(file)
        return next((d for d in folders if split and split in d.name.lower()), folders[0])
    if zips := sorted(z.name for z in file.parent.glob("*[Ii]mages*.zip")):
        raise FormatError(f"{file}: its images are still zipped ({zips[0]} beside it): unzip it there")
    return file.parent


def read_vqa_med(path: Path) -> list[RawRow]:
    """ImageCLEF VQA-Med: one question a line, ``image-id|question|answer`` or, in the 2019 test file,
    ``image-id|category|question|answer``; the image is ``<images folder>/<image-id>.jpg``. The category comes
    from the line or from the release's QAPairsByCategory/ files; yes/no answers are closed, the rest open. The
    2020 and 2021 tests keep ``image-id|answer`` in *ReferenceAnswers.txt beside ``image-id|question`` in
    *Questions.txt: joined by image. Reference answers may list alternatives (``a#b``): the first is the answer
    trained on, and any of them scores (``alternatives``), as VQA-Med's own evaluation has it."""
    files = [path] if path.is_file() else vqa_med_files(path)
    _need(files, path, "vqa-med", "All_QA_Pairs_*.txt, *QA_pairs*.txt, *ValidationSet.txt, *ReferenceAnswers.txt "
          "or *_Test_Questions_w_Ref_Answers.txt (here or one folder down)")
    out: list[RawRow] = []
    for file in files:
        images, categories, split = _vqa_med_images(file), _vqa_med_categories(file.parent), _vqa_med_split(file)
        asked, questions = _vqa_med_questions(file) if _REFERENCES in file.name.lower() else ("", None)
        for lineno, line in enumerate(_read_text(file).splitlines(), start=1):
            if not line.strip():
                continue
            where, fields = f"{file.relative_to(path) if path.is_dir() else file.name}:{lineno}", _bar_fields(line)
            if questions is not None:        # the 2020 / 2021 tests: image-id|answer, the question in its own file
                if len(fields) != 2 or fields[0] not in questions:
                    out.append(RawRow(where, None, f"{len(fields)} field(s) where the reference answers have "
                                      "image-id|answer" if len(fields) != 2 else
                                      f"image {fields[0]!r} has no question in {asked}"))
                    continue
                fields = [fields[0], questions[fields[0]], fields[1]]
            if len(fields) not in (3, 4):
                out.append(RawRow(where, None, f"{len(fields)} field(s) where VQA-Med has image-id|question|answer "
                                               "(or image-id|category|question|answer)"))
                continue
            image_id, question = fields[0], " ".join(fields[-2].split())
            answer, *also = [a.strip() for a in fields[-1].split("#") if a.strip()] or [""]
            category = fields[1].lower() if len(fields) == 4 else categories.get((image_id, question.lower()))
            name = image_id if Path(image_id).suffix.lower() in IMAGE_SUFFIXES else f"{image_id}.jpg"
            out.append(RawRow(where, {
                "image": str(images / name) if image_id else "", "question": question, "answer": answer,
                "answer_type": _yes_no_closed(answer),
                "qtype": category or None, "split": split, "alternatives": also or None}))
    return out


# ----------------------------------------------------------------------------- Hugging Face parquet
# a report dataset's text column, first found first: MIMIC-CXR copies' findings (else impression), ROCO's caption
PARQUET_REPORTS = ("report", "findings", "impression", "caption")
PARQUET_SPLITS = {"train": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val", "test": "test"}
_SPLIT_WORD = re.compile(r"^(train|validation|valid|val|dev|test)(?![a-z])")
_MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))


def parquet_files(folder: Path) -> list[Path]:
    """A Hugging Face dataset's parquet files where the Hub puts them: beside each other, under ``data/`` (an
    uploaded dataset), or under ``<config>/<split>/`` (the Hub's parquet conversion)."""
    found = [*folder.glob("*.parquet"), *folder.glob("data/*.parquet"),
             *(f for split in PARQUET_SPLITS for f in folder.glob(f"*/{split}/*.parquet"))]
    return sorted({f for f in found if f.is_file()})


def _parquet_split(file: Path) -> Optional[str]:
    """train / val / test from the file's name (``train-00000-of-00001``) or its folder's (``default/train/``)."""
    for name in (file.stem.lower(), file.parent.name.lower()):
        if m := _SPLIT_WORD.match(name):
            return PARQUET_SPLITS[m.group(1)]
    return None


def read_parquet(path: Path) -> list[RawRow]:
    """One row per question; an image stored in the file (the Hub's Image feature: bytes and the original name)
    is written once under ``<cache>/extracted-images/``, named by its content (the same picture asked about
    twenty times is one file); an image given as a path is read relative to the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [path] if path.is_file() else parquet_files(path)
    _need(files, path, "parquet", "*.parquet files (beside each other, in data/ or in <config>/<split>/)")
    out: list[RawRow] = []
    for file in files:
        try:
            table = pq.ParquetFile(file)
            columns = set(table.schema_arrow.names)
        except (pa.ArrowException, OSError) as err:
            raise FormatError(f"{file}: not a readable parquet file ({err}): download it again") from None
        texts = [c for c in PARQUET_REPORTS if c in columns]
        vqa = {"question", "answer"} <= columns
        if "image" not in columns or not (vqa or texts):
            missing = [c for c in ("image", "question", "answer") if c not in columns]
            raise FormatError(f"{file}: no {', '.join(missing)} column (it has {sorted(columns)}); the parquet "
                              "reader takes one image, question and answer per row, as the Hub's VQA datasets "
                              "(vqa-rad, path-vqa) store them, or one image and its report (a "
                              f"{' / '.join(PARQUET_REPORTS)} column, as ROCO's and MIMIC-CXR's copies do)")
        extra = [c for c in ("answer_type", "qtype", "question_type", "content_type", "modality") if c in columns]
        split, i = _parquet_split(file), 0
        try:
            read = ["image", *(["question", "answer", *extra] if vqa else []), *texts]
            for batch in table.iter_batches(batch_size=64, columns=read):
                for item in batch.to_pylist():
                    out.append(_parquet_row(file, f"{file.name}[{i}]", item, split, texts))
                    i += 1
        except (pa.ArrowException, OSError) as err:
            raise FormatError(f"{file}: cannot be read past row {i} ({err}): download it again") from None
    return out


def _parquet_row(file: Path, where: str, item: dict, split: Optional[str], texts: list[str]) -> RawRow:
    cell = item["image"]
    data, name = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (cell, None)
    if isinstance(data, str):            # a path column, not the image itself
        data, name = None, data
    if data is not None and not isinstance(data, (bytes, bytearray)) or not isinstance(name, (str, type(None))):
        return RawRow(where, None, f"its image cell holds {type(cell).__name__} data, not an image's bytes or path")
    if data:
        image = str(_extracted(bytes(data), name))
    elif _text(name):
        image = str((file.parent / _text(name)).resolve())
    else:
        return RawRow(where, None, "no image in the row (its image cell is empty)")
    report = next((report_text(_text(item[c])) for c in texts if _text(item[c])), None)
    if "question" not in item:           # a report dataset: one report row per image
        if not report:
            return RawRow(where, None, f"no report in the row (its {' / '.join(texts)} cell is empty)")
        return RawRow(where, {"image": image, "report": report, "split": split})
    answer = _text(item["answer"])
    kind = _text(item.get("answer_type")).lower() or _yes_no_closed(answer)
    qtype = _text(item.get("qtype") or item.get("question_type") or item.get("content_type")).lower() or None
    return RawRow(where, {"image": image, "question": _text(item["question"]), "answer": answer,
                          "answer_type": kind, "qtype": qtype, "modality": _text(item.get("modality")) or None,
                          "split": split, **({"report": report} if report else {})})


def _extracted(data: bytes, name: Optional[str]) -> Path:
    """The image bytes of a row as a file under the cache, named by their SHA-256 (written once, atomically)."""
    import hashlib

    from medvlm.files import cache_root, write_bytes

    suffix = Path(_text(name)).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        suffix = ".dcm" if data[128:132] == b"DICM" else next((s for magic, s in _MAGIC if data.startswith(magic)),
                                                                ".img")
    target = cache_root() / "extracted-images" / f"{hashlib.sha256(data).hexdigest()[:32]}{suffix}"
    if not target.is_file():
        write_bytes(target, data)
    return target
