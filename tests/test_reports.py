"""Report generation: rows, the finding labeler, metrics from summed statistics, what may leave a site."""

import json

import pytest

from medvlm.data.dataset import REPORT_PROMPT, encode_pair, prompt_text, row_prompt, task_rows
from medvlm.data.synthetic import generate_hospital, report_text
from medvlm.metrics import (baseline_for, counts_for, load_labeler, merge_counts, report_counts, report_scores,
                            scores, synthetic_labeler)
from medvlm.wire import EgressError, check_metrics


def test_labeler_reads_presence_side_and_count_and_ignores_negations():
    assert synthetic_labeler("ct of the chest. two nodules in the left lung. right pleural effusion.") == {
        "nodule", "nodule:left", "nodule:count=2", "effusion", "effusion:right"}
    assert synthetic_labeler("x-ray of the chest. the heart is enlarged.") == {"cardiomegaly"}
    assert synthetic_labeler("no nodules. no pleural effusion. heart is not enlarged.") == {"no finding"}
    assert synthetic_labeler("x-ray of the chest. no acute findings.") == {"no finding"}
    # every synthetic report's findings come back exactly from its text
    data = generate_hospital("oncology", 60, seed=3)
    for f in data.findings:
        labels = synthetic_labeler(report_text(f))
        assert ("nodule" in labels) == bool(f.nodules)
        assert (f"nodule:count={f.nodules}" in labels) == bool(f.nodules)
        assert ("effusion:" + f.effusion in labels) == (f.effusion != "none")
        assert ("cardiomegaly" in labels) == f.cardiomegaly


def test_a_labeler_plugs_in_by_import_path_and_a_bad_one_is_named():
    assert load_labeler("medvlm.metrics:synthetic_labeler") is synthetic_labeler
    with pytest.raises(ValueError, match="data.labeler='nowhere.mod:fn'"):
        load_labeler("nowhere.mod:fn")
    # a label that could carry text off the site is refused before any count is built
    for bad in ({"Bad/label!"}, {"a" * 60}):
        with pytest.raises(ValueError, match="finding label"):
            report_counts(["a b c"], [{"answer": "a b c", "answer_type": "report"}], lambda text, b=bad: b)


def test_summed_hospital_statistics_equal_the_pooled_corpus_scores():
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    data = generate_hospital("general", 40, seed=1)
    rows = task_rows(data.rows, "report")
    refs = [r["answer"] for r in rows]
    hyps = [refs[(i + 1) % len(refs)] if i % 3 else refs[i] for i in range(len(refs))]   # a third exact
    parts = [report_counts(hyps[:15], rows[:15]), report_counts(hyps[15:], rows[15:])]
    federated = report_scores(merge_counts(parts))
    assert federated["bleu4"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score / 100, abs=1e-9)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert federated["rouge_l"] == pytest.approx(
        sum(scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(refs, hyps)) / len(refs))
    assert report_scores(report_counts(refs, rows)) | {"per_finding": {}} == {
        "bleu4": pytest.approx(1.0), "rouge_l": pytest.approx(1.0), "finding_f1": 1.0, "finding_precision": 1.0,
        "finding_recall": 1.0, "per_finding": {}, "report_total": len(rows)}
    assert 0 < federated["finding_f1"] < 1


def test_the_most_common_report_is_the_trivial_baseline():
    train = task_rows(generate_hospital("general", 80, seed=2).rows, "report")
    val = task_rows(generate_hospital("general", 30, seed=5).rows, "report")
    base = baseline_for(train, val)
    assert len(set(base)) == 1 and base[0] == "x-ray of the chest. no acute findings."
    s = scores(counts_for(base, val))
    assert s["bleu4"] < 1 and s["finding_f1"] < 0.5 and "accuracy" not in s


def test_report_rows_come_from_report_rows_or_the_report_a_question_carries(tmp_path):
    data = generate_hospital("cardiac", 12)
    reports = task_rows(data.rows, "report")
    assert len(reports) == 12 and all(r["answer_type"] == "report" for r in reports)
    assert [r["image_index"] for r in reports] == list(range(12))
    assert reports[0]["answer"] == report_text(data.findings[0])
    only = task_rows(data.rows, "vqa", qtypes=["modality"])
    assert len(only) == 12 and {r["qtype"] for r in only} == {"modality"}
    mixed = [{"image": "a.png", "report": "x-ray of the chest. no acute findings."},
             {"image": "a.png", "question": "q?", "answer": "yes", "answer_type": "closed", "report": "other"}]
    assert [r["answer"] for r in task_rows(mixed, "report")] == ["x-ray of the chest. no acute findings."]
    with pytest.raises(ValueError, match="task 'caption'"):
        task_rows(mixed, "caption")


def test_a_report_keeps_its_end_and_the_report_prompt(tiny_model):
    tok = tiny_model.tokenizer
    report = "mri of the chest. three nodules in the right lung. left pleural effusion. the heart is enlarged."
    row = {"answer_type": "report", "answer": report}
    assert row_prompt(row) == REPORT_PROMPT
    assert row_prompt({"question": "Is it?", "answer_type": "closed"}) == prompt_text("Is it?")
    ids, labels = encode_pair(tok, REPORT_PROMPT, report, 32)
    assert len(ids) <= 32 and ids[-1] == tok.eos_token_id
    answer = [t for t in labels if t != -100][:-1]
    assert tok.decode(answer).strip() == report          # not cut at max_len // 2 as before


def test_only_report_statistics_may_leave_a_site():
    counts = report_counts(["x-ray of the chest."], [{"answer": "x-ray of the chest.", "answer_type": "report"}])
    check_metrics({**counts, **{f"baseline/{k}": v for k, v in counts.items()}, "num-examples": 1}, kind="evaluate")
    for bad in ({"report_text": 1.0}, {"finding/" + "x" * 80 + "_tp": 1.0}, {"bleu_correct_5": 1.0}):
        with pytest.raises(EgressError):
            check_metrics(bad, kind="evaluate")
    assert json.dumps(counts)      # numbers only


def test_a_labeler_that_returns_report_text_is_refused_without_quoting_it():
    """The labeler is the site's own; one that returns sentences is refused, and the message (which a deployed
    site's error sends to the coordinator) says how long the label was, never what it said."""
    report = "left pleural effusion in patient john doe, 67"
    with pytest.raises(ValueError, match=r"finding label of 45 character\(s\) that is not a short plain label") as bad:
        report_counts([report], [{"answer": report, "answer_type": "report"}], labeler=lambda text: [text])
    assert "john doe" not in str(bad.value)
