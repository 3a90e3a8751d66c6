from medvlm.metrics import baseline_predictions, majority_answers, normalize, score, token_recall


def row(q, a, t="closed", qtype="x"):
    return {"question": q, "answer": a, "answer_type": t, "qtype": qtype}


def test_no_does_not_match_normal():
    r = score(["normal"], [row("is it abnormal?", "no")])
    assert r["closed_accuracy"] == 0.0


def test_wrong_yes_no_answers_stay_in_the_denominator():
    rows = [row("q1", "yes"), row("q2", "no"), row("q3", "yes"), row("q4", "no")]
    r = score(["yes", "maybe", "left", "No."], rows)
    assert r["closed_total"] == 4
    assert r["closed_accuracy"] == 0.5


def test_open_exact_and_recall_reported_separately():
    rows = [row("what?", "pleural effusion", "open"), row("where?", "left lung base", "open")]
    r = score(["effusion", "left lung base"], rows)
    assert r["open_accuracy"] == 0.5
    assert abs(r["open_recall"] - (0.5 + 1.0) / 2) < 1e-9
    assert r["closed_accuracy"] is None  # no closed questions: not 0, not 1


def test_normalisation():
    assert normalize("  Two Nodules. ") == "2 nodules"
    assert normalize("X-ray!") == "x-ray"
    assert token_recall("nodule nodule", "nodule nodule left") == 2 / 3
    assert token_recall("anything", "") == 0.0


def test_overall_and_per_qtype():
    rows = [row("a", "yes", qtype="e"), row("b", "1", qtype="c"), row("c", "no finding", "open", "ab")]
    r = score(["yes", "one", "nodule"], rows)
    assert r["accuracy"] == 2 / 3
    assert r["per_qtype"] == {"ab": 0.0, "c": 1.0, "e": 1.0}


def test_per_question_majority_baseline():
    train = [row("is there x?", "no"), row("is there x?", "no"), row("is there x?", "yes"),
             row("how many?", "2"), row("what?", "nodule", "open")]
    maj = majority_answers(train)
    test = [row("Is there X?", "no"), row("how many?", "1"), row("never seen?", "yes"), row("other?", "nodule", "open")]
    preds = baseline_predictions(maj, test)
    assert preds[0] == "no" and preds[1] == "2"
    assert preds[2] == "no"            # per-answer-type fallback for an unseen question
    assert preds[3] == "nodule"
    assert score(preds, test)["accuracy"] == 0.5
