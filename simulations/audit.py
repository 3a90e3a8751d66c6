"""``medvlm-fl audit``: the accountant's ε next to an empirical lower bound (``medvlm/audit.py``),
with training through the path a hospital runs: its data folder, its node config and ledger, the
ClientApp's DP-SGD and its egress guard. Three trainings, side by side: DP at the configured
budget, DP with a budget so large that the noise is far too low, and no DP: the last two show that
the audit can see a leak. The attacker sees the hospital's update (``--federated``: the federation's
global model, the canaries at one hospital).

Two kinds of canaries:

- ``gradient`` (default): Dirac gradient canaries that join the hospital's DP-SGD steps through its
  node config (``audit-canaries``): Poisson-sampled, clipped and noised like any example. The
  attacker reads each canary's coordinate of the update. It measures the mechanism itself, with
  power on any model size.
- ``input``: images and questions with random answers in the hospital's data; the attacker scores
  how much more likely each answer became, and how well the update aligns with each canary's own
  gradient. The end-to-end check of the data path, but a model as small as the built-in one barely
  memorises them, so its bounds stay low even without DP.

    medvlm-fl audit [--config tiny] [--canaries 1000] [--kind gradient|input] [--federated] [--out DIR]
                    [overrides ...]

Writes ``DIR/audit/``: ``report.json``, ``audit.png`` (score distributions of included and
excluded canaries, and the bound next to the accountant's ε), ``README.md`` and the canaries.
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from medvlm.model.vlm import MedVLM

log = logging.getLogger("medvlm.audit")

WEAK_EPSILON = 1e5   # the budget of the "noise far too low" training


def _variants(cfg) -> list[tuple[str, dict, list[str]]]:
    """(name, the audited site's node-config policy, the run's privacy for the other hospitals)."""
    eps, delta = cfg.privacy.target_epsilon or 8.0, cfg.privacy.delta
    common = {"delta": delta, "max-grad-norm": cfg.privacy.max_grad_norm, "accountant": cfg.privacy.accountant}
    return [(f"DP at epsilon {eps:g}", {"dp": "on", "epsilon": eps, **common}, ["privacy.enabled=true"]),
            (f"DP, noise far too low (budget {WEAK_EPSILON:g})", {"dp": "on", "epsilon": WEAK_EPSILON, **common},
             ["privacy.enabled=true", f"privacy.target_epsilon={WEAK_EPSILON:g}"]),
            ("no DP", {"dp": "off"}, ["privacy.enabled=false"])]


def write_site(folder: Path, cfg, canaries, hospital: str) -> Path:
    """The audited hospital's data folder: its synthetic data (its own validation split kept) plus
    the input canaries drawn in (if any), all in its training split; every canary's image under
    ``canaries/``."""
    from PIL import Image

    from medvlm.data.synthetic import generate_hospital, split_images, write_manifest

    manifest = write_manifest(generate_hospital(hospital, cfg.data.images_per_hospital, seed=cfg.data.seed,
                                                hospital_only=cfg.data.hospital_only), folder)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    images = sorted({r["image"] for r in rows})
    val = {images[i] for i in split_images(len(images), val_fraction=cfg.data.val_fraction, test_fraction=0.0,
                                           seed=cfg.data.seed)["val"]}
    rows = [dict(r, split="val" if r["image"] in val else "train") for r in rows]
    if canaries is None:
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder
    (folder / "canaries").mkdir(exist_ok=True)
    for i, (image, row) in enumerate(zip(canaries.images, canaries.rows)):
        name = f"canaries/{i:05d}.png"
        Image.fromarray(image, mode="L").save(folder / name)
        if canaries.included[i]:
            rows.append({"image": name, "question": row["question"], "answer": row["answer"],
                         "answer_type": row["answer_type"], "qtype": row["qtype"], "split": "train"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _train_site(preset: str, overrides: Sequence[str], cfg, node_config: dict, start: "MedVLM") -> dict:
    """One hospital's training as its ClientApp does it (one round of the federation's epochs); the
    update it sends, decoded."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from client import app as client_app
    from medvlm.wire import decode, to_wire, unpack
    from simulations.inprocess import set_task_identity

    set_task_identity()
    epochs = cfg.federation.rounds * cfg.federation.local_epochs
    lr = cfg.federation.lr or cfg.train.lr
    msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in to_wire(start.trainable_state()).items()}),
                              "config": ConfigRecord({"server-round": 1, "num-rounds": 1, "local-epochs": float(epochs),
                                                      "lr": float(lr)})}), dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                      run_config={"preset": preset, "overrides": shlex.join(overrides)})
    reply = client_app.train(msg, context)
    if reply.has_error() or "arrays" not in reply.content.array_records:
        raise RuntimeError(f"the audited hospital did not train: "
                           f"{reply.error.reason if reply.has_error() else dict(reply.content['status'])}")
    return decode(unpack({k: a.numpy() for k, a in reply.content.array_records["arrays"].items()}),
                  start.trainable_spec(), "fp32")


