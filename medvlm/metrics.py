"""Med-VQA metrics that do not over-count.

The widely copied Med-VQA scoring script (a) drops closed questions answered with something
other than yes/no from the denominator and (b) matches by substring, so "no" scores inside
"normal". Here: every question stays in its denominator; closed questions score by exact
match after normalisation; open questions by exact match and by token recall, reported
separately; and the per-question-majority baseline (from the training split) is scored with
the same function, so the two figures are comparable.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Iterable, Mapping, Optional, Sequence

_PUNCT = re.compile(r"[^\w\s\-]")
_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}


def pct(value: Optional[float]) -> str:
    """A fraction as a percentage with one decimal; "-" when there is none."""
    return "-" if value is None else f"{100 * value:.1f}%"


def normalize(text: str) -> str:
    """Lower-case, drop punctuation except hyphens, number words -> digits, collapse spaces."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words)


def token_recall(prediction: str, reference: str) -> float:
    """Fraction of the reference's tokens (with multiplicity) that the prediction contains."""
    ref = Counter(normalize(reference).split())
    if not ref:
        return 0.0
    pred = Counter(normalize(prediction).split())
    return sum(min(c, pred[t]) for t, c in ref.items()) / sum(ref.values())


def vqa_counts(predictions: Sequence[str], rows: Sequence[Mapping]) -> dict:
    """Aggregate counts only (safe to leave a site): correct/total per answer type and qtype."""
    if len(predictions) != len(rows):
        raise ValueError(f"{len(predictions)} predictions for {len(rows)} rows")
    c: dict = defaultdict(float)
    for pred, row in zip(predictions, rows):
        accepted = [row["answer"], *row.get("alternatives", ())]   # a release's other accepted answers (a#b)
        hit = float(normalize(pred) in {normalize(a) for a in accepted})
        kind = row["answer_type"]
        c[f"{kind}_correct"] += hit
        c[f"{kind}_total"] += 1
        c[f"qtype/{row.get('qtype', 'all')}_correct"] += hit
        c[f"qtype/{row.get('qtype', 'all')}_total"] += 1
        if kind == "open":
            c["open_recall_sum"] += max(token_recall(pred, a) for a in accepted)
    return dict(c)


def merge_counts(counts: Iterable[Mapping[str, float]]) -> dict:
    total: dict = defaultdict(float)
    for c in counts:
        for k, v in c.items():
            total[k] += v
    return dict(total)


def accuracies(counts: Mapping[str, float]) -> dict:
    """Accuracies from counts; a type with no questions is reported as None, not 0 or 1."""
    ratio = lambda a, b: (counts.get(a, 0.0) / counts[b]) if counts.get(b) else None  # noqa: E731
    n_closed, n_open = counts.get("closed_total", 0.0), counts.get("open_total", 0.0)
    out = {
        "accuracy": ((counts.get("closed_correct", 0.0) + counts.get("open_correct", 0.0)) / (n_closed + n_open))
        if n_closed + n_open else None,
        "closed_accuracy": ratio("closed_correct", "closed_total"),
        "open_accuracy": ratio("open_correct", "open_total"),
        "open_recall": ratio("open_recall_sum", "open_total"),
        "closed_total": int(n_closed),
        "open_total": int(n_open),
    }
    out["per_qtype"] = {k[len("qtype/"):-len("_total")]: counts[k.replace("_total", "_correct")] / v
                        for k, v in sorted(counts.items()) if k.startswith("qtype/") and k.endswith("_total") and v}
    return out


def score(predictions: Sequence[str], rows: Sequence[Mapping]) -> dict:
    return accuracies(vqa_counts(predictions, rows))


# ----------------------------------------------------------------------------- baseline
def majority_answers(train_rows: Sequence[Mapping]) -> dict:
    """The most common training answer per normalised question (ties: alphabetical), with
    per-answer-type fallbacks for questions never seen in training."""
    per_q: dict[str, Counter] = defaultdict(Counter)
    per_type: dict[str, Counter] = defaultdict(Counter)
    for r in train_rows:
        per_q[normalize(r["question"])][normalize(r["answer"])] += 1
        per_type[r["answer_type"]][normalize(r["answer"])] += 1
    return {"question": {q: _most_common(c) for q, c in per_q.items()},
            "type": {t: _most_common(c) for t, c in per_type.items()}}


