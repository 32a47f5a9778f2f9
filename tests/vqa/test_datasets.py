"""Every dataset loader on a small fixture in its published layout, the real VQA-RAD, bad input."""

import json
import pickle
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from dualhead.vqa.config import DataConfig
from dualhead.vqa.data import (
    FORMATS,
    AnswerVocab,
    DataError,
    VQASplits,
    easy_vqa,
    jsonl,
    load_splits,
    pathvqa,
    slake,
    vqa_rad,
    vqa_v2,
)


def _image(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 100, 200)).save(path)


def _json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _tasks(records) -> Counter:
    return Counter(record.task for record in records)


def _assert_no_image_overlap(splits: VQASplits) -> None:
    assert not {r.image for r in splits.train} & {r.image for r in splits.val}


# --- VQA-RAD -------------------------------------------------------------------------------------


def _rad_row(qid, image, question, answer, answer_type="CLOSED"):
    return {"qid": qid, "image_name": image, "image_organ": "HEAD", "answer": answer,
            "answer_type": answer_type, "question_type": "PRES", "question": question,
            "phrase_type": "freeform"}  # fmt: skip


def write_vqa_rad(root: Path) -> Path:
    """10 images; train: 20 questions (2 per image, one a duplicate row), test: 3."""
    for i in range(10):
        _image(root / "images" / f"synpic{i}.jpg", shade=i)
    train = []
    for i in range(10):
        train.append(
            _rad_row(2 * i, f"synpic{i}.jpg", "Is there a mass? ", " Yes" if i % 2 else "no", "CLOSED ")
        )
        train.append(_rad_row(2 * i + 1, f"synpic{i}.jpg", "How many lesions?", i % 3 + 1, "OPEN"))
    train[-1] = dict(train[-2])  # a duplicate row, as published
    _json(root / "trainset.json", train)
    test = [
        _rad_row(100, "synpic0.jpg", "Is it axial?", "YES"),
        _rad_row(101, "synpic1.jpg", "Which lobe?", "The Left lobe", "OPEN"),
        _rad_row(102, "synpic2.jpg", "How many lesions?", 4, "OPEN"),
    ]
    _json(root / "testset.json", test)
    return root


def test_vqa_rad_fixture(tmp_path):
    splits = vqa_rad.load(write_vqa_rad(tmp_path), val_fraction=0.2, seed=3)
    assert len(splits.train) + len(splits.val) == 20 and len(splits.test) == 3
    assert len(splits.val) == 4  # 20% of the 20 questions: VQA-RAD's val is carved by question
    assert _tasks(splits.train + splits.val) == {"binary": 11, "open": 9}
    assert {r.answer_type for r in splits.train + splits.val} == {"CLOSED", "OPEN"}
    assert [r.answer for r in splits.test] == ["yes", "left lobe", "4"]
    record = next(r for r in splits.train + splits.val if r.qid == "3")
    assert record.answer == "2" and record.source == "trainset.json record 3 (qid 3)"
    assert next(r for r in splits.train + splits.val if r.qid == "0").question == "Is there a mass?"
    again = vqa_rad.load(tmp_path, val_fraction=0.2, seed=3)
    assert [r.qid for r in again.val] == [r.qid for r in splits.val]  # deterministic with the seed
    assert [r.qid for r in vqa_rad.load(tmp_path, val_fraction=0.2, seed=4).val] != [
        r.qid for r in splits.val
    ]


@pytest.fixture(scope="module")
def real_vqa_rad(vqa_rad_root):
    return vqa_rad.load(vqa_rad_root)


