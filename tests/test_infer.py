"""medvlm/evaluate.py and medvlm/infer.py on their own: exact batched generation, the trivial
baseline, and the Predictor a clinician-facing tool would call."""

import csv
import json

import pytest

from medvlm.data.dataset import VQARows


def test_batched_generation_equals_one_question_at_a_time(tiny_model, tiny_splits):
    from medvlm.evaluate import predict

    val = tiny_splits["val"]
    rows = val.rows[:10]
    assert len({len(r["question"]) for r in rows}) > 1                 # prompts of several lengths
    together = predict(tiny_model, VQARows(val.pixels, rows), max_new_tokens=4, batch_size=3)
    alone = [predict(tiny_model, VQARows(val.pixels, [r]), max_new_tokens=4)[0] for r in rows]
    assert together == alone


def test_the_baseline_answers_each_question_with_its_training_majority():
    from medvlm.evaluate import baseline_counts

    train = [{"question": "is there a nodule?", "answer": a, "answer_type": "closed", "image_index": 0}
             for a in ("no", "no", "yes")]
    test = [{"question": "is there a nodule?", "answer": a, "answer_type": "closed", "image_index": 0}
            for a in ("no", "yes", "no", "no")]
    counts = baseline_counts(VQARows(None, test), train)
    assert counts["closed_correct"] == 3 and counts["closed_total"] == 4


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    from medvlm.recipes.local import train_local_run
    from tests.test_cli import TINY

    out = tmp_path_factory.mktemp("run")
    run_dir, _ = train_local_run("tiny", TINY + [f"output_dir={out}"], run_name="r", progress=False)
    return run_dir


def test_the_predictor_answers_as_evaluation_does(local_run, tmp_path, caplog):
    from PIL import Image

    from medvlm.data.dataset import preprocess_images
    from medvlm.data.images import load_image
    from medvlm.evaluate import predict
    from medvlm.infer import Predictor

    predictor = Predictor.from_run(local_run, device="cpu")
    assert predictor.adapter == local_run / "global"
    paths = []
    for i, value in enumerate((40, 200)):
        Image.new("L", (64, 64), value).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    questions = ["is the heart enlarged?", "what modality is this?"]
    got = predictor.answer(paths, questions)
    rows = [{"image_index": i, "question": q, "answer": "", "answer_type": "open"} for i, q in enumerate(questions)]
    pixels = preprocess_images([load_image(p) for p in paths], predictor.model.vision.preprocess)
    assert got == predict(predictor.model, VQARows(pixels, rows), max_new_tokens=predictor.cfg.train.eval_max_new_tokens)
    assert predictor.tasks == ("vqa",) and not caplog.records        # answers from a question-answering run: silent
    assert len(predictor.report(paths)) == 2                          # reports from it: said to be untrained
    assert "was trained for vqa (data.task / federation.stages), not report: its reports are untrained" in caplog.text
    with pytest.raises(ValueError, match="2 image.s. for 1 question"):
        predictor.answer(paths, questions[:1])
    with pytest.raises(ValueError, match="question 2 of 2 is empty"):            # was answered as if asked
        predictor.answer(paths, [questions[0], "  "])
    with pytest.raises(FileNotFoundError, match="has not finished a round yet"):
        Predictor.from_run(local_run, adapter=tmp_path / "nowhere")


def test_predictions_are_written_as_jsonl_or_csv_and_nothing_else(tmp_path):
    from medvlm.infer import write_predictions

    rows = [{"image": "a.png", "question": "q?", "prediction": "yes"}, {"image": "b.png", "prediction": "no, two"},
            {"image": "c.png", "question": "图片中有肺炎吗?", "prediction": "是"}]         # SLAKE's Chinese half
    write_predictions(rows, tmp_path / "p.jsonl")
    text = (tmp_path / "p.jsonl").read_text(encoding="utf-8")
    assert [json.loads(x) for x in text.splitlines()] == rows and "图片中有肺炎吗" in text   # readable, not \u escapes
    write_predictions(rows, tmp_path / "p.csv")
    with open(tmp_path / "p.csv", newline="", encoding="utf-8") as fh:
        back = list(csv.DictReader(fh))
    assert back[1] == {"image": "b.png", "question": "", "prediction": "no, two"} and back[2]["prediction"] == "是"
    with pytest.raises(ValueError, match="use a .jsonl or .csv"):
        write_predictions(rows, tmp_path / "p.txt")
    assert not (tmp_path / "p.txt").exists()