def _most_common(counter: Counter) -> str:
    """The most frequent key (ties: alphabetical, so the baseline is deterministic)."""
    return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


def baseline_predictions(majority: Mapping, rows: Sequence[Mapping]) -> list[str]:
    return [majority["question"].get(normalize(r["question"]), majority["type"].get(r["answer_type"], ""))
            for r in rows]


# ----------------------------------------------------------------------------- report generation
# A hospital reports sufficient statistics, never texts: BLEU's n-gram matches and lengths
# (sacrebleu), the sum of per-report ROUGE-L F-measures (Google's rouge-score) and per-finding
# true/false positives/negatives from a labeler. Summed over hospitals they give the corpus BLEU-4,
# the mean ROUGE-L and the micro finding-F1 of the whole federation's validation reports.
NO_FINDING = "no finding"
REPORT_KEYS = ("bleu4", "rouge_l", "finding_f1", "finding_precision", "finding_recall")
_COUNT = r"(no|one|two|three|four|five|a|an|single|multiple|several|\d+)"


def synthetic_labeler(text: str) -> set[str]:
    """Rule-based finding labels for the synthetic reports (presence, side, count), the miniature of
    a CheXbert-style labeler: ``nodule``, ``nodule:left``, ``nodule:count=2``, ``effusion``,
    ``effusion:right``, ``cardiomegaly``; ``no finding`` when none. Negations ("no nodules",
    "no pleural effusion") are not findings."""
    t = " " + _PUNCT.sub(" ", text.lower()) + " "
    labels: set[str] = set()
    for m in re.finditer(rf"\b{_COUNT}?\s*(pulmonary\s+)?nodules?\b(\s+(in|within|of)\s+the\s+(left|right)\s+lung)?", t):
        count, side = m.group(1), m.group(5)
        if count == "no":
            continue
        labels.add("nodule")
        if side:
            labels.add(f"nodule:{side}")
        number = {"a": "1", "an": "1", "single": "1"}.get(count or "", _NUMBERS.get(count or "", count or ""))
        if number.isdigit():
            labels.add(f"nodule:count={int(number)}")
    for m in re.finditer(r"\b(no\s+|left\s+|right\s+)?(pleural\s+)?effusions?\b", t):
        qualifier = (m.group(1) or "").strip()
        if qualifier == "no":
            continue
        labels.add("effusion")
        if qualifier:
            labels.add(f"effusion:{qualifier}")
    if re.search(r"\b(heart is enlarged|enlarged heart|cardiomegaly|heart is large)\b", t) and \
            not re.search(r"\bno cardiomegaly\b|\bheart is not enlarged\b", t):
        labels.add("cardiomegaly")
    return labels or {NO_FINDING}


def load_labeler(spec: str):
    """``synthetic`` or ``package.module:function`` (text -> iterable of finding labels)."""
    if spec == "synthetic":
        return synthetic_labeler
    import importlib

    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"data.labeler={spec!r}: cannot load it ({err}); give package.module:function of an "
                         "importable labeler (text -> set of finding labels), or use synthetic") from None
    if not callable(fn):
        raise ValueError(f"data.labeler={spec!r} is not callable")
    return fn


_LABEL = re.compile(r"^[A-Za-z0-9_:=. -]{1,40}$")


