"""The model card a run's exported adapter carries: ``<run>/global/README.md``.

Written from the run's config and ``summary.json`` when a federation ends (and again when it is
resumed and ends), so the folder a coordinator hands to hospitals says what it is: the base
models it needs, what was trained and how big it is, who trained it and how, each hospital's
privacy guarantee, what it scored next to the trivial baseline, and what it must not be used for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from medvlm.config import ExperimentConfig, stages
from medvlm.files import write_text
from medvlm.metrics import pct

INTENDED_USE = """\
Research on federated, differentially private adaptation of medical vision-language models:
answering questions about, or drafting findings reports for, images like the ones the hospitals
trained on. Every output is a draft for a qualified clinician to check."""

LIMITATIONS = """\
- Not a medical device and not validated for clinical use: do not use its answers or reports to
  diagnose, triage or treat anyone.
- Trained and evaluated only on the hospitals' own data (listed above); the figures are validation
  figures on the same hospitals, not on an external population. Expect worse results on other
  scanners, protocols, populations and languages.
- BLEU-4 and ROUGE-L measure word overlap, not clinical correctness; finding-F1 depends on the
  labeler named above and only covers the findings it knows.
- Differential privacy bounds what the released weights reveal about any one training example
  (per hospital, at the epsilon and delta stated); it does not make the model's outputs correct,
  and it does not cover the hospitals' validation counts, which are released without noise.
