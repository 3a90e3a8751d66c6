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
from typing import Iterable, Mapping, Sequence

_PUNCT = re.compile(r"[^\w\s\-]")
_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}


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
        hit = float(normalize(pred) == normalize(row["answer"]))
        kind = row["answer_type"]
        c[f"{kind}_correct"] += hit
        c[f"{kind}_total"] += 1
        c[f"qtype/{row.get('qtype', 'all')}_correct"] += hit
        c[f"qtype/{row.get('qtype', 'all')}_total"] += 1
        if kind == "open":
            c["open_recall_sum"] += token_recall(pred, row["answer"])
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
    best = lambda c: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]  # noqa: E731
    return {"question": {q: best(c) for q, c in per_q.items()}, "type": {t: best(c) for t, c in per_type.items()}}


def baseline_predictions(majority: Mapping, rows: Sequence[Mapping]) -> list[str]:
    return [majority["question"].get(normalize(r["question"]), majority["type"].get(r["answer_type"], ""))
            for r in rows]