def _federate(preset: str, overrides: Sequence[str], cfg, node_config: dict, run_dir: Path) -> dict:
    """The configured federation with the audited hospital in place of the first profile; the global state."""
    from client import app as client_app
    from medvlm.build import build_medvlm
    from medvlm.runs import load_trainable
    from server.app import run_federation
    from simulations.inprocess import InProcessGrid

    nodes = {10: node_config, **{10 + i: {"partition-id": i} for i in range(1, len(cfg.data.hospitals))}}
    grid = InProcessGrid(nodes, {"train": client_app.train, "evaluate": client_app.evaluate},
                         {"preset": preset, "overrides": shlex.join(overrides)})
    run_federation(grid, cfg, run_dir)
    model = build_medvlm(cfg.model, seed=cfg.federation.seed)
    load_trainable(model, run_dir / "global")
    return model.trainable_state()


CANARY_KINDS = ("gradient", "input")


def _attacks_input(cfg, marks, probe, loss_before, before, start, state) -> dict[str, np.ndarray]:
    """Input canaries: how much more likely each canary's answer became, and how well the update
    aligns with each canary's own gradient (white-box: the update is what a hospital sends)."""
    from medvlm.audit import answer_losses, gradient_scores
    from medvlm.build import build_medvlm

    after = build_medvlm(cfg.model, seed=cfg.federation.seed)
    after.load_trainable_state(state)
    return {"loss": loss_before - answer_losses(after, probe),
            "gradient": gradient_scores(before, {k: state[k] - start[k] for k in state}, probe)}