- The adapter only works on the exact base models named above (checked when loaded)."""


def _score_rows(summary: dict) -> list[str]:
    rows = []
    for key, label in (("final_accuracy", "accuracy"), ("closed_accuracy", "closed accuracy"),
                       ("open_accuracy", "open accuracy (exact)")):
        if summary.get(key) is not None:
            base = summary.get("baseline_" + key.removeprefix("final_"))
            rows.append(f"| {label} | {pct(summary[key])} | {pct(base)} (per-question majority) |")
    for key, label in (("bleu4", "BLEU-4"), ("rouge_l", "ROUGE-L"), ("finding_f1", "finding-F1")):
        if summary.get(key) is not None:
            rows.append(f"| {label} | {pct(summary[key])} | {pct(summary.get('baseline_' + key))} "
                        "(most common training report) |")
    return rows


def model_card(cfg: ExperimentConfig, summary: dict, *, trainable_parts: dict) -> str:
    m, fed, p = cfg.model, cfg.federation, cfg.privacy
    total = sum(part["parameters"] for part in trainable_parts.values())
    lines = [
        "# medvlm-fl adapter: federated, differentially private fine-tune", "",
        "LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`, loadable with "
        f"`peft.PeftModel.from_pretrained`) and {'query-transformer' if m.fusion.kind == 'qformer' else 'MLP projector'} "
        "fusion weights (`fusion.safetensors`) "
        "for a frozen-encoder medical vision-language model. Use it with `medvlm-fl answer` / `medvlm-fl report "
        "--run <run folder>`.", "",
        "## Base models (frozen, not included)", "",
        f"- vision encoder: `{m.vision.source}` (open_clip; patch tokens)",
        f"- language model: `{m.language.source}` ({m.language.dtype})",
        f"- adapter start: `{m.init}`", "",
        "## Trainable parts", "",
        "| part | tensors | parameters |", "| --- | ---: | ---: |",
    ]
    for name, part in sorted(trainable_parts.items()):
        lines.append(f"| {name} | {part['tensors']} | {part['parameters']:,} |")
    lines += [f"| **total** | | **{total:,}** |", "",
              f"Fusion: {m.fusion.kind}, {m.fusion.num_queries} queries, width {m.fusion.dim}, {m.fusion.layers} "
              f"layer(s). LoRA: rank {m.lora.r}, alpha {m.lora.alpha} on {', '.join(m.lora.target_modules)}"
              f"{' (FFA-LoRA: A frozen, only B trained)' if m.lora.ffa else ''}.", "",
              "## Federation", "",
              f"- hospitals: {', '.join(summary.get('hospitals') or []) or '-'}",
              f"- rounds: {summary.get('rounds')} ({summary.get('stopped')})",
              f"- aggregation: {fed.aggregation}, transport {fed.transport}, secure aggregation "
              f"{fed.secure_aggregation}, central DP {'on' if fed.central_dp.enabled else 'off'}",
              f"- data: {cfg.data.source}" + (f" ({cfg.data.format})" if cfg.data.source != "synthetic" else ""), ""]
    plan = stages(cfg)
    lines += ["| stage | rounds | task | trains | lr | local epochs |", "| --- | --- | --- | --- | ---: | ---: |"]
    for s in plan:
        task = s.task + (f" ({', '.join(s.qtypes)})" if s.qtypes else "")
        lines.append(f"| {s.name} | {s.first_round}-{s.last_round} | {task} | {' + '.join(s.trainable)} | {s.lr:g} "
                     f"| {s.local_epochs:g} |")
    lines += ["", "## Privacy", ""]
    if not p.enabled:
        lines.append("Trained **without** differential privacy: the weights may reveal training examples.")
    else:
        lines += [f"Example-level DP-SGD (Opacus) at every hospital, clipping norm {p.max_grad_norm:g}, "
                  f"Poisson sampling, {p.accountant.upper()} accountant; each hospital's own ledger refuses rounds "
                  "past its budget.", "",
                  "| hospital | epsilon | delta | budget | mechanism (noise multiplier, sample rate, steps) |",
                  "| --- | ---: | ---: | ---: | --- |"]
        for name, h in sorted((summary.get("privacy") or {}).items()):
            mech = "; ".join(f"{x['stage']}: {x['noise_multiplier']:.3f}, {x['sample_rate']:.4f}, {x['steps']}"
                             for x in h.get("mechanisms") or []) or \
                f"{h.get('noise_multiplier')}, {h.get('sample_rate')}, {h.get('steps')}"
            lines.append(f"| {name} | {h['epsilon']:.2f} | {h['delta']:g} | {h.get('budget')} | {mech} |")
    if summary.get("central_dp"):
        c = summary["central_dp"]
        lines += ["", f"Hospital-level central DP on top: noise multiplier {c['noise_multiplier']:g}, clipping "
                      f"{c['clipping_norm']:g}, {c['releases']} releases, epsilon {c['epsilon']} at delta {c['delta']:g}."]
    lines += ["", f"## Evaluation (round {summary.get('evaluated_round')}, hospitals' validation splits, summed)", "",
              "| metric | this adapter | trivial baseline |", "| --- | ---: | ---: |", *_score_rows(summary)]
    if summary.get("finding_f1") is not None:
        lines += ["", f"Finding labels from the `{cfg.data.labeler}` labeler (presence, side, count)."]
    if len(plan) > 1:
        lines += ["", "Per stage (last evaluated round of each):", ""]
        for s in summary.get("stages") or []:
            figures = ", ".join(f"{label} {pct(s[k])} (baseline {pct(s.get('baseline_' + k))})" for k, label in (
                ("accuracy", "accuracy"), ("bleu4", "BLEU-4"), ("rouge_l", "ROUGE-L"), ("finding_f1", "finding-F1"))
                if s.get(k) is not None)
            lines.append(f"- {s['stage']} ({s['task']}, rounds {s['rounds'][0]}-{s['rounds'][-1]}): {figures or '-'}")
    lines += ["", "## Intended use", "", INTENDED_USE, "", "## Limitations", "", LIMITATIONS, ""]
    return "\n".join(lines)


AUDIT_HEADING = "## Privacy audit"


def audit_section(report: dict) -> list[str]:
    """The card's lines for an empirical audit (``medvlm-fl audit``'s report.json)."""
    lines = [AUDIT_HEADING, "",
             f"`medvlm-fl audit` ({report['canaries']} {report.get('kind', 'input')} canaries at {report['hospital']}, "
             f"the attacker seeing {'the global model' if report.get('federated') else 'the hospital update'}; "
             f"95% lower bounds at delta {report['delta']:g}, at most {report.get('ceiling', float('nan')):.2f} "
             "with these canaries): " + "; ".join(
                 f"{r['variant']}: accountant epsilon "
                 f"{'inf' if r['accountant_epsilon'] is None else format(r['accountant_epsilon'], '.4g')}, "
                 f"empirical lower bound {r['lower_bound']['epsilon']:.2f}" for r in report["results"]) + ". "
             "A bound above the accountant's epsilon would refute it; a bound below it finds no leak and proves "
             "nothing. See `audit/README.md`.", ""]
    return lines


def _with_audit(card: str, report: Optional[dict]) -> str:
    """``card`` with its audit section replaced (or put before the intended use), or removed."""
    head, sep, tail = card.partition(AUDIT_HEADING)
    if sep:
        rest = tail.split("\n## ", 1)
        card = head + ("## " + rest[1] if len(rest) > 1 else "")
    if report is None:
        return card
    head, sep, tail = card.partition("## Intended use")
    return head + "\n".join(audit_section(report)) + "\n" + sep + tail


def _audit_report(run_dir: Path) -> Optional[dict]:
    path = Path(run_dir) / "audit" / "report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_model_card(run_dir: Path, cfg: ExperimentConfig, summary: dict, *, trainable_parts: dict) -> Optional[Path]:
    """``<run>/global/README.md`` (atomically); None when the run has no exported adapter yet. An audit
    of the run's configuration in ``<run>/audit/`` gets its line."""
    target = Path(run_dir) / "global"
    if not target.is_dir():
        return None
    card = model_card(cfg, summary, trainable_parts=trainable_parts)
    return write_text(target / "README.md", _with_audit(card, _audit_report(run_dir)))


def add_audit(run_dir: Path, report: dict) -> Optional[Path]:
    """Put an audit's line into the card of ``run_dir`` (if it has one): the audit writes after the run."""
    path = Path(run_dir) / "global" / "README.md"
    if not path.is_file():
        return None
    return write_text(path, _with_audit(path.read_text(), report))
