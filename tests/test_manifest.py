import json

import pytest

from medvlm.data.manifest import ManifestError, read_manifest
from medvlm.data.synthetic import generate_hospital, write_manifest


@pytest.fixture
def broken_manifest(tmp_path):
    ds = generate_hospital("general", 3, seed=0)
    path = write_manifest(ds, tmp_path)
    good = path.read_text().splitlines()
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    extra = [
        json.dumps({"image": "images/missing.png", "question": "q?", "answer": "yes", "answer_type": "closed"}),
        json.dumps({"image": "images/corrupt.png", "question": "q?", "answer": "yes", "answer_type": "closed"}),
        "{not json",
        json.dumps({"image": "images/00000.png", "question": "", "answer": "yes", "answer_type": "closed"}),
        json.dumps({"image": "images/00000.png", "question": "q?", "answer": "yes", "answer_type": "maybe"}),
        json.dumps({"image": "images/00000.png", "answer": "yes", "answer_type": "closed"}),
    ]
    path.write_text("\n".join(good + extra) + "\n")
    return path, len(good)


def test_every_bad_row_is_named(broken_manifest):
    path, n_good = broken_manifest
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    problems = info.value.problems
    assert len(problems) == 6
    text = str(info.value)
    assert f"manifest.jsonl:{n_good + 1}:" in text and "not found" in text
    assert f"manifest.jsonl:{n_good + 2}:" in text and "cannot be decoded" in text
    assert f"manifest.jsonl:{n_good + 3}: malformed JSON" in text
    assert "empty or non-text 'question'" in text
    assert "answer_type 'maybe'" in text
    assert "missing key(s) ['question']" in text and "missing key(s) ['question'] (" not in text


def test_skip_keeps_every_good_row(broken_manifest):
    path, n_good = broken_manifest
    manifest = read_manifest(path, on_bad_row="skip")
    assert len(manifest.rows) == n_good
    assert len(manifest.problems) == 6


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_manifest_dataset_end_to_end(tmp_path, tiny_model):
    from medvlm.data.dataset import VQADataset, from_manifest

    path = write_manifest(generate_hospital("cardiac", 3, seed=0), tmp_path)
    rows = from_manifest(str(path), tiny_model.vision.preprocess)
    assert rows.pixels.shape[0] == 3
    ds = VQADataset(rows, tiny_model.tokenizer, tiny_model.cfg.max_text_len)
    pixels, ids, mask, labels = ds[0]
    assert pixels.shape == (3, 64, 64) and ids.shape == (tiny_model.cfg.max_text_len,)
    assert (labels != -100).sum() >= 2  # answer + eos are supervised, the prompt is not


def test_a_row_without_answer_type_is_told_what_the_two_values_mean(tmp_path):
    (tmp_path / "manifest.jsonl").write_text('{"image": "a.png", "question": "q?", "answer": "yes"}\n')
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path)
    assert ("manifest.jsonl:1: missing key(s) ['answer_type'] (answer_type: closed when the answer is one of"
            in str(info.value))


def test_alternatives_must_be_a_list_of_answers(tmp_path):
    import json

    from medvlm.data.manifest import ManifestError, read_manifest
    from medvlm.data.synthetic import generate_hospital, write_manifest

    write_manifest(generate_hospital("general", 4, seed=0), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    rows[0]["alternatives"] = ["a right pleural effusion"]
    rows[1]["alternatives"] = "effusion"                                # one text, not a list
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ManifestError, match=r"manifest.jsonl:2: alternatives must be a list of other accepted"):
        read_manifest(tmp_path)
    kept = read_manifest(tmp_path, on_bad_row="skip").rows
    assert kept[0]["alternatives"] == ["a right pleural effusion"] and len(kept) == len(rows) - 1
