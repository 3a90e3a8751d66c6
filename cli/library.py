"""The library's commands of ``medvlm-fl`` (cli/main.py puts them together with the federation's).

    medvlm-fl build-foundation [--variant tiny|tiny-random] [--force]
    medvlm-fl train-local [--config PRESET] [--hospital NAME ...] [--no-dp] [key=value ...]
    medvlm-fl evaluate RUN_DIR [--split val|test]
    medvlm-fl write-synthetic --hospital NAME --out DIR [--images N] [--seed S] [--image-format dicom] [--hospital-only]
    medvlm-fl check-data PATH [--format F] [--language en]
    medvlm-fl answer --run RUN_DIR --image PATH --question "..."  [--manifest DIR --out preds.jsonl]
    medvlm-fl report --run RUN_DIR --image PATH                   [--manifest DIR --out preds.csv]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from medvlm.metrics import pct

log = logging.getLogger("medvlm")


def _build_foundation(args: argparse.Namespace) -> int:
    from medvlm.recipes.foundation import VARIANTS, build_foundation, foundation_dir

    variants = VARIANTS if args.variant == "all" else (args.variant,)
    for variant in variants:
        if (foundation_dir(variant) / "build.json").is_file() and not args.force:
            print(f"{variant}: already built at {foundation_dir(variant)} (use --force to rebuild)")
            continue
        started = time.perf_counter()
        path = build_foundation(variant)
        print(f"{variant}: built in {time.perf_counter() - started:.1f}s -> {path}")
    return 0


def accuracy_table(title: str, s: dict, *, model_label: str = "model"):
    """The model's accuracies next to the per-question-majority baseline's (a rich Table)."""
    from rich.table import Table

    table = Table(title=title)
    reports = s.get("bleu4") is not None
    baseline = "most common report" if reports and s.get("final_accuracy") is None else "per-question majority"
    for name, justify in (("metric", "left"), (model_label, "right"), (baseline, "right")):
        table.add_column(name, justify=justify)
    if s.get("final_accuracy") is not None or not reports:
        table.add_row("overall accuracy", pct(s["final_accuracy"]), pct(s["baseline_accuracy"]))
        table.add_row("closed accuracy", pct(s["closed_accuracy"]), pct(s["baseline_closed_accuracy"]))
        table.add_row("open accuracy (exact)", pct(s["open_accuracy"]), pct(s["baseline_open_accuracy"]))
        for qtype, acc in (s.get("per_qtype") or {}).items():
            table.add_row(f"  {qtype}", pct(acc), pct((s.get("baseline_per_qtype") or {}).get(qtype)))
    if reports:
        for key, label in (("bleu4", "BLEU-4"), ("rouge_l", "ROUGE-L"), ("finding_f1", "finding-F1 (micro)")):
            table.add_row(label, pct(s.get(key)), pct(s.get(f"baseline_{key}")))
        base = s.get("baseline_per_finding") or {}
        for label, f1 in (s.get("per_finding") or {}).items():
            table.add_row(f"  {label}", pct(f1), pct(base.get(label)))
    return table


def _print_summary(run_dir: Path, s: dict) -> None:
    from rich.console import Console

    console = Console()
    console.print(accuracy_table(f"train-local -> {run_dir}", s))
    eps = "DP off" if s["epsilon"] is None else f"epsilon={s['epsilon']:.2f} at delta={s['delta']:g}"
    console.print(f"{eps}; trainable {s['trainable_parameters']:,} of {s['total_parameters']:,} parameters; "
                  f"{s['wall_seconds']:.0f}s")


def _train_local(args: argparse.Namespace) -> int:
    from medvlm.recipes.local import train_local_run

    overrides = list(args.overrides)
    if args.no_dp:
        overrides.append("privacy.enabled=false")
    run_dir, summary = train_local_run(args.config, overrides, hospitals=args.hospital or None,
                                       run_name=args.name)
    _print_summary(run_dir, summary)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from medvlm.recipes.local import evaluate_run

    result = evaluate_run(args.run_dir, split=args.split)
    summary = Path(args.run_dir) / "summary.json"
    reported = json.loads(summary.read_text()) if args.split == "val" and summary.is_file() else None
    if result.get("bleu4") is not None:
        base = result["baseline"]
        print(f"{args.run_dir} ({args.split} split): BLEU-4 {pct(result['bleu4'])}, ROUGE-L {pct(result['rouge_l'])}, "
              f"finding-F1 {pct(result['finding_f1'])}; most common report: BLEU-4 {pct(base['bleu4'])}, ROUGE-L "
              f"{pct(base['rouge_l'])}, finding-F1 {pct(base['finding_f1'])}")
        if reported:
            print(f"summary.json reports BLEU-4 {pct(reported.get('bleu4'))}, finding-F1 "
                  f"{pct(reported.get('finding_f1'))} for the same split")
        return 0
    print(f"{args.run_dir} ({args.split} split): accuracy {pct(result['accuracy'])} (closed "
          f"{pct(result['closed_accuracy'])}, open {pct(result['open_accuracy'])}); per-question majority "
          f"{pct(result['baseline']['accuracy'])}")
    if reported:
        print(f"summary.json reports {pct(reported.get('final_accuracy'))} for the same split")
    return 0


def predict_command(args: argparse.Namespace, task: str, out=None) -> int:
    """``answer`` / ``report``: one image (or several) on the command line, or every row of a data
    folder (``--manifest``) with the predictions written to ``--out`` (JSONL or CSV)."""
    from medvlm.infer import Predictor, check_questions, manifest_requests, write_predictions

    out = out or sys.stdout
    questions = getattr(args, "question", None) or []
    if bool(args.image) == bool(args.manifest):
        raise ValueError("give --image PATH (repeatable) or --manifest DATA_FOLDER, not both")
    if task == "answer" and args.image and len(questions) not in (1, len(args.image)):
        raise ValueError(f"{len(args.image)} --image and {len(questions)} --question: give one question, "
                         "or one per image")
    check_questions(questions)                     # before the model is loaded
    predictor = Predictor.from_run(args.run, adapter=args.adapter, device=args.device, overrides=args.overrides)
    if args.manifest:
        requests = manifest_requests(args.manifest, task, predictor.cfg)
        images = [r["image"] for r in requests]
    else:
        images = list(args.image)
        for path in images:
            if not Path(path).is_file():
                raise FileNotFoundError(f"image {path} not found")
        questions = questions * (len(images) if len(questions) == 1 else 1)
        requests = [{"image": p, **({"question": q} if task == "answer" else {})}
                    for p, q in zip(images, questions or [None] * len(images))]
    if task == "answer":
        predicted = predictor.answer(images, [r["question"] for r in requests])
    else:
        predicted = predictor.report(images)
    rows = []
    for r, text in zip(requests, predicted):   # a row's "answer" in a data folder is the reference
        asked = {"question": r["question"], "answer": text} if task == "answer" else {"report": text}
        rows.append({"image": str(r["image"]), **asked, **({"reference": r["answer"]} if r.get("answer") else {})})
    if args.out:
        path = write_predictions(rows, args.out)
        print(f"{len(rows)} prediction(s) -> {path} (adapter {predictor.adapter})", file=out)
    else:
        for row, text in zip(rows, predicted):
            print(f"{row['image']}: {text}" if len(rows) > 1 else text, file=out)
    return 0


def _write_synthetic(args: argparse.Namespace) -> int:
    from medvlm.data.synthetic import generate_hospital, write_manifest

    out = Path(args.out)
    if args.images < 1:
        raise ValueError(f"--images {args.images}: give at least 1 image (each has about 9 questions)")
    if args.seed < 0:
        raise ValueError(f"--seed {args.seed}: give a seed >= 0 (numpy's seed sequences take no negative one)")
    if (out / "manifest.jsonl").exists() and not args.force:
        raise FileExistsError(f"{out / 'manifest.jsonl'} exists; pass --force to overwrite it")
    data = generate_hospital(args.hospital, args.images, seed=args.seed, hospital_only=args.hospital_only)
    path = write_manifest(data, out, image_format=args.image_format)
    print(f"{args.hospital}: {args.images} {args.image_format} images, {len(data.rows)} questions -> {path}")
    return 0


TINY_SPLIT = 20   # fewer rows than this in a split: its figures mean little


def check_data(path: str | Path, *, fmt: str = "auto", language: str = "en", on_bad_row: str = "error",
               out=sys.stdout) -> int:
    """Check a data folder and print its summary and every problem. 0 when it has no errors, or when
    the site skips bad rows (``on_bad_row="skip"``: they are listed as skipped); else 1."""
    from medvlm.data.manifest import ManifestError, read_manifest, summarize

    try:
        manifest = read_manifest(path, fmt=fmt, on_bad_row="skip", language=language)
    except ManifestError as err:   # not one usable row
        print(f"{path}: no usable rows", file=out)
        for problem in err.problems:
            print(f"  ERROR {problem}", file=out)
        return 1
    logging.getLogger("medvlm.data.manifest").setLevel(logging.ERROR)  # listed below, once
    info = summarize(manifest)
    print(f"{path} ({info['format']} format: {info['layout']})", file=out)
    print(f"  rows {info['rows']} ({info['vqa_rows']} question/answer, {info['report_rows']} report) "
          f"on {info['images']} images {info['image_types']}"
          + (f" of {info['patients']} patients" if info["patients"] else ""), file=out)
    print(f"  closed {info['closed']}, open {info['open']}; answer vocabulary {info['answer_vocabulary']}", file=out)
    print(f"  modalities {info['modalities']}; rows per split {info['splits']}", file=out)
    if info["qtypes"]:
        print(f"  question types (data.qtypes) {info['qtypes']}", file=out)
    for reason, n in info["left_out"].items():
        print(f"  left out: {n} row(s): {reason}", file=out)
    skip = on_bad_row == "skip"
    for problem in manifest.problems:
        print(f"  {'SKIPPED' if skip else 'ERROR'} {problem}", file=out)
    warnings = list(manifest.warnings)
    if two := info["patients_in_two_splits"]:
        warnings.append(f"{len(two)} patient(s) have rows in more than one split (e.g. {', '.join(two[:5])}): a "
                        "model is then scored on patients it trained on; keep each patient's rows in one split")
    warnings += [f"split {split!r} has only {n} row(s): its figures will mean little"
                 for split, n in info["splits"].items() if n < TINY_SPLIT]
    for warning in warnings:
        print(f"  WARNING {warning}", file=out)
    if not manifest.problems:
        verdict = "OK"
    elif skip:
        verdict = f"OK with {len(manifest.problems)} bad row(s) skipped (--on-bad-row skip)"
    else:
        verdict = (f"{len(manifest.problems)} error(s): fix these rows, or skip them (--on-bad-row skip here and "
                   "on medvlm-fl supernode)")
    print(f"{verdict}; {len(warnings)} warning(s)", file=out)
    return 0 if not manifest.problems or skip else 1


def _check_data(args: argparse.Namespace) -> int:
    return check_data(args.path, fmt=args.format, language=args.language, on_bad_row=args.on_bad_row)


def add_library_commands(sub) -> None:
    """build-foundation, train-local, evaluate, answer, report, write-synthetic, check-data."""
    p = sub.add_parser("build-foundation", help="(re)build the built-in tiny pretrained ViT + LM (cached)")
    p.add_argument("--variant", default="tiny", choices=["tiny", "tiny-random", "all"])
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=_build_foundation)

    p = sub.add_parser("train-local", help="train one model on pooled (or one hospital's) data")
    p.add_argument("--config", default="tiny", help="preset name in configs/ or a YAML path (default: tiny)")
    p.add_argument("--hospital", action="append", help="synthetic hospital profile(s) to use (default: all in config)")
    p.add_argument("--no-dp", action="store_true", help="plain training (baseline): privacy.enabled=false")
    p.add_argument("--name", help="run folder name under output_dir (default: timestamp)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=3 privacy.target_epsilon=4")
    p.set_defaults(func=_train_local)

    p = sub.add_parser("evaluate", help="score a run's exported global/ adapter on the hospitals' data")
    p.add_argument("run_dir", help="a run folder (with config.yaml and global/)")
    p.add_argument("--split", default="val", choices=["val", "test"], help="val = what the federation reports")
    p.set_defaults(func=_evaluate)

    for task, help_text in (("answer", "answer a question about an image (PNG/JPEG/DICOM) with a run's adapter"),
                            ("report", "write the findings report of an image (PNG/JPEG/DICOM) with a run's adapter")):
        p = sub.add_parser(task, help=help_text)
        p.add_argument("--run", required=True, help="a run folder (config.yaml + global/ adapter)")
        p.add_argument("--image", action="append", help="an image file (repeatable)")
        if task == "answer":
            p.add_argument("--question", action="append", help="the question (one, or one per --image)")
        p.add_argument("--manifest", help="batch mode: every row of a data folder or manifest (any supported format)")
        p.add_argument("--out", help="write the predictions to a .jsonl or .csv file (default: print them)")
        p.add_argument("--adapter", help="another exported adapter folder (default: RUN/global)")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
        p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.language.source=/models/llm")
        p.set_defaults(func=(lambda a, t=task: predict_command(a, t)))

    p = sub.add_parser("write-synthetic", help="write one synthetic hospital's images + manifest.jsonl to a folder "
                                               "(a data folder for a SuperNode's data-path)")
    p.add_argument("--hospital", required=True, help="profile: general, oncology, cardiac, pediatric, ...")
    p.add_argument("--out", required=True, help="folder to write (images/ and manifest.jsonl)")
    p.add_argument("--hospital-only", action="store_true",
                   help="with the findings the public corpus lacks (pneumothorax, pacemaker; data.hospital_only)")
    p.add_argument("--images", type=int, default=400, help="number of images (about 9 questions each)")
    p.add_argument("--seed", type=int, default=0, help="data.seed the simulation uses for the same profile")
    p.add_argument("--image-format", default="png", choices=["png", "dicom"],
                   help="dicom: 12-bit CT-style files with rescale and window tags")
    p.add_argument("--force", action="store_true", help="overwrite an existing manifest.jsonl")
    p.set_defaults(func=_write_synthetic)

    from medvlm.config import DATA_FORMATS

    p = sub.add_parser("check-data", help="check a hospital's data folder (every row, every image) and summarise it")
    p.add_argument("path", help="a data folder or file: manifest.jsonl, VQA-RAD, SLAKE, PMC-VQA, R2Gen, "
                                "MIMIC-CXR-style, Hugging Face parquet, ImageCLEF VQA-Med")
    p.add_argument("--format", default="auto", choices=list(DATA_FORMATS), help="default: recognised from the files")
    p.add_argument("--language", default="en", help="SLAKE: which q_lang to keep (default en)")
    p.add_argument("--on-bad-row", default="error", choices=["error", "skip"],
                   help="error: exit 1 listing bad rows (default); skip: list them as skipped, exit 0")
    p.set_defaults(func=_check_data)
