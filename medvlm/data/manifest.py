"""The project's manifest format and its validation.

A manifest is JSONL, one row per question: ``image`` (path relative to the manifest),
``question``, ``answer``, ``answer_type`` (closed | open), optional ``report``, ``qtype``,
``modality``. Every problem is reported by file and line, all at once, so hospital IT can
fix a folder in one pass; with ``on_bad_row="skip"`` bad rows are dropped (and listed) and
the good rows are kept.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

REQUIRED = ("image", "question", "answer", "answer_type")
ANSWER_TYPES = ("closed", "open")


class ManifestError(ValueError):
    def __init__(self, path: Path, problems: list[str]):
        self.path, self.problems = path, problems
        listing = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        super().__init__(f"{path}: {len(problems)} bad row(s); fix them or set data.on_bad_row=skip:\n  {listing}")


@dataclass
class Manifest:
    path: Path
    rows: list[dict]          # valid rows; "image" resolved to an absolute path
    problems: list[str]       # "file:line: reason" for every rejected row


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image (PNG/JPEG); raises ValueError naming the file."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise ValueError(f"image {path} not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"image {path} cannot be decoded ({err})") from None


def _row_problem(row: object, base: Path, checked: dict[str, str | None]) -> str | None:
    if not isinstance(row, dict):
        return f"row is a {type(row).__name__}, expected a JSON object"
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        return f"missing key(s) {missing}"
    for key in ("image", "question", "answer"):
        if not isinstance(row[key], str) or not row[key].strip():
            return f"empty or non-text {key!r}"
    if row["answer_type"] not in ANSWER_TYPES:
        return f"answer_type {row['answer_type']!r} is not one of {list(ANSWER_TYPES)}"
    image = str((base / row["image"]).resolve())
    if image not in checked:  # decode each image once, however many questions refer to it
        try:
            load_image(image)
            checked[image] = None
        except ValueError as err:
            checked[image] = str(err)
    if checked[image] is not None:
        return f"{checked[image]} (image {row['image']!r})"
    return None


def read_manifest(path: str | Path, *, on_bad_row: str = "error") -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found")
    rows, problems, checked = [], [], {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{path.name}:{lineno}: malformed JSON ({err.msg})")
                continue
            problem = _row_problem(row, path.parent, checked)
            if problem:
                problems.append(f"{path.name}:{lineno}: {problem}")
                continue
            rows.append(dict(row, image=str((path.parent / row["image"]).resolve()), line=lineno))
    if problems and on_bad_row == "error":
        raise ManifestError(path, problems)
    for p in problems:
        log.warning("skipping %s", p)
    if not rows:
        raise ManifestError(path, problems or ["no rows"])
    return Manifest(path, rows, problems)
