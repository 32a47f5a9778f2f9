"""The dataset summary behind ``dualhead data summary``: counts, rejections, image check."""

import json
from pathlib import Path

import pytest
from PIL import Image

from dualhead.vqa.data import AnswerVocab, jsonl, vqa_rad
from dualhead.vqa.data.summary import format_summary, summarize


@pytest.fixture
def dataset(tmp_path):
    """train: 6 good rows on 3 images (one duplicate), 3 bad rows; test: 3 rows, one on a corrupt image."""
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    train = [
        {"image": "0.png", "question": "Is it red?", "answer": "yes", "answer_type": "CLOSED"},
        {"image": "0.png", "question": "Is it red?", "answer": "yes", "answer_type": "CLOSED"},
        {"image": "0.png", "question": "What shape?", "answer": "circle", "answer_type": "OPEN"},
        {"image": "1.png", "question": "What shape?", "answer": "square", "answer_type": "OPEN"},
        {"image": "2.png", "question": "Is it blue?", "answer": "no", "answer_type": "CLOSED"},
        {"image": "2.png", "question": "What shape?", "answer": "circle"},
        {"image": "gone.png", "question": "What shape?", "answer": "circle"},
        {"image": "1.png", "question": "", "answer": "circle"},
        {"image": "1.png", "question": "What?", "answer": "a"},
    ]
    test = [
        {"image": "0.png", "question": "What shape?", "answer": "circle", "answer_type": "OPEN"},
        {"image": "0.png", "question": "What shape?", "answer": "triangle", "answer_type": "OPEN"},
        {"image": "bad.png", "question": "Is it red?", "answer": "yes", "answer_type": "CLOSED"},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(row) for row in train))
    (tmp_path / "val.jsonl").write_text(json.dumps(train[4]))
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(row) for row in test))
    return jsonl.load(tmp_path, skip_invalid=True)


def test_summary_of_a_fixture(dataset):
    vocab = AnswerVocab.from_records(dataset.train)
    summary = summarize(dataset, vocab)
    train, val, test = (summary["splits"][name] for name in ("train", "val", "test"))
    assert train == {
        "questions": 6,
        "images": 3,
        "binary": 3,
        "open": 3,
        "answer_types": {"-": 1, "CLOSED": 3, "OPEN": 2},
        "duplicate_rows": 1,
    }
    assert val["rows_in_train"] == 1 and test["rows_in_train"] == 1
    assert test["images"] == 2 and test["duplicate_rows"] == 0
    assert summary["conflicting_pairs"] == 1  # 0.png "What shape?": circle and triangle
    assert summary["vocab"]["size"] == 2
    assert summary["vocab"]["test"]["out_of_vocab"] == 1  # triangle
    assert summary["rejected"] == {"missing image": 1, "empty question": 1, "empty answer": 1}
    assert "image_check" not in summary

    text = format_summary(summary)
    assert "| questions | 6 | 1 | 3 |" in text
    assert "| answer type OPEN | 2 | 0 | 2 |" in text
    assert "rejected records: 3 (missing image: 1, empty question: 1, empty answer: 1)" in text
    assert "train.jsonl line 7: missing image" in text


def test_check_images_finds_the_corrupt_image(dataset):
    summary = summarize(dataset, AnswerVocab.from_records(dataset.train), check_images=True)
    check = summary["image_check"]
    assert check["checked"] == 4
    assert [Path(failure["path"]).name for failure in check["failed"]] == ["bad.png"]
    assert "test.jsonl line 3" in check["failed"][0]["reason"]
    assert "images decoded: 4, failed: 1" in format_summary(summary)


def test_summary_of_vqa_rad(vqa_rad_root):
    splits = vqa_rad.load(vqa_rad_root)
    summary = summarize(splits, AnswerVocab.from_records(splits.train))
    train, val, test = (summary["splits"][name] for name in ("train", "val", "test"))
    assert train["questions"] + val["questions"] == 3064 and test["questions"] == 451
    assert (train["images"], val["images"], test["images"]) == (313, 191, 203)  # val carved by question
    assert test["answer_types"] == {"CLOSED": 272, "OPEN": 179}
    assert test["binary"] == 251 and test["open"] == 200
    assert train["duplicate_rows"] + val["duplicate_rows"] + val["rows_in_train"] == 466
    assert test["rows_in_train"] == 14  # the published test rows that repeat a train row
    assert summary["conflicting_pairs"] == 24
    assert summary["vocab"]["test"]["out_of_vocab"] == 46
    assert summary["rejected"] == {}
    assert "| questions | 2758 | 306 | 451 |" in format_summary(summary)
