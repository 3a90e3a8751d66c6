"""Using a trained adapter: answer questions about, or write the findings report of, images
(PNG / JPEG / DICOM) with a run's exported ``global/`` adapter on its frozen base models.

    predictor = Predictor.from_run("runs/my-federation")
    predictor.answer(["scan.dcm"], ["is there a pleural effusion?"])
    predictor.report(["scan.dcm"])

Runs on the hospital's own machine: images are read with the same loader (and DICOM settings)
the run trained with, and nothing leaves the process.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from medvlm.build import build_medvlm
from medvlm.config import ExperimentConfig, stages
from medvlm.data.dataset import VQARows, preprocess_images, report_row
from medvlm.data.images import load_image
from medvlm.evaluate import predict
from medvlm.model.vlm import MedVLM
from medvlm.runs import load_trainable, saved_config
from medvlm.train import resolve_device

log = logging.getLogger(__name__)


@dataclass
class Predictor:
    model: MedVLM
    cfg: ExperimentConfig
    adapter: Path
    tasks: tuple[str, ...] = ()    # what the run trained it for (its stages; vqa too when it began at the public start)

    @classmethod
    def from_run(cls, run_dir: str | Path, *, adapter: Optional[str | Path] = None, device: str = "auto",
                 overrides: Sequence[str] = ()) -> "Predictor":
        """The run's base models (its ``config.yaml``, plus ``overrides``) with its exported adapter
        (``<run>/global``, or ``adapter``) loaded; an adapter for other base models is refused."""
        run_dir = Path(run_dir)
        cfg = saved_config(run_dir, overrides)
        tasks = tuple(dict.fromkeys([s.task for s in stages(cfg)] + (["vqa"] if cfg.model.init == "public" else [])))
        # the adapter replaces the run's starting point: do not build (or require) model.init
        cfg = replace(cfg, model=replace(cfg.model, init="random", fusion=replace(cfg.model.fusion, init="random")))
        path = Path(adapter) if adapter else run_dir / "global"
        if not path.is_dir():
            raise FileNotFoundError(f"{path} not found: the run has not finished a round yet, or pass --adapter DIR")
        model = build_medvlm(cfg.model, seed=cfg.federation.seed).to(resolve_device(device))
        load_trainable(model, path)
        model.eval()
        return cls(model, cfg, path, tasks)

    def _run(self, images: Sequence[str | Path], rows: list[dict]) -> list[str]:
        pixels = preprocess_images([load_image(p, self.cfg.data.dicom) for p in images], self.model.vision.preprocess)
        return predict(self.model, VQARows(pixels, rows), max_new_tokens=self.cfg.train.eval_max_new_tokens)

    def trained_for(self, task: str) -> None:
        """Warn when the run trained no stage of ``task`` (reports asked of a question-answering run, say):
        its output is then whatever the model does untrained for it, which nothing else would reveal."""
        if self.tasks and task not in self.tasks:
            log.warning("%s was trained for %s (data.task / federation.stages), not %s: its %s are untrained",
                        self.adapter, " + ".join(self.tasks), task, "answers" if task == "vqa" else "reports")

    def answer(self, images: Sequence[str | Path], questions: Sequence[str]) -> list[str]:
        """One answer per (image, question) pair."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} image(s) for {len(questions)} question(s): give one question per image")
        check_questions(questions)
        self.trained_for("vqa")
        rows = [{"image_index": i, "question": q, "answer": "", "answer_type": "open"} for i, q in enumerate(questions)]
        return self._run(images, rows)

    def report(self, images: Sequence[str | Path]) -> list[str]:
        """The findings report of each image."""
        self.trained_for("report")
        return self._run(images, [report_row(i, "") for i in range(len(images))])


def check_questions(questions: Sequence[str]) -> None:
    """Refuse a blank question (the model would answer it with whatever it says most often)."""
    blank = [i + 1 for i, q in enumerate(questions) if not str(q or "").strip()]
    if blank:
        raise ValueError(f"question {', '.join(map(str, blank))} of {len(questions)} is empty: write the question "
                         "to answer about the image")


def manifest_requests(path: str | Path, task: str, cfg: ExperimentConfig) -> list[dict]:
    """The rows of a data folder (any supported format) to predict: ``image`` plus the question
    (answer) and the reference answer or report when the folder has one."""
    from medvlm.data.dataset import task_rows
    from medvlm.data.manifest import read_manifest

    manifest = read_manifest(path, fmt=cfg.data.format, on_bad_row="skip", dicom=cfg.data.dicom,
                             language=cfg.data.language)
    rows = task_rows(manifest.rows, "vqa" if task == "answer" else "report")
    if not rows:
        raise ValueError(f"{path}: no {'question' if task == 'answer' else 'report'} rows to predict")
    return rows


def write_predictions(rows: list[dict], out: str | Path) -> Path:
    """Predictions as JSONL (``.jsonl``) or CSV (``.csv``), UTF-8, written atomically; a question or
    answer in any script is written as its characters (SLAKE's Chinese, not ``\\u`` escapes)."""
    out = Path(out)
    if out.suffix not in (".jsonl", ".csv"):
        raise ValueError(f"--out {out}: use a .jsonl or .csv file name")
    from medvlm.files import atomic_path

    with atomic_path(out) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        if out.suffix == ".jsonl":
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            fields = list(dict.fromkeys(k for row in rows for k in row))
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return out
