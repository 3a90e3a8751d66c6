"""Utility: how close the federated, private model gets to pooling the data, side by side.

All on the default configuration (3 non-IID synthetic hospitals, the built-in foundation, the
public start) and scored on the same questions (the hospitals' validation splits, pooled):

    federated DP      the default federation: DP-SGD at each hospital, epsilon <= 8 each
                      (and the same with bf16 / int8 transport and with FFA-LoRA: their accuracy cost)
    pooled, no DP     one model trained on all hospitals' training data together, no DP, the same
                      epochs (rounds x local epochs) and so the same number of passes over each example
    local only (DP)   one hospital (general) alone with DP at epsilon 8, the same epochs
    start             the public start before any hospital data (round 0)

    python -m benchmarks.utility [--variants fp32,bf16,int8,ffa] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

VARIANTS = {"fp32": [], "bf16": ["federation.transport=bf16"], "int8": ["federation.transport=int8"],
            "ffa": ["model.lora.ffa=true"]}


def central(cfg, *, hospitals, dp: bool) -> tuple[float, float]:
    """Train one model on the given hospitals' pooled training data; (accuracy, baseline) on the
    pooled validation split of every configured hospital."""
    from medvlm.data.dataset import load_splits
    from medvlm.evaluate import evaluate_with_baseline
    from medvlm.model.vlm import build_medvlm
    from medvlm.train import train_local

    model = build_medvlm(cfg.model, seed=cfg.federation.seed)
    splits = load_splits(cfg.data, model.vision.preprocess)
    val = splits["val"]
    train = splits["train"] if hospitals is None else \
        load_splits(cfg.data, model.vision.preprocess, hospitals=hospitals)["train"]
    epochs = cfg.federation.rounds * cfg.federation.local_epochs
    privacy = replace(cfg.privacy, enabled=dp)
    train_local(model, train, train=replace(cfg.train, epochs=epochs), privacy=privacy, progress=False)
    result = evaluate_with_baseline(model, val, train.rows, max_new_tokens=cfg.train.eval_max_new_tokens)
    return result["accuracy"], result["baseline"]["accuracy"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="fp32,bf16,int8,ffa", help=f"federations among {list(VARIANTS)}")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from medvlm.config import load_config
    from simulations.inprocess import run_inprocess

    cfg = load_config("tiny", args.overrides)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            t0 = time.perf_counter()
            s = run_inprocess("tiny", list(args.overrides) + VARIANTS[name], Path(tmp) / name)
            rows[f"federated DP ({name})"] = {"acc": s["final_accuracy"], "base": s["baseline_accuracy"],
                                              "eps": max(s["epsilon"].values()), "s": time.perf_counter() - t0,
                                              "bytes": s["bytes_sent_per_round"]}
            first = json.loads((Path(tmp) / name / "metrics.jsonl").read_text().splitlines()[0])
            rows.setdefault("start (round 0, public only)", {"acc": first["accuracy"], "base": first["baseline_accuracy"]})
        t0 = time.perf_counter()
        acc, base = central(cfg, hospitals=None, dp=False)
        rows["pooled, no DP"] = {"acc": acc, "base": base, "s": time.perf_counter() - t0}
        t0 = time.perf_counter()
        acc, base = central(cfg, hospitals=[cfg.data.hospitals[0]], dp=True)
        rows[f"local only: {cfg.data.hospitals[0]} (DP)"] = {"acc": acc, "base": base, "s": time.perf_counter() - t0,
                                                             "eps": cfg.privacy.target_epsilon}
    pooled = rows["pooled, no DP"]["acc"]
    print(f"utility: {len(cfg.data.hospitals)} hospitals x {cfg.data.images_per_hospital} images, "
          f"{cfg.federation.rounds} rounds x {cfg.federation.local_epochs:g} local epochs; accuracy on the pooled "
          "validation questions")
    print(f"{'variant':30s}{'accuracy':>10s}{'majority':>10s}{'vs pooled':>11s}{'epsilon':>9s}{'KiB up':>8s}"
          f"{'seconds':>9s}")
    for name, r in rows.items():
        if r.get("acc") is None:
            continue
        eps = f"{r['eps']:.2f}" if r.get("eps") is not None else "-"
        kib = f"{r['bytes'] / 1024:.0f}" if r.get("bytes") else "-"
        base = f"{r['base']:.3f}" if r.get("base") is not None else "-"
        secs = f"{r['s']:.0f}" if r.get("s") else "-"
        print(f"{name:30s}{r['acc']:10.3f}{base:>10s}{r['acc'] / pooled:10.2f}x{eps:>9s}{kib:>8s}{secs:>9s}")
    main_fed = next((r for n, r in rows.items() if n.startswith("federated")), None)
    if main_fed:
        ratio = main_fed["acc"] / pooled
        print(f"federated DP / pooled non-DP = {ratio:.2f} (goal >= 0.9: {'met' if ratio >= 0.9 else 'not met'})")


if __name__ == "__main__":
    main()