def test_real_vqa_rad_counts_and_quirks(real_vqa_rad):
    splits = real_vqa_rad
    assert len(splits.train) + len(splits.val) == 3064 and len(splits.test) == 451
    assert not splits.rejected
    assert len({r.image for r in splits.train + splits.val}) == 314
    assert len(splits.val) == 306  # 10% of the questions: carved by question, like the test split
    types = Counter(r.answer_type for r in splits.train + splits.val)
    assert types == {"CLOSED": 1823, "OPEN": 1241}  # the two "CLOSED " rows stripped
    assert Counter(r.answer_type for r in splits.test) == {"CLOSED": 272, "OPEN": 179}
    everything = splits.train + splits.val + splits.test
    assert sum(r.answer in {"2", "4", "12"} for r in everything) >= 10  # JSON numbers
    assert all(r.answer == r.answer.strip().lower() and r.answer for r in everything)
    assert all(r.question == r.question.strip() for r in everything)
    # Duplicate rows are kept (466 in train+val under answer normalisation: published 465 + a case variant).
    rows = Counter((r.image, r.question, r.answer) for r in splits.train + splits.val)
    assert sum(count - 1 for count in rows.values()) == 466


def test_real_vqa_rad_answers_outside_train_vocabulary(real_vqa_rad):
    splits = real_vqa_rad
    train_answers = {r.answer for r in splits.train + splits.val}
    # The GUIDE's 47 counts lowercased answers; VQA normalisation merges 3 more ("the ..." etc.).
    assert sum(r.answer not in train_answers for r in splits.test) == 44
    full = AnswerVocab.from_records(splits.train + splits.val).coverage(splits.test)
    assert (full["open_questions"], full["out_of_vocab"]) == (200, 44)
    carved = AnswerVocab.from_records(splits.train).coverage(splits.test)  # train without val, seed 0
    assert carved["out_of_vocab"] == 46


# --- easy-VQA ------------------------------------------------------------------------------------


def write_easy_vqa(root: Path) -> Path:
    """train: 5 images x 3 questions (2 yes/no), test: 2 images x 2 questions (1 yes/no)."""
    for split, images, per_image in [("train", 5, 3), ("test", 2, 2)]:
        questions = []
        for image_id in range(images):
            _image(root / split / "images" / f"{image_id}.png", shade=image_id)
            answers = ["yes", "no", "circle"][:per_image] if per_image == 3 else ["yes", "red"]
            questions += [[f"question {k}?", answer, image_id] for k, answer in enumerate(answers)]
        _json(root / split / "questions.json", questions)
    return root


def test_easy_vqa_fixture(tmp_path):
    splits = easy_vqa.load(write_easy_vqa(tmp_path), val_fraction=0.4)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 6, 4)
    _assert_no_image_overlap(splits)
    assert _tasks(splits.train + splits.val) == {"binary": 10, "open": 5}
    assert _tasks(splits.test) == {"binary": 2, "open": 2}
    assert splits.test[1].source == "test/questions.json record 1"
    assert splits.test[1].image == tmp_path / "test" / "images" / "0.png"


def test_easy_vqa_from_the_installed_package():
    splits = easy_vqa.load(None)
    assert len(splits.train) + len(splits.val) == 38575 and len(splits.test) == 9673
    assert len({r.image for r in splits.val}) == 400
    assert len(AnswerVocab.from_records(splits.train)) == 11  # 13 answers less yes/no
    assert load_splits(DataConfig()).test == splits.test


# --- SLAKE ---------------------------------------------------------------------------------------


def write_slake(root: Path) -> Path:
    """Each file: 3 English (2 CLOSED yes/no, 1 OPEN) and 2 Chinese questions."""
    for split_index, filename in enumerate(["train.json", "validate.json", "test.json"]):
        rows = []
        for k in range(5):
            name = f"xmlab{split_index * 10 + k}/source.jpg"
            _image(root / "imgs" / name, shade=k)
            lang = "en" if k < 3 else "zh"
            answer = {0: "Yes", 1: "No", 2: "Brain", 3: "是", 4: "脑"}[k]
            rows.append({"img_id": k, "img_name": name, "question": f"q{k}?", "answer": answer,
                         "q_lang": lang, "location": "Head", "modality": "MRI",
                         "answer_type": "OPEN" if k in (2, 4) else "CLOSED", "base_type": "vqa",
                         "content_type": "Organ", "triple": ["vhead", "_", "_"],
                         "qid": split_index * 10 + k})  # fmt: skip
        _json(root / filename, rows)
    return root


