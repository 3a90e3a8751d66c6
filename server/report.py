"""Round records: each round's record and the privacy block (built here from what the round
returned), ``metrics.jsonl`` (one object per round), a live console table, PNG plots and the final
``summary.json``, all in the run folder and all rewritten after every round (a killed run still has
its figures up to the last completed round)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from medvlm.metrics import REPORT_KEYS, pct, scores
from medvlm.runs import write_json

if TYPE_CHECKING:
    from flwr.app import MetricRecord

    from server.strategy import RoundReport

log = logging.getLogger("medvlm.server")


def eval_block(counts: dict) -> dict:
    """Model and baseline scores from summed counts (``baseline/`` keys are the baseline's):
    accuracies for VQA counts, BLEU-4 / ROUGE-L / finding-F1 for report counts."""
    model = {k: v for k, v in counts.items() if not k.startswith("baseline/")}
    base = {k[len("baseline/"):]: v for k, v in counts.items() if k.startswith("baseline/")}
    return {"model": scores(model), "baseline": scores(base)}


def headline(r: dict) -> tuple[str, Optional[float], Optional[float]]:
    """(metric name, model, baseline) a round is summarised by: accuracy (VQA) or finding-F1 (reports)."""
    if r.get("accuracy") is None and r.get("finding_f1") is not None:
        return "finding-F1", r["finding_f1"], r.get("baseline_finding_f1")
    return "accuracy", r.get("accuracy"), r.get("baseline_accuracy")


class RoundLog:
    HEADER = f"{'round':>5} {'stage':>10} {'metric':>10} {'model':>7} {'baseline':>9} {'loss':>7} {'max eps':>8} " \
             f"{'trained':>8} {'rejected':>8} {'KB up':>8} {'sec':>6}"

    def __init__(self, run_dir: Path, records: Optional[list[dict]] = None):
        self.run_dir = run_dir
        self.records = list(records or [])
        self._printed_header = False

    def add(self, record: dict) -> None:
        self.records.append(record)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        self.print_row(record)
        try:
            self.plot()
        except Exception as err:  # a plotting problem must never stop a federation
            log.warning("could not draw plots: %s", err)

    def rewrite(self) -> None:
        """metrics.jsonl from the records kept in the server state (after a resume)."""
        with open(self.run_dir / "metrics.jsonl", "w") as f:
            for record in self.records:
                f.write(json.dumps(record, default=float) + "\n")

    def print_row(self, r: dict) -> None:
        if not self._printed_header:
            print(self.HEADER, flush=True)
            self._printed_header = True
        eps = [v for v in r["epsilon"].values() if v is not None]
        trained = sum(1 for h in r["hospitals"].values() if h.get("status") == "trained")
        loss = "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}"
        metric, model, base = headline(r)
        print(f"{r['round']:>5} {str(r.get('stage', '-'))[:10]:>10} {metric:>10} {pct(model):>7} {pct(base):>9} {loss:>7} "
              f"{(max(eps) if eps else 0):>8.2f} {trained:>8} {len(r['rejected']):>8} "
              f"{r['bytes_up'] / 1024:>8.0f} {r['seconds']:>6.1f}", flush=True)

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in self.records]
        reports = any(r.get("bleu4") is not None for r in self.records)
        answers = any(r.get("accuracy") is not None for r in self.records) or not reports
        # a report-only run has no accuracy panel, a VQA-only run no report panel
        typed = [r for r in self.records if r.get("per_qtype")]
        names = ["accuracy"] * answers + ["reports"] * reports + ["loss", "epsilon"] + ["qtypes"] * bool(typed)
        fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4.2))
        panel = dict(zip(names, axes))
        ax_acc, ax_rep, ax_loss, ax_eps = (panel.get(n) for n in ("accuracy", "reports", "loss", "epsilon"))
        if typed:
            self._plot_qtypes(panel["qtypes"], typed[0], typed[-1])
        for key, label, style in (("accuracy", "global model", "o-"), ("closed_accuracy", "closed", "s--"),
                                  ("open_accuracy", "open", "^--"),
                                  ("baseline_accuracy", "per-question majority", "k:")):
            ys = [r.get(key) for r in self.records]
            if ax_acc is not None and any(y is not None for y in ys):
                ax_acc.plot(rounds, [float("nan") if y is None else 100 * y for y in ys], style, label=label)
        if ax_acc is not None:
            ax_acc.set(title="federated validation accuracy", xlabel="round", ylabel="accuracy (%)")
            if ax_acc.get_legend_handles_labels()[0]:
                ax_acc.legend(fontsize=8)
        ax_loss.plot(rounds, [float("nan") if r["train_loss"] is None else r["train_loss"] for r in self.records], "o-")
        ax_loss.set(title="mean local training loss", xlabel="round", ylabel="loss")
        losses = [r["train_loss"] for r in self.records if r["train_loss"] is not None]
        if losses:   # a cross-entropy: from 0, so a flat curve does not look like a swing
            ax_loss.set_ylim(0, 1.1 * max(losses))
        names = sorted({h for r in self.records for h in r["epsilon"]})
        for name in names:
            ax_eps.plot(rounds, [r["epsilon"].get(name, 0.0 if r["round"] == 0 else float("nan"))
                                 for r in self.records], "o-", label=name)
        budgets = {b for r in self.records for b in r.get("budget", {}).values() if b}
        for b in budgets:
            ax_eps.axhline(b, color="red", linestyle=":", linewidth=1)
        ax_eps.set(title="privacy spent per hospital (red: budget)", xlabel="round", ylabel="epsilon")
        ax_eps.set_ylim(bottom=0)
        if names:
            ax_eps.legend(fontsize=8)
        if ax_rep is not None:
            for (key, label), colour in zip((("bleu4", "BLEU-4"), ("rouge_l", "ROUGE-L"), ("finding_f1", "finding-F1")),
                                            ("tab:blue", "tab:orange", "tab:green")):
                ys = [r.get(key) for r in self.records]
                base = [r.get(f"baseline_{key}") for r in self.records]
                ax_rep.plot(rounds, [float("nan") if y is None else 100 * y for y in ys], "o-", color=colour, label=label)
                ax_rep.plot(rounds, [float("nan") if y is None else 100 * y for y in base], ":", color=colour,
                            label=f"{label}, most common report")
            ax_rep.set(title="report generation (validation)", xlabel="round", ylabel="score (%)")
            ax_rep.legend(fontsize=7)
        stage_starts = [(r["round"], r["stage"]) for i, r in enumerate(self.records)
                        if r.get("stage") and (i == 0 or r["stage"] != self.records[i - 1].get("stage"))]
        for ax in (a for n, a in panel.items() if n != "qtypes"):
            ax.grid(alpha=0.3)
            ax.set_xticks(rounds)
            if len(stage_starts) > 1:   # a curriculum: mark where each stage starts
                for start, name in stage_starts[1:]:
                    ax.axvline(start - 0.5, color="grey", linestyle="--", linewidth=1)
                    ax.text(start - 0.45, 0.98, name, transform=ax.get_xaxis_transform(), fontsize=7, va="top")
        fig.tight_layout()
        path = self.run_dir / "plots.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    @staticmethod
    def _plot_qtypes(ax, first: dict, last: dict) -> None:
        """Accuracy per question type: the first evaluated round against the last, with the
        per-question majority's mark: which questions the federation learned, which it answers with
        the majority, which no round answers."""
        qtypes = sorted(last["per_qtype"], reverse=True)
        ys = range(len(qtypes))
        ax.barh([y + 0.2 for y in ys], [100 * first["per_qtype"].get(q, float("nan")) for q in qtypes], height=0.4,
                color="tab:gray", alpha=0.6, label=f"round {first['round']}")
        ax.barh([y - 0.2 for y in ys], [100 * last["per_qtype"][q] for q in qtypes], height=0.4, color="tab:blue",
                label=f"round {last['round']}")
        base = last.get("baseline_per_qtype") or {}
        ax.scatter([100 * base[q] for q in qtypes if q in base], [y for y, q in zip(ys, qtypes) if q in base],
                   marker="|", s=200, color="black", zorder=3, label="per-question majority")
        ax.set_yticks(list(ys), qtypes, fontsize=7)
        ax.set(title="accuracy by question type", xlabel="accuracy (%)", xlim=(0, 100),
               ylim=(-0.6, len(qtypes) + 0.9))
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=7, loc="upper center", ncol=3, frameon=False, handlelength=1, columnspacing=1)


def build_summary(records: list[dict], privacy: dict, *, trainable: int, dp: bool, wall_seconds: float,
                  stopped: str) -> dict:
    """``summary.json``: the core's keys for the last evaluated round, plus the federation's."""
    evaluated = [r for r in records if r.get("accuracy") is not None or r.get("finding_f1") is not None]
    last = evaluated[-1] if evaluated else (records[-1] if records else {})
    sent = [h["bytes_up"] for r in records for h in r["hospitals"].values() if h.get("bytes_up")]
    epsilon = {name: p["epsilon"] for name, p in privacy.items()}
    return {
        "final_accuracy": last.get("accuracy"), "closed_accuracy": last.get("closed_accuracy"),
        "open_accuracy": last.get("open_accuracy"), "open_recall": last.get("open_recall"),
        "baseline_accuracy": last.get("baseline_accuracy"),
        "baseline_closed_accuracy": last.get("baseline_closed_accuracy"),
        "baseline_open_accuracy": last.get("baseline_open_accuracy"),
        "per_qtype": last.get("per_qtype"), "baseline_per_qtype": last.get("baseline_per_qtype"),
        "eval_questions": last.get("eval_questions"), "evaluated_round": last.get("round"),
        "initial_accuracy": records[0].get("accuracy") if records and records[0]["round"] == 0 else None,
        "dp": dp, "delta": next(iter(privacy.values()))["delta"] if privacy else None,
        "rounds": sum(1 for r in records if r["round"] > 0), "hospitals": sorted({h for r in records for h in r["hospitals"]}),
        "epsilon": epsilon, "privacy": privacy,
        "bytes_sent_per_round": (sum(sent) / len(sent)) if sent else 0,
        "bytes_received_per_round": (sum(r["bytes_down"] for r in records) / max(1, sum(
            len(r["hospitals"]) + len(r["failed"]) for r in records))) if records else 0,
        "train_loss": last.get("train_loss"), "trainable_parameters": trainable,
        "rejected_updates": sum(len(r["rejected"]) for r in records),
        "failed_replies": sum(len(r["failed"]) for r in records),
        "stopped": stopped, "wall_seconds": wall_seconds,
        "task": last.get("task", "vqa"), "stage": last.get("stage"),
        **{k: last.get(k) for k in REPORT_KEYS}, **{f"baseline_{k}": last.get(f"baseline_{k}") for k in REPORT_KEYS},
        "per_finding": last.get("per_finding"), "baseline_per_finding": last.get("baseline_per_finding"),
        "eval_reports": last.get("eval_reports"),
        "stages": stage_results(records),
    }


def stage_results(records: list[dict]) -> list[dict]:
    """Each curriculum stage's rounds and its last evaluated figures (one entry without stages)."""
    out: dict[str, dict] = {}
    keys = ("accuracy", "baseline_accuracy", "closed_accuracy", "open_accuracy") + REPORT_KEYS + \
        tuple(f"baseline_{k}" for k in REPORT_KEYS)
    for r in records:
        if r["round"] == 0 or not r.get("stage"):
            continue
        entry = out.setdefault(r["stage"], {"stage": r["stage"], "task": r.get("task"), "rounds": []})
        entry["rounds"].append(r["round"])
        if r.get("accuracy") is not None or r.get("finding_f1") is not None:
            entry.update({k: r.get(k) for k in keys if r.get(k) is not None}, evaluated_round=r["round"])
    return list(out.values())


def write_summary(run_dir: Path, summary: dict) -> Path:
    path = run_dir / "summary.json"
    write_json(path, summary)
    return path


# ----------------------------------------------------------------------------- one round's record
def round_record(server_round: int, report: RoundReport, train: Optional[MetricRecord],
                 evaluation: Optional[MetricRecord], privacy: dict, seconds: float) -> dict:
    """One line of metrics.jsonl: aggregate figures only."""
    record: dict = {"round": server_round, "train_loss": float(train["train_loss"]) if train and "train_loss" in train
                    else None}
    record.update(accuracy=None, baseline_accuracy=None)
    if evaluation is not None:
        ev = eval_block(dict(evaluation))
        model, base = ev["model"], ev["baseline"]
        if "accuracy" in model:
            record.update({k: model[k] for k in ("accuracy", "closed_accuracy", "open_accuracy", "open_recall")})
            record.update({f"baseline_{k}": base.get(k) for k in ("accuracy", "closed_accuracy", "open_accuracy")})
            record.update(per_qtype=model["per_qtype"], baseline_per_qtype=base.get("per_qtype"),
                          eval_questions={"closed": model["closed_total"], "open": model["open_total"]})
        if "bleu4" in model:
            record.update({k: model[k] for k in REPORT_KEYS})
            record.update({f"baseline_{k}": base.get(k) for k in REPORT_KEYS})
            record.update(per_finding=model["per_finding"], baseline_per_finding=base.get("per_finding"),
                          eval_reports=model["report_total"])
    record.update({
        "epsilon": {name: p["epsilon"] for name, p in privacy.items()},
        "budget": {name: p.get("budget") for name, p in privacy.items()},
        "examples": {name: h.get("num-examples") for name, h in report.hospitals.items()},
        "hospitals": report.hospitals, "rejected": report.rejected, "failed": report.failed,
        "evaluated_hospitals": sorted(report.evaluation), "evaluation_asked": report.evaluation_asked,
        "not_evaluated": dict(report.not_evaluated),   # hospitals whose own policy refuses to score
        "bytes_up": sum(h.get("bytes_up", 0) for h in report.hospitals.values()),
        "bytes_down": report.bytes_down, "bytes_down_evaluate": report.bytes_down_evaluate, "seconds": seconds,
    })
    return record


def update_privacy(privacy: dict, report: RoundReport, delta: float) -> dict:
    """Keep each hospital's latest privacy report with its mechanisms as its ledger states them
    (noise multiplier, sample rate, steps per stage): exactly what recomputes its epsilon, whatever
    rounds were resent, lost or resumed."""
    for name, h in report.hospitals.items():
        if "epsilon" not in h:
            continue
        previous = privacy.get(name, {})
        mechanisms = h.get("mechanisms", previous.get("mechanisms", []))
        sigma = h.get("noise_multiplier", previous.get("noise_multiplier"))
        rate = h.get("sample_rate", previous.get("sample_rate"))
        if len({(m["noise_multiplier"], m["sample_rate"]) for m in mechanisms}) > 1:
            # several stages, several mechanisms: one (sigma, q) beside the total steps would recompute
            # a wrong epsilon, so only ``mechanisms`` states them
            sigma = rate = None
        privacy[name] = {
            "epsilon": h["epsilon"], "delta": h.get("delta", delta), "budget": h.get("budget"),
            "noise_multiplier": sigma, "sample_rate": rate,
            "steps": int(h.get("total_steps", previous.get("steps", 0))),
            "max_grad_norm": h.get("max_grad_norm", previous.get("max_grad_norm")),
            "accountant": h.get("accountant", previous.get("accountant")),
            "mechanisms": mechanisms,
        }
    return privacy


def central_releases(records: list[dict]) -> int:
    """Noisy aggregates released so far (a resumed run keeps counting)."""
    return max([r["central_dp"]["releases"] for r in records if r.get("central_dp")] or [0])


def central_dp_block(cfg, releases: int) -> dict:
    """Client-level (hospital-level) privacy of the released global states: the Gaussian mechanism
    on a clipped equal-weight mean, once per round, every hospital in every round (no sampling
    amplification), composed with the RDP accountant."""
    from medvlm.privacy import epsilon

    if cfg.noise_multiplier == 0:
        eps = None if releases else 0.0    # clipping without noise bounds influence but gives no epsilon
    else:
        eps = epsilon([(cfg.noise_multiplier, 1.0, releases)], delta=cfg.delta)
    return {"level": "hospital", "noise_multiplier": cfg.noise_multiplier, "clipping_norm": cfg.clipping_norm,
            "releases": releases, "sample_rate": 1.0, "delta": cfg.delta, "epsilon": eps, "accountant": "rdp"}