def run_audit(preset: str, overrides: Sequence[str], out: Path, *, canaries: int = 2000,
              federated: bool = False, seed: int = 0, significance: float = 0.05, kind: str = "gradient") -> dict:
    """Three trainings of one hospital (DP at its budget, noise far too low, no DP) with ``canaries``
    of ``kind`` ("gradient": Dirac gradients in its DP-SGD steps; "input": images and questions in its
    data), each scored by what the attacker sees; the bound next to the accountant's epsilon."""
    from client.ledger import Ledger
    from medvlm.audit import (answer_losses, bound_ceiling, canary_words, epsilon_lower_bound, make_canaries,
                              make_gradient_canaries)
    from medvlm.build import build_medvlm
    from medvlm.config import load_config, stage_at
    from medvlm.data.dataset import VQARows, preprocess_images
    from medvlm.data.images import load_image
    from medvlm.data.synthetic import IMAGE_SIZE
    from medvlm.files import write_text

    if kind not in CANARY_KINDS:
        raise ValueError(f"canary kind {kind!r}: use one of {', '.join(CANARY_KINDS)}")
    cfg = load_config(preset, list(overrides))
    audit_dir = Path(out) / "audit"
    audit_dir.mkdir(parents=True, exist_ok=True)
    before = build_medvlm(cfg.model, seed=cfg.federation.seed)
    hospital = cfg.data.hospitals[0]
    extra_node: dict = {}
    if kind == "gradient":   # on the tensors the hospital trains (in the first stage of a curriculum)
        before.freeze_base(stage_at(cfg, 0).trainable)
        shapes = {n: tuple(p.shape) for n, p in before.trainable_parameters().items() if p.requires_grad}
        marks = make_gradient_canaries(shapes, canaries, seed=seed, norm=cfg.privacy.max_grad_norm)
        path = write_text(audit_dir / "canaries.json", json.dumps(marks.to_json()))
        extra_node["audit-canaries"] = str(path)
        folder = write_site(audit_dir / "site", cfg, None, hospital)
    else:
        marks = make_canaries(canaries, size=IMAGE_SIZE, seed=seed, words=canary_words(before.tokenizer))
        folder = write_site(audit_dir / "site", cfg, marks, hospital)
        pixels = preprocess_images([load_image(folder / f"canaries/{i:05d}.png") for i in range(canaries)],
                                   before.vision.preprocess)
        probe = VQARows(pixels, marks.rows)
        loss_before = answer_losses(before, probe)
    start = before.trainable_state()
    results = []
    for name, policy, run_privacy in _variants(cfg):
        state_dir = audit_dir / "state" / str(len(results))
        node_config = {"hospital": f"audited-{hospital}", "data-path": str(folder), "state-dir": str(state_dir),
                       **extra_node, **policy}
        if policy["dp"] == "on":
            Ledger.init(state_dir, hospital=node_config["hospital"], budget=float(policy["epsilon"]),
                        delta=float(policy["delta"]), accountant=str(policy["accountant"]),
                        max_grad_norm=float(policy["max-grad-norm"]))
        log.info("audit: training %s (%s, %d %s canaries)", name,
                 "federated" if federated else "the hospital's update", canaries, kind)
        state = (_federate(preset, [*overrides, *run_privacy], load_config(preset, [*overrides, *run_privacy]),
                           node_config, audit_dir / f"run-{len(results)}") if federated
                 else _train_site(preset, overrides, cfg, node_config, before))
        attacks = ({"dirac": marks.scores(start, state)} if kind == "gradient"
                   else _attacks_input(cfg, marks, probe, loss_before, before, start, state))
        bounds = {name_: epsilon_lower_bound(s, marks.included, delta=cfg.privacy.delta,
                                             significance=significance / len(attacks))   # all tried: Bonferroni
                  for name_, s in attacks.items()}
        attack = max(bounds, key=lambda a: (bounds[a]["epsilon"], bounds[a]["correct"]))
        ledger = Ledger.open(state_dir, hospital=node_config["hospital"], budget=float(policy["epsilon"]),
                             delta=float(policy["delta"]), accountant=str(policy["accountant"]),
                             max_grad_norm=float(policy["max-grad-norm"])) if policy["dp"] == "on" else None
        scores = attacks[attack]
        results.append({"variant": name, "accountant_epsilon": ledger.epsilon if ledger else None,
                        "noise_multiplier": ledger.noise_multiplier if ledger else 0.0,
                        "lower_bound": {**bounds[attack], "attack": attack}, "bounds": bounds,
                        "auc": {a: _auc(s, marks.included) for a, s in attacks.items()},
                        "scores_in": scores[marks.included].tolist(), "scores_out": scores[~marks.included].tolist()})
        log.info("audit: %s: accountant epsilon %s, empirical lower bound %.2f (%s attack: %d of %d guesses right; "
                 "AUC %s)", name, f"{ledger.epsilon:.2f}" if ledger else "inf", bounds[attack]["epsilon"], attack,
                 bounds[attack]["correct"], bounds[attack]["guesses"],
                 ", ".join(f"{a} {v:.3f}" for a, v in results[-1]["auc"].items()))
    # the most any bound could be here: every guess right, the significance split as above
    ceiling = bound_ceiling(canaries, delta=cfg.privacy.delta, significance=significance / len(attacks))
    report = {"preset": preset, "overrides": list(overrides), "canaries": canaries, "kind": kind, "ceiling": ceiling,
              "federated": federated, "hospital": hospital, "delta": cfg.privacy.delta, "significance": significance,
              "results": results}
    write_text(audit_dir / "report.json", json.dumps(report, indent=1))
    plot(report, audit_dir / "audit.png")
    write_text(audit_dir / "README.md", card(report))
    from server.model_card import add_audit

    add_audit(out, report)   # a run folder's model card gets the audit's line
    if federated:            # and each audited federation's card the line of its own training
        for i, r in enumerate(results):
            add_audit(audit_dir / f"run-{i}", {**report, "results": [r]})
    return report