def test_slake_fixture_and_languages(tmp_path):
    write_slake(tmp_path)
    english = slake.load(tmp_path)
    assert [len(english.split(name)) for name in ("train", "val", "test")] == [3, 3, 3]
    assert _tasks(english.train) == {"binary": 2, "open": 1}
    assert english.val[0].source == "validate.json record 0 (qid 10)"
    assert english.test[2].image == tmp_path / "imgs" / "xmlab22" / "source.jpg"
    chinese = slake.load(tmp_path, lang="zh")
    assert len(chinese.train) == 2 and _tasks(chinese.train) == {"open": 2}
    assert len(slake.load(tmp_path, lang="all").test) == 5
    with pytest.raises(ValueError, match="language"):
        slake.load(tmp_path, lang="fr")


# --- PathVQA -------------------------------------------------------------------------------------


def write_pathvqa(root: Path) -> Path:
    """train 4 (2 yes/no), val 2 (1), test 2 (1); some records carry `label` instead of `answer`."""
    for split, count in [("train", 4), ("val", 2), ("test", 2)]:
        rows = []
        for k in range(count):
            img_id = f"{split}_{k:04d}"
            _image(root / "images" / split / f"{img_id}.jpg", shade=k)
            row = {"img_id": img_id, "sent": f"what is shown {k}?", "question_id": f"{split}-{k}",
                   "answer_type": "yes/no" if k % 2 == 0 else "other"}  # fmt: skip
            if k % 2 == 0:
                row["answer"] = "yes"
            else:
                row["label"] = {"Necrosis": 0.3, "Fibrosis": 1.0}
            rows.append(row)
        (root / "qas").mkdir(parents=True, exist_ok=True)
        (root / "qas" / f"{split}_vqa.pkl").write_bytes(pickle.dumps(rows))
    return root


def test_pathvqa_fixture(tmp_path):
    splits = pathvqa.load(write_pathvqa(tmp_path))
    assert [len(splits.split(name)) for name in ("train", "val", "test")] == [4, 2, 2]
    assert _tasks(splits.train) == {"binary": 2, "open": 2} and _tasks(splits.val) == {"binary": 1, "open": 1}
    assert splits.train[1].answer == "fibrosis"  # the best-scored label
    assert splits.train[1].answer_type == "other"
    assert splits.test[0].source == "qas/test_vqa.pkl record 0 (qid test-0)"
    (tmp_path / "qas" / "val_vqa.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="val_vqa.pkl"):
        pathvqa.load(tmp_path)


# --- VQA v2 --------------------------------------------------------------------------------------


def write_vqa_v2(root: Path) -> Path:
    """train2014: 6 images x 2 questions (1 yes/no); val2014: 2 images x 2 questions."""
    for split, images in [("train2014", 6), ("val2014", 2)]:
        questions, annotations = [], []
        for image_id in range(1, images + 1):
            _image(root / split / f"COCO_{split}_{image_id:012d}.jpg", shade=image_id)
            for k, (answer, humans) in enumerate(
                [("yes", ["yes"] * 8 + ["no"] * 2), ("two", ["two"] * 5 + ["2"] * 2 + ["three"] * 3)]
            ):
                qid = image_id * 10 + k
                questions.append({"image_id": image_id, "question": f"q{k}?", "question_id": qid})
                annotations.append({"question_id": qid, "image_id": image_id, "question_type": "is",
                                    "answer_type": "yes/no" if k == 0 else "number",
                                    "multiple_choice_answer": answer,
                                    "answers": [{"answer": h, "answer_confidence": "yes", "answer_id": i + 1}
                                                for i, h in enumerate(humans)]})  # fmt: skip
        _json(root / f"v2_OpenEnded_mscoco_{split}_questions.json", {"questions": questions})
        _json(root / f"v2_mscoco_{split}_annotations.json", {"annotations": annotations})
    return root


def test_vqa_v2_fixture(tmp_path):
    splits = vqa_v2.load(write_vqa_v2(tmp_path), val_fraction=0.34)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 4, 4)
    _assert_no_image_overlap(splits)
    assert _tasks(splits.test) == {"binary": 2, "open": 2}
    open_record = splits.test[1]
    assert open_record.answer == "2" and open_record.answer_type == "number"
    assert open_record.all_answers == ("2",) * 7 + ("3",) * 3
    assert open_record.answer_scores == {"2": 1.0, "3": 1.0}
    assert splits.test[0].answer_scores == {"yes": 1.0, "no": pytest.approx(2 / 3)}
    assert open_record.source == "v2_OpenEnded_mscoco_val2014_questions.json record 1 (qid 11)"


