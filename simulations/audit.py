"""``medvlm-fl audit``: the accountant's ε next to an empirical lower bound (``medvlm/audit.py``),
with training through the path a hospital runs: its data folder (with the canaries that were
drawn in), its node config and ledger, the ClientApp's DP-SGD and its egress guard. The attacker
sees the hospital's update (``--federated``: the federation's global model, the canaries at one
hospital) and tries two attacks, the significance split between them: how much more likely each
canary's answer became, and how well the update aligns with each canary's own gradient. Three
trainings, side by side: DP at the configured budget, DP with a budget so large
that the noise is far too low, and no DP: the last two show that the audit can see a leak.

    medvlm-fl audit [--config tiny] [--canaries 1000] [--federated] [--out DIR] [overrides ...]

Writes ``DIR/audit/``: ``report.json``, ``audit.png`` (score distributions of included and
excluded canaries, and the bound next to the accountant's ε) and ``README.md``.
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
    the canaries drawn in, all in its training split; every canary's image under ``canaries/``."""
    from PIL import Image

    from medvlm.data.synthetic import generate_hospital, split_images, write_manifest

    manifest = write_manifest(generate_hospital(hospital, cfg.data.images_per_hospital, seed=cfg.data.seed,
                                                hospital_only=cfg.data.hospital_only), folder)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    images = sorted({r["image"] for r in rows})
    val = {images[i] for i in split_images(len(images), val_fraction=cfg.data.val_fraction, test_fraction=0.0,
                                           seed=cfg.data.seed)["val"]}
    rows = [dict(r, split="val" if r["image"] in val else "train") for r in rows]
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
    from medvlm.model.vlm import build_medvlm
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


def run_audit(preset: str, overrides: Sequence[str], out: Path, *, canaries: int = 1000, federated: bool = False,
              seed: int = 0, significance: float = 0.05) -> dict:
    from client.ledger import Ledger
    from medvlm.audit import answer_losses, canary_words, epsilon_lower_bound, gradient_scores, make_canaries
    from medvlm.config import load_config
    from medvlm.data.dataset import VQARows, preprocess_images
    from medvlm.data.images import load_image
    from medvlm.data.synthetic import IMAGE_SIZE
    from medvlm.model.vlm import build_medvlm

    cfg = load_config(preset, list(overrides))
    audit_dir = Path(out) / "audit"
    audit_dir.mkdir(parents=True, exist_ok=True)
    before = build_medvlm(cfg.model, seed=cfg.federation.seed)
    marks = make_canaries(canaries, size=IMAGE_SIZE, seed=seed, words=canary_words(before.tokenizer))
    hospital = cfg.data.hospitals[0]
    folder = write_site(audit_dir / "site", cfg, marks, hospital)
    pixels = preprocess_images([load_image(folder / f"canaries/{i:05d}.png") for i in range(canaries)],
                               before.vision.preprocess)
    probe = VQARows(pixels, marks.rows)
    loss_before = answer_losses(before, probe)
    results = []
    for name, policy, run_privacy in _variants(cfg):
        state_dir = audit_dir / "state" / name.split(" ")[0].lower() / str(len(results))
        node_config = {"hospital": f"audited-{hospital}", "data-path": str(folder), "state-dir": str(state_dir),
                       **policy}
        if policy["dp"] == "on":
            Ledger.init(state_dir, hospital=node_config["hospital"], budget=float(policy["epsilon"]),
                        delta=float(policy["delta"]), accountant=str(policy["accountant"]),
                        max_grad_norm=float(policy["max-grad-norm"]))
        log.info("audit: training %s (%s)", name, "federated" if federated else "the hospital's update")
        state = (_federate(preset, [*overrides, *run_privacy], load_config(preset, [*overrides, *run_privacy]),
                           node_config, audit_dir / f"run-{len(results)}") if federated
                 else _train_site(preset, overrides, cfg, node_config, before))
        after = build_medvlm(cfg.model, seed=cfg.federation.seed)
        after.load_trainable_state(state)
        start = before.trainable_state()
        attacks = {   # what the attacker sees: how much more likely each canary's answer became, and
            # how well the update aligns with each canary's own gradient (white-box: the update is sent)
            "loss": loss_before - answer_losses(after, probe),
            "gradient": gradient_scores(before, {k: state[k] - start[k] for k in state}, probe)}
        bounds = {name_: epsilon_lower_bound(s, marks.included, delta=cfg.privacy.delta,
                                             significance=significance / len(attacks))   # both tried: Bonferroni
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
                 "AUC loss %.3f, gradient %.3f)", name, f"{ledger.epsilon:.2f}" if ledger else "inf",
                 bounds[attack]["epsilon"], attack, bounds[attack]["correct"], bounds[attack]["guesses"],
                 results[-1]["auc"]["loss"], results[-1]["auc"]["gradient"])
    report = {"preset": preset, "overrides": list(overrides), "canaries": canaries, "federated": federated,
              "hospital": hospital, "delta": cfg.privacy.delta, "significance": significance, "results": results}
    (audit_dir / "report.json").write_text(json.dumps(report, indent=1))
    plot(report, audit_dir / "audit.png")
    (audit_dir / "README.md").write_text(card(report))
    return report