def _auc(scores: np.ndarray, included: np.ndarray) -> float:
    """P(an included canary scores above an excluded one): 0.5 is no signal."""
    a, b = scores[included], scores[~included]
    return float((a[:, None] > b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean()) if len(a) and len(b) \
        else 0.5


def card(report: dict) -> str:
    lines = ["# Empirical privacy audit (one training run; Steinke, Nasr & Jagielski 2023)", "",
             f"{report['canaries']} {report.get('kind', 'input')} canaries, each in {report['hospital']}'s training "
             f"{'steps' if report.get('kind') == 'gradient' else 'data'} with probability 1/2; "
             f"the attacker sees {'the global model of the federation' if report['federated'] else 'the hospital update'}. "
             f"Lower bounds hold with probability {1 - report['significance']:.2f} at delta = {report['delta']:g}; "
             f"with {report['canaries']} canaries no bound can exceed {report.get('ceiling', float('nan')):.2f} "
             "(every guess right).", "",
             "| training | accountant epsilon | empirical lower bound | attack: right guesses | AUC per attack |",
             "| --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        eps, lb = r["accountant_epsilon"], r["lower_bound"]
        lines.append(f"| {r['variant']} | {'inf (no DP)' if eps is None else f'{eps:.2f}'} | {lb['epsilon']:.2f} | "
                     f"{lb['attack']}: {lb['correct']} of {lb['guesses']} | "
                     f"{', '.join(f'{a} {v:.3f}' for a, v in r['auc'].items())} |")
    lines += ["", "A lower bound above the accountant's epsilon would mean the training leaked more than it claims. "
              "A bound below it finds no violation; it never proves privacy (a stronger attack may find more)."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, axes = plt.subplots(1, len(results) + 1, figsize=(4.2 * (len(results) + 1), 3.4))
    for ax, r in zip(axes, results):
        # the middle 99% sets the bins; the few beyond are counted in the edge bins (a tensor that barely
        # moves makes its canaries' scaled scores huge)
        lo, hi = np.percentile(r["scores_in"] + r["scores_out"], [0.5, 99.5])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 31)
        ax.hist(np.clip(r["scores_out"], lo, hi), bins=bins, alpha=0.6, label="excluded", color="tab:blue")
        ax.hist(np.clip(r["scores_in"], lo, hi), bins=bins, alpha=0.6, label="included", color="tab:red")
        ax.set(title=r["variant"], xlabel=f"score ({r['lower_bound']['attack']} attack)", ylabel="canaries")
        ax.legend(fontsize=7)
    ax = axes[-1]   # log scale: the accountant's epsilon runs to thousands, the bounds to a few
    names = ["DP" if "epsilon" in r["variant"] and "low" not in r["variant"] else
             "noise too low" if "low" in r["variant"] else "no DP" for r in results]
    x = np.arange(len(results))
    top = 1e4
    acc = [r["accountant_epsilon"] for r in results]
    ax.bar(x - 0.2, [min(a, top) if a is not None else top for a in acc], 0.4, label="accountant epsilon")
    for i, a in enumerate(acc):
        ax.text(x[i] - 0.2, min(a, top) * 1.15 if a is not None else top * 1.15,
                "inf" if a is None else f"{a:.3g}", ha="center", fontsize=7)
    lb = [max(r["lower_bound"]["epsilon"], 1e-2) for r in results]
    ax.bar(x + 0.2, lb, 0.4, label="empirical lower bound")
    for i, r in enumerate(results):
        ax.text(x[i] + 0.2, lb[i] * 1.15, f"{r['lower_bound']['epsilon']:.2f}", ha="center", fontsize=7)
    if report.get("ceiling"):
        ax.axhline(report["ceiling"], color="gray", ls="--", lw=1,
                   label=f"most {report['canaries']} canaries can show ({report['ceiling']:.1f})")
    ax.set_yscale("log")
    ax.set_ylim(1e-2, top * 1e4)   # room for the legend above the bars
    ax.set_xticks(x, names, fontsize=8)
    ax.set(title="epsilon: accountant vs audit", ylabel="epsilon (log)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
