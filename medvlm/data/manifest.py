"""A hospital's data, checked row by row: the one validation every format and every caller shares.

Rows come from :mod:`medvlm.data.formats` (the project's JSONL manifest, VQA-RAD, SLAKE, PMC-VQA,
MIMIC-CXR-style folders) in manifest vocabulary. A row is a VQA row (``image``, ``question``,
``answer``, ``answer_type`` closed | open) or a report row (``image``, ``report``). Every problem
is reported by file and row, all at once, so hospital IT can fix a folder in one pass:
errors (missing or unreadable image, empty field, unknown answer type, a repeated question with a
different answer) and warnings (an exact repeat, left out). With ``on_bad_row="skip"`` bad rows
are dropped (and listed) and the good rows are kept. ``medvlm-fl check-data``, the SuperNode
launcher and the ClientApp all call :func:`read_manifest`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from tqdm import tqdm

from medvlm.config import DicomConfig
from medvlm.data.formats import describe_layout, read_rows
from medvlm.data.images import load_image

log = logging.getLogger(__name__)

VQA_KEYS = ("image", "question", "answer", "answer_type")
ANSWER_TYPES = ("closed", "open")
PROGRESS_FROM = 1000   # rows: a smaller folder is checked in seconds, without a bar


class ManifestError(ValueError):
    def __init__(self, path: Path, problems: list[str]):
        self.path, self.problems = path, problems
        listing = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        super().__init__(f"{path}: {len(problems)} bad row(s); fix them, or skip them (check-data / supernode "
                         f"--on-bad-row skip; data.on_bad_row=skip in a simulation):\n  {listing}")


@dataclass
class Manifest:
    path: Path
    format: str
    rows: list[dict]          # valid rows; "image" an absolute path, "where" the row's location
    problems: list[str]       # "where: reason" for every rejected row (errors)
    warnings: list[str] = field(default_factory=list)   # "where: reason" for rows left out harmlessly
    left_out: dict[str, int] = field(default_factory=dict)   # reason -> rows deliberately not used
    layout: str = ""                                         # what the reader recognised, in words

    @property
    def vqa_rows(self) -> list[dict]:
        return [r for r in self.rows if "question" in r]

    @property
    def report_rows(self) -> list[dict]:
        return [r for r in self.rows if "question" not in r]


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _row_problem(row: dict, images: dict[str, Optional[str]], dicom: DicomConfig,
                 known_good: Optional[Callable[[str], bool]]) -> Optional[str]:
    vqa = any(k in row for k in ("question", "answer", "answer_type")) or "report" not in row
    if vqa:
        missing = [k for k in VQA_KEYS if k not in row]
        if missing:
            hint = (" (answer_type: closed when the answer is one of a few options such as yes / no, else open)"
                    if "answer_type" in missing else "")
            return f"missing key(s) {missing}{hint}"
        for key in ("image", "question", "answer"):
            if not _is_text(row[key]):
                return f"empty or non-text {key!r}"
        if row["answer_type"] not in ANSWER_TYPES:
            return f"answer_type {row['answer_type']!r} is not one of {list(ANSWER_TYPES)}"
        also = row.get("alternatives")
        if also is not None and not (isinstance(also, list) and all(_is_text(a) for a in also)):
            return "alternatives must be a list of other accepted answers (texts)"
    else:
        for key in ("image", "report"):
            if not _is_text(row.get(key)):
                return f"empty or non-text {key!r}"
    image = row["image"]
    if image not in images:  # decode each image once, however many questions refer to it
        try:
            if not (known_good and known_good(image)):   # e.g. its frozen features are cached
                load_image(image, dicom)
            images[image] = None
        except ValueError as err:
            images[image] = str(err)
    if images[image] is not None:
        return images[image]
    return None


def _clean(row: dict, where: str) -> dict:
    row = {k: v for k, v in row.items() if v is not None}
    if "question" in row:
        row["question"], row["answer"] = row["question"].strip(), row["answer"].strip()
    return dict(row, where=where)


def read_manifest(path: str | Path, *, fmt: str = "auto", on_bad_row: str = "error",
                  dicom: Optional[DicomConfig] = None, language: str = "en",
                  known_good: Optional[Callable[[str], bool]] = None) -> Manifest:
    """Read and check a data folder/file in any supported format; raises ManifestError listing
    every bad row (or, with ``on_bad_row="skip"``, keeps the good ones). ``known_good(image)``
    True skips decoding that image (it was decoded before with the same settings)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest {path} not found")
    fmt, raw = read_rows(path, fmt, language=language)
    dicom = dicom or DicomConfig()
    rows, problems, warnings = [], [], []
    left_out: Counter = Counter()
    images: dict[str, Optional[str]] = {}
    seen: dict[tuple, tuple[str, str]] = {}
    bad_images: dict[str, list[str]] = {}     # an unusable image: reported once, with the rows that use it
    bad_rows = 0
    # every image is decoded once: minutes for a release such as PMC-VQA, so a bar on a terminal
    for item in tqdm(raw, desc=f"check {path.name}", unit="row", leave=False,
                     disable=True if len(raw) < PROGRESS_FROM else None):   # None: a bar on a terminal only
        if item.left_out:
            left_out[item.left_out] += 1
            continue
        problem = item.problem or _row_problem(item.row, images, dicom, known_good)
        if problem:
            bad_rows += 1
            image = (item.row or {}).get("image")
            if not item.problem and isinstance(image, str) and images.get(image) == problem:
                if image not in bad_images:
                    problems.append(f"{item.where}: {problem}")
                bad_images.setdefault(image, []).append(item.where)
            else:
                problems.append(f"{item.where}: {problem}")
            continue
        row = _clean(item.row, item.where)
        key = (row["image"], row["question"].lower()) if "question" in row else (row["image"],)
        target = row.get("answer", row.get("report", "")).lower()
        if key in seen:
            first, first_target = seen[key]
            if first_target == target:
                warnings.append(f"{item.where}: repeats {first} (same image, same question and answer); left out")
                left_out["exact repeat of another row"] += 1
            else:
                problems.append(f"{item.where}: contradicts {first}: same image and question, answer "
                                f"{target!r} here but {first_target!r} at {first}")
            continue
        seen[key] = (item.where, target)
        rows.append(row)
    for image, wheres in bad_images.items():
        if len(wheres) > 1:
            i = next(i for i, p in enumerate(problems) if p.startswith(f"{wheres[0]}: "))
            also = ", ".join(wheres[1:6]) + (f" and {len(wheres) - 6} more" if len(wheres) > 6 else "")
            problems[i] += f" (also used by {len(wheres) - 1} more row(s): {also})"
    if problems and on_bad_row == "error":
        raise ManifestError(path, problems)
    for p in problems + warnings:
        log.warning("skipping %s", p)
    if bad_rows:
        left_out["bad row, skipped (on_bad_row=skip)"] += bad_rows
    for reason, n in left_out.items():
        log.warning("%s: %d row(s) left out: %s", path, n, reason)
    if not rows:
        raise ManifestError(path, problems or [f"no rows ({fmt} format)"])
    return Manifest(path, fmt, rows, problems, warnings, dict(left_out), describe_layout(path, fmt))


