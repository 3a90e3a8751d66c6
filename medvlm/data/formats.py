"""The published Med-VQA / report formats, each normalised into the project's manifest rows.

A reader turns a data folder (or file) into :class:`RawRow` s: where the row came from (``file:line``
or ``file[index]``, what a person opens to fix it) and the row in manifest vocabulary:

    image        absolute path of the image file (PNG, JPEG or DICOM)
    question     } VQA rows
    answer       }
    answer_type  } closed | open
    report       report rows (report generation): the findings text
    qtype, modality, organ, split, choices   optional, kept when the format has them

Validation (missing files, unreadable images, empty fields, duplicates) is one pass for every
format, in :mod:`medvlm.data.manifest`. Layouts recognised by ``detect_format``:

    jsonl      manifest.jsonl (or any .jsonl): the project's own rows, image paths relative to it
    vqa-rad    "VQA_RAD Dataset Public.json" + "VQA_RAD Image Folder/" (OSF release)
    slake      train.json, validate.json, test.json + imgs/ (Slake1.0); rows in data.language
    pmc-vqa    train_2.csv/test_2.csv (or train.csv/test.csv) + images/ (or figures/)
    mimic-cxr  files/pXX/pNNNNNNNN/sNNNNNNNN/*.jpg|*.dcm with the study's report
               files/pXX/pNNNNNNNN/sNNNNNNNN.txt (in the same tree or under mimic-cxr-reports/);
               mimic-cxr-2.0.0-split.csv is used for the split when present
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"
SLAKE_FILES = {"train.json": "train", "validate.json": "val", "test.json": "test"}
PMC_CSVS = (("train_2.csv", "test_2.csv"), ("train.csv", "test.csv"))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


@dataclass
class RawRow:
    where: str                    # "manifest.jsonl:5", "train.json[12]", "test_2.csv:8"
    row: Optional[dict]           # normalised fields; None when the row could not be parsed
    problem: Optional[str] = None


class FormatError(ValueError):
    """A data folder that no reader recognises, or a file a reader cannot parse at all."""


def detect_format(path: Path) -> str:
    if path.is_file():
        if path.suffix == ".jsonl":
            return "jsonl"
        if path.name == VQA_RAD_JSON:
            return "vqa-rad"
        if path.suffix == ".csv":
            return "pmc-vqa"
        raise FormatError(f"{path}: not a recognised data file (a .jsonl manifest, {VQA_RAD_JSON!r} or a "
                          "PMC-VQA .csv); pass a data folder or --format")
    if not path.is_dir():
        raise FileNotFoundError(f"data {path} not found")
    if (path / "manifest.jsonl").is_file():
        return "jsonl"
    if (path / VQA_RAD_JSON).is_file():
        return "vqa-rad"
    if any((path / f).is_file() for f in SLAKE_FILES):
        return "slake"
    if any((path / f).is_file() for pair in PMC_CSVS for f in pair):
        return "pmc-vqa"
    if (path / "files").is_dir():
        return "mimic-cxr"
    raise FormatError(f"{path}: no manifest.jsonl, {VQA_RAD_JSON!r}, SLAKE train/validate/test.json, PMC-VQA "
                      "train/test csv or MIMIC-CXR files/ tree here; name the format with --format "
                      "(data.format) or point at the file")


def read_rows(path: str | Path, fmt: str = "auto", *, language: str = "en") -> tuple[str, list[RawRow]]:
    """(format, rows) for a data folder or file, in file order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data {path} not found")
    fmt = detect_format(path) if fmt == "auto" else fmt
    readers: dict[str, Callable[[Path], list[RawRow]]] = {
        "jsonl": read_jsonl, "vqa-rad": read_vqa_rad, "slake": lambda p: read_slake(p, language=language),
        "pmc-vqa": read_pmc_vqa, "mimic-cxr": read_mimic_cxr}
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


def _load_json_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FormatError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise FormatError(f"{path}: expected a JSON list of questions, found a {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- the project's JSONL
def read_jsonl(path: Path) -> list[RawRow]:
    path = path / "manifest.jsonl" if path.is_dir() else path
    _need([path] if path.is_file() else [], path.parent, "jsonl", "manifest.jsonl")
    out = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{lineno}"
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
    file = path / VQA_RAD_JSON if path.is_dir() else path
    _need([file] if file.is_file() else [], path, "vqa-rad", repr(VQA_RAD_JSON))
    images = file.parent / VQA_RAD_IMAGES
    out = []
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
            "split": "test" if phrase.startswith("test") else "train"}))
    return out


# ----------------------------------------------------------------------------- SLAKE
def read_slake(path: Path, *, language: str = "en") -> list[RawRow]:
    files = [path] if path.is_file() else [path / f for f in SLAKE_FILES if (path / f).is_file()]
    _need(files, path, "slake", "train.json / validate.json / test.json")
    out = []
    for file in files:
        images = file.parent / "imgs"
        for i, item in enumerate(_load_json_list(file)):
            where = f"{file.name}[{i}]"
            if not isinstance(item, dict):
                out.append(RawRow(where, None, f"entry is a {type(item).__name__}, expected an object"))
                continue
            if _text(item.get("q_lang") or language) != language:
                continue   # SLAKE is bilingual: one language per run (data.language)
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


def read_pmc_vqa(path: Path) -> list[RawRow]:
    if path.is_file():
        files = [path]
    else:
        files = next(([path / f for f in pair if (path / f).is_file()] for pair in PMC_CSVS
                      if any((path / f).is_file() for f in pair)), [])
    _need(files, path, "pmc-vqa", "train_2.csv / test_2.csv (or train.csv / test.csv)")
    out = []
    for file in files:
        images = next((file.parent / d for d in ("images", "figures") if (file.parent / d).is_dir()),
                      file.parent / "images")
        with file.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            need = {"Figure_path", "Question", "Answer"}
            if not need <= set(reader.fieldnames or []):
                raise FormatError(f"{file}: PMC-VQA columns {sorted(need)} expected, found {reader.fieldnames}")
            for item in reader:
                choices = [_CHOICE_PREFIX.sub("", _text(item.get(f"Choice {c}"))) for c in "ABCD"]
                answer = _CHOICE_PREFIX.sub("", _text(item.get("Answer")))
                out.append(RawRow(f"{file.name}:{reader.line_num}", {
                    "image": str(images / _text(item["Figure_path"])) if _text(item["Figure_path"]) else "",
                    "question": _text(item["Question"]), "answer": answer,
                    # the generative ("blank") setting: the model writes the answer, it does not pick a letter
                    "answer_type": "open", "choices": [c for c in choices if c] or None,
                    "split": "test" if file.name.startswith("test") else "train"}))
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
    splits = {}
    split_csv = path / "mimic-cxr-2.0.0-split.csv"
    if split_csv.is_file():
        with split_csv.open(encoding="utf-8", newline="") as fh:
            splits = {r["dicom_id"]: {"validate": "val"}.get(r["split"], r["split"]) for r in csv.DictReader(fh)}
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
        text = report_text(report.read_text(encoding="utf-8", errors="replace"))
        if not images:
            out.append(RawRow(where, None, "study has a report but no images"))
        for image in images:
            out.append(RawRow(f"{where}/{image.name}", {
                "image": str(image), "report": text, "modality": "CXR",
                "split": splits.get(image.stem, "train")}))
    return out