def test_vqa_v2_missing_annotation(tmp_path):
    write_vqa_v2(tmp_path)
    path = tmp_path / "v2_mscoco_val2014_annotations.json"
    data = json.loads(path.read_text())
    data["annotations"] = data["annotations"][1:]
    path.write_text(json.dumps(data))
    with pytest.raises(
        DataError, match=r"missing annotation in .*val2014_questions.json record 0 \(qid 10\)"
    ):
        vqa_v2.load(tmp_path)
    assert [r.reason for r in vqa_v2.load(tmp_path, skip_invalid=True).rejected] == ["missing annotation"]


# --- JSONL / CSV ---------------------------------------------------------------------------------


def write_jsonl(root: Path) -> Path:
    """train.jsonl: 10 questions on 5 images (half yes/no); test.csv: 3 questions; no val file."""
    for i in range(5):
        _image(root / "pics" / f"{i}.png", shade=i)
    rows = [
        {"image": f"pics/{i // 2}.png", "question": f"q{i}?", "answer": "yes" if i % 2 else "cat"}
        for i in range(10)
    ]
    lines = [json.dumps(row) for row in rows]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n\n")
    (root / "test.csv").write_text(
        "image,question,answer,answer_type\npics/0.png,Is it red?,No,closed\n"
        'pics/1.png,"What, exactly?",a dog,open\npics/2.png,How many?,3,open\n'
    )
    return root


def test_jsonl_and_csv_fixture(tmp_path):
    splits = jsonl.load(write_jsonl(tmp_path), val_fraction=0.2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 3)
    _assert_no_image_overlap(splits)
    assert _tasks(splits.train + splits.val) == {"binary": 5, "open": 5}
    assert [r.answer for r in splits.test] == ["no", "dog", "3"]
    assert splits.test[1].question == "What, exactly?" and splits.test[1].source == "test.csv line 3"
    assert splits.train[0].source == "train.jsonl line 1"

    (tmp_path / "val.jsonl").write_text(json.dumps({"image": "pics/4.png", "question": "q?", "answer": "no"}))
    assert len(jsonl.load(tmp_path).val) == 1 and len(jsonl.load(tmp_path).train) == 10
    (tmp_path / "val.csv").write_text("image,question\n")
    with pytest.raises(DataError, match="both val.jsonl and val.csv"):
        jsonl.load(tmp_path)
    (tmp_path / "val.jsonl").unlink()
    with pytest.raises(DataError, match=r"val.csv: the header has no column answer"):
        jsonl.load(tmp_path)


# --- bad input -----------------------------------------------------------------------------------


def _break_rad(root: Path, index: int, change) -> None:
    rows = json.loads((root / "trainset.json").read_text())
    change(rows[index])
    _json(root / "trainset.json", rows)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda row: row.update(image_name="synpic99.jpg"), "missing image"),
        (lambda row: row.update(question="   "), "empty question"),
        (lambda row: row.update(question=7), "invalid question"),
        (lambda row: row.update(answer=""), "empty answer"),
        (lambda row: row.update(answer=None), "empty answer"),
        (lambda row: row.pop("answer"), "missing field"),
    ],
)
def test_bad_vqa_rad_record_names_file_and_record(tmp_path, change, reason):
    write_vqa_rad(tmp_path)
    _break_rad(tmp_path, 5, change)
    with pytest.raises(DataError, match=rf"{reason} in trainset\.json record 5 \(qid 5\)"):
        vqa_rad.load(tmp_path)
    splits = vqa_rad.load(tmp_path, skip_invalid=True)
    assert len(splits.train) + len(splits.val) == 19
    assert [(r.source, r.reason) for r in splits.rejected] == [("trainset.json record 5 (qid 5)", reason)]