def row_patient(row: dict) -> Optional[str]:
    """The patient a row names (``patient``: a name or a number), or None."""
    value = row.get("patient")
    if value is None:
        return None
    return str(value).strip() or None


def patient_splits(rows: list[dict]) -> dict[str, set[str]]:
    """The published splits each named patient has rows in."""
    held: dict[str, set[str]] = {}
    for r in rows:
        if patient := row_patient(r):
            held.setdefault(patient, set()).add(str(r.get("split", "unsplit")))
    return held


def summarize(manifest: Manifest) -> dict:
    """What `check-data` prints: rows, images, closed/open counts, modalities, answer vocabulary."""
    vqa = manifest.vqa_rows
    patients = patient_splits(manifest.rows)
    return {
        "format": manifest.format,
        "layout": manifest.layout,
        "rows": len(manifest.rows),
        "vqa_rows": len(vqa),
        "report_rows": len(manifest.report_rows),
        "images": len({r["image"] for r in manifest.rows}),
        "closed": sum(r["answer_type"] == "closed" for r in vqa),
        "open": sum(r["answer_type"] == "open" for r in vqa),
        "modalities": dict(Counter(str(r.get("modality", "unknown")) for r in manifest.rows).most_common()),
        "image_types": dict(Counter(Path(i).suffix.lower() or "(none)"
                                    for i in {r["image"] for r in manifest.rows}).most_common()),
        "answer_vocabulary": len({r["answer"].lower() for r in vqa}),
        # what data.qtypes (or a stage's qtypes) can name: the question types the rows carry, most asked first
        "qtypes": dict(Counter(str(r["qtype"]) for r in vqa if r.get("qtype") is not None).most_common()),
        "splits": dict(Counter(str(r.get("split", "unsplit")) for r in manifest.rows).most_common()),
        "patients": len(patients),
        "patients_in_two_splits": sorted(p for p, s in patients.items() if len(s) > 1),
        "errors": len(manifest.problems),
        "warnings": len(manifest.warnings),
        "left_out": dict(manifest.left_out),
    }
