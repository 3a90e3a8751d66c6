"""The train-local and evaluate recipes: one model trained on pooled (or one hospital's) data,
and a run's exported adapter scored on the hospitals' own splits. Each reads top to bottom:
config -> model -> data -> train -> evaluate -> write."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger("medvlm")


def train_local_run(preset: str, overrides: Sequence[str], *, hospitals: Optional[Sequence[str]] = None,
                    run_name: Optional[str] = None, progress: bool = True) -> tuple[Path, dict]:
    """The train-local recipe, top to bottom: config -> model -> data -> train -> evaluate -> write."""
    import torch

    from medvlm.build import build_medvlm
    from medvlm.config import load_config
    from medvlm.data.dataset import load_splits
    from medvlm.evaluate import evaluate_with_baseline
    from medvlm.features import cached_encoder
    from medvlm.metrics import REPORT_KEYS, load_labeler
    from medvlm.privacy import save_accountant_state
    from medvlm.runs import export_trainable, new_run_dir, save_config, write_json
    from medvlm.train import calibrated, resolve_device, train_local

    started = time.perf_counter()
    cfg = load_config(preset, list(overrides))
    torch.manual_seed(cfg.train.seed)
    model = build_medvlm(cfg.model, seed=cfg.train.seed).to(resolve_device(cfg.train.device))  # encode there
    splits = load_splits(cfg.data, model.vision.preprocess, hospitals=hospitals,
                         encode_files=cached_encoder(model, cfg.data.feature_cache, cfg.data, progress=progress))
    run_dir = new_run_dir(cfg.output_dir, "train-local", run_name)
    save_config(cfg, run_dir)
    log.info("run folder %s: %d train / %d val / %d test questions", run_dir,
             len(splits["train"]), len(splits["val"]), len(splits["test"]))

    privacy = calibrated(cfg.privacy, len(splits["train"]), cfg.train)
    result = train_local(model, splits["train"], train=cfg.train, privacy=privacy, progress=progress)
    test = evaluate_with_baseline(model, splits["test"], splits["train"].rows, labeler=load_labeler(cfg.data.labeler),
                                  max_new_tokens=cfg.train.eval_max_new_tokens, progress=progress)
    export_trainable(model, run_dir / "global")
    if result.accountant_state is not None:
        save_accountant_state(result.accountant_state, run_dir / "accountant.json")

    trainable, total = model.count_parameters()
    spent = result.privacy
    summary = {
        "final_accuracy": test.get("accuracy"), "closed_accuracy": test.get("closed_accuracy"),
        "open_accuracy": test.get("open_accuracy"), "open_recall": test.get("open_recall"),
        "baseline_accuracy": test["baseline"].get("accuracy"),
        "baseline_closed_accuracy": test["baseline"].get("closed_accuracy"),
        "baseline_open_accuracy": test["baseline"].get("open_accuracy"),
        "per_qtype": test.get("per_qtype"), "baseline_per_qtype": test["baseline"].get("per_qtype"),
        "test_questions": {"closed": test.get("closed_total", 0), "open": test.get("open_total", 0)},
        "task": cfg.data.task, **{k: test.get(k) for k in REPORT_KEYS},
        **{f"baseline_{k}": test["baseline"].get(k) for k in REPORT_KEYS},
        "per_finding": test.get("per_finding"), "baseline_per_finding": test["baseline"].get("per_finding"),
        "dp": cfg.privacy.enabled,
        "epsilon": spent.epsilon if spent else None, "delta": cfg.privacy.delta if spent else None,
        "privacy": spent.as_dict() if spent else None,
        "train_loss": result.metrics["train_loss"], "steps": result.metrics["steps"],
        "train_examples": result.metrics["examples"], "train_seconds": result.metrics["seconds"],
        "trainable_parameters": trainable, "total_parameters": total,
        "hospitals": list(hospitals or cfg.data.hospitals) if cfg.data.source == "synthetic" else None,
        "wall_seconds": time.perf_counter() - started,
    }
    write_json(run_dir / "summary.json", summary)
    return run_dir, summary


def evaluate_run(run_dir: str | Path, *, split: str = "val", progress: bool = True) -> dict:
    """Score a run's exported ``global/`` adapter + fusion on each hospital's own split, as the
    federation does: counts summed over hospitals, baseline = each hospital's per-question majority."""
    from medvlm.build import build_medvlm
    from medvlm.config import for_stage, stages
    from medvlm.data.dataset import load_splits
    from medvlm.evaluate import baseline_counts, evaluate_counts
    from medvlm.features import cached_encoder
    from medvlm.metrics import load_labeler, merge_counts, scores
    from medvlm.runs import load_trainable, saved_config

    run_dir = Path(run_dir)
    cfg = saved_config(run_dir)
    cfg = for_stage(cfg, stages(cfg)[-1])     # a curriculum is scored on its last stage's task
    labeler = load_labeler(cfg.data.labeler)
    model = build_medvlm(cfg.model, seed=cfg.federation.seed)
    load_trainable(model, run_dir / "global")
    counts, base = [], []
    groups = [[h] for h in cfg.data.hospitals] if cfg.data.source == "synthetic" else [None]
    for hospitals in groups:
        splits = load_splits(cfg.data, model.vision.preprocess, hospitals=hospitals,
                             encode_files=cached_encoder(model, cfg.data.feature_cache, cfg.data, progress=progress))
        counts.append(evaluate_counts(model, splits[split], max_new_tokens=cfg.train.eval_max_new_tokens,
                                      progress=progress, labeler=labeler))
        base.append(baseline_counts(splits[split], splits["train"].rows, labeler=labeler))
    result = scores(merge_counts(counts))
    result["baseline"] = scores(merge_counts(base))
    return result