def report_counts(predictions: Sequence[str], rows: Sequence[Mapping], labeler=synthetic_labeler) -> dict:
    """Sufficient statistics for BLEU-4, ROUGE-L and finding-F1 (aggregate numbers only)."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    if len(predictions) != len(rows):
        raise ValueError(f"{len(predictions)} predictions for {len(rows)} rows")
    if not rows:
        return {}
    refs = [r["answer"].strip().lower() for r in rows]
    hyps = [p.strip().lower() for p in predictions]
    c: dict = defaultdict(float)
    bleu = BLEU().corpus_score(hyps, [refs])
    for n in range(4):
        c[f"bleu_correct_{n + 1}"] = float(bleu.counts[n])
        c[f"bleu_total_{n + 1}"] = float(bleu.totals[n])
    c["bleu_sys_len"], c["bleu_ref_len"] = float(bleu.sys_len), float(bleu.ref_len)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    c["rouge_l_sum"] = sum(scorer.score(ref, hyp)["rougeL"].fmeasure for ref, hyp in zip(refs, hyps))
    c["report_total"] = float(len(rows))
    for hyp, ref in zip(hyps, refs):
        pred, gold = set(labeler(hyp)), set(labeler(ref))
        for label in pred | gold:
            if not _LABEL.match(label):
                # the label is not quoted: it may be report text, and a deployed site's error reaches the coordinator
                raise ValueError(f"the labeler gave a finding label of {len(label)} character(s) that is not a short "
                                 "plain label (letters, digits, _:=.- and spaces, at most 40 characters); run the "
                                 "labeler on the site's reports there to see which")
            kind = "tp" if label in pred and label in gold else ("fp" if label in pred else "fn")
            c[f"finding/{label}_{kind}"] += 1
    return dict(c)


def report_scores(counts: Mapping[str, float]) -> dict:
    """BLEU-4 (corpus, sacrebleu, 0-1), mean ROUGE-L F, micro finding precision/recall/F1, per-finding F1."""
    from sacrebleu.metrics import BLEU

    n = counts.get("report_total", 0.0)
    if not n:
        return {"bleu4": None, "rouge_l": None, "finding_f1": None, "finding_precision": None,
                "finding_recall": None, "per_finding": {}, "report_total": 0}
    bleu = BLEU.compute_bleu([int(counts.get(f"bleu_correct_{k}", 0)) for k in range(1, 5)],
                             [int(counts.get(f"bleu_total_{k}", 0)) for k in range(1, 5)],
                             int(counts.get("bleu_sys_len", 0)), int(counts.get("bleu_ref_len", 0)))
    per: dict[str, dict[str, float]] = defaultdict(lambda: {"tp": 0.0, "fp": 0.0, "fn": 0.0})
    for key, value in counts.items():
        if key.startswith("finding/"):
            label, _, kind = key[len("finding/"):].rpartition("_")
            per[label][kind] += value
    f1 = lambda tp, fp, fn: (2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else None  # noqa: E731
    tp, fp, fn = (sum(p[k] for p in per.values()) for k in ("tp", "fp", "fn"))
    return {"bleu4": bleu.score / 100.0, "rouge_l": counts.get("rouge_l_sum", 0.0) / n, "finding_f1": f1(tp, fp, fn),
            "finding_precision": tp / (tp + fp) if tp + fp else None, "finding_recall": tp / (tp + fn) if tp + fn else None,
            "per_finding": {label: f1(**p) for label, p in sorted(per.items())}, "report_total": int(n)}


def majority_report(train_rows: Sequence[Mapping]) -> str:
    """The most common training report (ties: alphabetical): the trivial report baseline."""
    reports = Counter(r["answer"].strip().lower() for r in train_rows if r.get("answer_type") == "report")
    return _most_common(reports) if reports else ""


# ----------------------------------------------------------------------------- per task
def task_of(rows: Sequence[Mapping]) -> str:
    return "report" if rows and all(r.get("answer_type") == "report" for r in rows) else "vqa"


def counts_for(predictions: Sequence[str], rows: Sequence[Mapping], labeler=synthetic_labeler) -> dict:
    """The aggregate counts a hospital may report for its rows' task (VQA or report)."""
    if task_of(rows) == "report":
        return report_counts(predictions, rows, labeler)
    return vqa_counts(predictions, rows)


def baseline_for(train_rows: Sequence[Mapping], rows: Sequence[Mapping]) -> list[str]:
    """The trivial baseline's predictions: per-question majority (VQA), most common report (reports)."""
    if task_of(rows) == "report":
        return [majority_report(train_rows)] * len(rows)
    return baseline_predictions(majority_answers(train_rows), rows)


def scores(counts: Mapping[str, float]) -> dict:
    """Accuracies (VQA counts) and/or report scores (report counts) from summed counts."""
    out = accuracies(counts) if "closed_total" in counts or "open_total" in counts else {}
    if "report_total" in counts:
        out.update(report_scores(counts))
    return out