def test_malformed_json_names_file_line_and_column(tmp_path):
    write_vqa_rad(tmp_path)
    (tmp_path / "testset.json").write_text('[\n  {"qid": 1,\n   "answer": yes}\n]')
    for skip in (False, True):  # a broken file cannot be skipped record by record
        with pytest.raises(DataError, match=r"malformed JSON in .*testset\.json at line 3, column 14"):
            vqa_rad.load(tmp_path, skip_invalid=skip)


def test_skip_invalid_counts_by_reason(tmp_path):
    write_jsonl(tmp_path)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    lines[1] = '{"image": "pics/0.png", "question": "q?", "answer": "yes"'  # malformed
    lines[3] = json.dumps({"image": "pics/missing.png", "question": "q?", "answer": "no"})
    lines[4] = json.dumps({"image": "pics/1.png", "answer": "no"})
    lines[5] = json.dumps({"image": "pics/1.png", "question": "q?", "answer": "the"})  # empty once normalised
    (tmp_path / "train.jsonl").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"malformed json in train\.jsonl line 2 .*column \d+"):
        jsonl.load(tmp_path)
    splits = jsonl.load(tmp_path, skip_invalid=True)
    assert len(splits.train) + len(splits.val) == 6
    assert Counter(r.reason for r in splits.rejected) == {
        "malformed json": 1,
        "missing image": 1,
        "missing field": 1,
        "empty answer": 1,
    }
    assert [r.source for r in splits.rejected] == [f"train.jsonl line {n}" for n in (2, 4, 5, 6)]


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(DataError, match="VQA-RAD folder not found"):
        vqa_rad.load(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"file not found: .*trainset\.json"):
        vqa_rad.load(tmp_path)
    with pytest.raises(DataError, match="no train.jsonl or train.csv"):
        jsonl.load(tmp_path)
    with pytest.raises(DataError, match=r"expected one file matching \*train2014_questions.json"):
        vqa_v2.load(tmp_path)


# --- registry ------------------------------------------------------------------------------------


def test_load_splits_registry(tmp_path):
    assert set(FORMATS) == {"easy_vqa", "vqa_rad", "slake", "pathvqa", "vqa_v2", "jsonl"}
    write_slake(tmp_path)
    assert len(load_splits(DataConfig(format="slake", root=str(tmp_path), lang="zh")).test) == 2
    with pytest.raises(ValueError, match="unknown data format .*choose one of easy_vqa, jsonl, pathvqa, slake, vqa_rad, vqa_v2"):
        load_splits(DataConfig(format="coco"))
    with pytest.raises(ValueError, match="--root"):
        load_splits(DataConfig(format="vqa_rad"))
    with pytest.raises(ValueError, match="slake only"):
        load_splits(DataConfig(format="vqa_rad", root=str(tmp_path), lang="zh"))
    rad = write_vqa_rad(tmp_path / "rad")
    splits = load_splits(DataConfig(format="vqa_rad", root=str(rad), val_fraction=0.3), seed=1)
    assert len(splits.val) == 6


def test_verify_images_reports_a_corrupt_image_or_skips_and_counts_it(tmp_path):
    from tests.conftest import write_shapes_dataset

    root = write_shapes_dataset(tmp_path, {"train": 4, "test": 2})
    (root / "images" / "train_1.png").write_bytes(b"not a png at all")
    config = DataConfig(format="jsonl", root=str(root), verify_images=True)
    with pytest.raises(DataError, match=r"cannot decode image .*train_1\.png \(train\.jsonl line \d+\)"):
        load_splits(config)
    config.skip_invalid = True
    splits = load_splits(config)
    assert all(r.image.name != "train_1.png" for r in splits.train + splits.val)
    assert [r.reason for r in splits.rejected] == ["corrupt image"] * 3
    assert len(splits.train) + len(splits.val) == 9