def _auc(scores: np.ndarray, included: np.ndarray) -> float:
    """P(an included canary scores above an excluded one): 0.5 is no signal."""
    a, b = scores[included], scores[~included]
    return float((a[:, None] > b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean()) if len(a) and len(b) \
        else 0.5


def card(report: dict) -> str:
    lines = ["# Empirical privacy audit (one training run; Steinke, Nasr & Jagielski 2023)", "",
             f"{report['canaries']} canaries, each in {report['hospital']}'s training data with probability 1/2; "
             f"the attacker sees {'the global model of the federation' if report['federated'] else 'the hospital update'}. "
             f"Lower bounds hold with probability {1 - report['significance']:.2f} at delta = {report['delta']:g}.", "",
             "| training | accountant epsilon | empirical lower bound | attack: right guesses | AUC (loss / gradient) |",
             "| --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        eps, lb = r["accountant_epsilon"], r["lower_bound"]
        lines.append(f"| {r['variant']} | {'inf (no DP)' if eps is None else f'{eps:.2f}'} | {lb['epsilon']:.2f} | "
                     f"{lb['attack']}: {lb['correct']} of {lb['guesses']} | {r['auc']['loss']:.3f} / "
                     f"{r['auc']['gradient']:.3f} |")
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
        bins = np.histogram_bin_edges(r["scores_in"] + r["scores_out"], bins=30)
        ax.hist(r["scores_out"], bins=bins, alpha=0.6, label="excluded", color="tab:blue")
        ax.hist(r["scores_in"], bins=bins, alpha=0.6, label="included", color="tab:red")
        ax.set(title=r["variant"], xlabel=f"score ({r['lower_bound']['attack']} attack)", ylabel="canaries")
        ax.legend(fontsize=7)
    ax = axes[-1]
    names = ["DP" if "epsilon" in r["variant"] and "low" not in r["variant"] else
             "noise too low" if "low" in r["variant"] else "no DP" for r in results]
    x = np.arange(len(results))
    acc = [r["accountant_epsilon"] for r in results]
    ax.bar(x - 0.2, [min(a, 50) if a is not None else 50 for a in acc], 0.4, label="accountant epsilon (capped at 50)")
    for i, a in enumerate(acc):
        if a is None or a > 50:
            ax.text(x[i] - 0.2, 51, "inf" if a is None else f"{a:.0f}", ha="center", fontsize=7)
    ax.bar(x + 0.2, [r["lower_bound"]["epsilon"] for r in results], 0.4, label="empirical lower bound")
    ax.set_xticks(x, names, fontsize=8)
    ax.set(title="epsilon", ylabel="epsilon")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
