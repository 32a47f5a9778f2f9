"""Hostile and broken input to the data layer: each case is a DataError naming file and record (or a
counted rejection under skip_invalid), never code run, a file read outside the dataset, or a crash."""

import json
import os
import pickle
import re
import struct
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dualhead.vqa.config import DataConfig
from dualhead.vqa.data import AnswerVocab, DataError, jsonl, load_splits, pathvqa, slake, vqa_rad, vqa_v2
from dualhead.vqa.data.images import CACHE_BYTES, MAX_PIXELS, ImagePreprocessor, ImageStore, load_rgb
from dualhead.vqa.data.records import UNSAFE_TEXT
from dualhead.vqa.data.summary import format_summary, summarize
from tests.vqa.test_datasets import write_pathvqa, write_slake, write_vqa_rad, write_vqa_v2


def _rows(root: Path, rows: list, name: str = "train.jsonl") -> None:
    Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "a.png")
    (root / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


def _row(**changes) -> dict:
    return {"image": "a.png", "question": "Is it red?", "answer": "yes", **changes}


# --- 1. pickles ----------------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pathvqa_pickle_that_would_run_code_is_refused(tmp_path):
    root = write_pathvqa(tmp_path / "pathvqa")
    assert len(pathvqa.load(root).train) == 4  # the published layout still loads
    marker = tmp_path / "pwned"
    (root / "qas" / "val_vqa.pkl").write_bytes(pickle.dumps([_RunsCode(marker)]))
    for skip in (False, True):
        with pytest.raises(
            DataError, match=r"cannot unpickle .*qas/val_vqa\.pkl: .*refused global \w+\.system"
        ):
            pathvqa.load(root, skip_invalid=skip)
    assert not marker.exists()

    # Plain values of every kind still load.
    record = {"img_id": "val_0000", "sent": "what?", "question_id": ("q", 1), "answer": "fibrosis",
              "extra": [{1, 2}, frozenset({3}), b"raw", 1.5, 10**30, None, True]}  # fmt: skip
    (root / "qas" / "val_vqa.pkl").write_bytes(pickle.dumps([record]))
    assert [r.answer for r in pathvqa.load(root).val] == ["fibrosis"]


def test_pathvqa_label_with_scores_that_are_not_numbers_is_a_bad_record(tmp_path):
    root = write_pathvqa(tmp_path)
    record = {"img_id": "train_0000", "sent": "what?", "question_id": 7, "label": {"a": "high", "b": 1.0}}
    (root / "qas" / "train_vqa.pkl").write_bytes(pickle.dumps([record]))
    with pytest.raises(DataError, match=r"invalid answer in qas/train_vqa\.pkl record 0 \(qid 7\)"):
        pathvqa.load(root)
    assert [r.reason for r in pathvqa.load(root, skip_invalid=True).rejected] == ["invalid answer"]


# --- 2. image paths outside the dataset ----------------------------------------------------------


@pytest.fixture
def outside(tmp_path) -> Path:
    """An image beside (not inside) the dataset folder `tmp_path / "data"`."""
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    (tmp_path / "data").mkdir()
    return tmp_path / "secret.png"


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "symlinked folder"])
def test_jsonl_image_outside_the_dataset_is_refused(tmp_path, outside, kind):
    root = tmp_path / "data"
    if kind == "symlink":
        (root / "link.png").symlink_to(outside)
    if kind == "symlinked folder":
        (root / "pics").symlink_to(tmp_path)
    image = {"parent": "../secret.png", "absolute": str(outside), "symlink": "link.png",
             "symlinked folder": "pics/secret.png"}[kind]  # fmt: skip
    _rows(root, [_row(), _row(image=image, qid="q9")])
    with pytest.raises(DataError, match=r"image outside dataset in train\.jsonl line 2 \(qid q9\)"):
        jsonl.load(root)
    splits = jsonl.load(root, skip_invalid=True)
    assert [(r.source, r.reason) for r in splits.rejected] == [
        ("train.jsonl line 2 (qid q9)", "image outside dataset")
    ]
    allowed = jsonl.load(root, allow_outside_root=True, val_fraction=0.0)
    assert [r.image.resolve() for r in allowed.train][-1] == outside.resolve()
    from_config = load_splits(DataConfig(format="jsonl", root=str(root), val_fraction=0.0, allow_outside_root=True))
    assert [r.image.resolve() for r in from_config.train][-1] == outside.resolve()


def test_every_format_refuses_images_outside_its_folder(tmp_path, outside):
    rad = write_vqa_rad(tmp_path / "data" / "rad")
    rows = json.loads((rad / "trainset.json").read_text())
    rows[3]["image_name"] = "../../../secret.png"
    (rad / "trainset.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"image outside dataset in trainset\.json record 3 \(qid 3\)"):
        vqa_rad.load(rad)
    assert vqa_rad.load(rad, allow_outside_root=True).rejected == []

    sl = write_slake(tmp_path / "data" / "slake")
    rows = json.loads((sl / "test.json").read_text())
    rows[0]["img_name"] = str(outside)
    (sl / "test.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"image outside dataset in test\.json record 0"):
        slake.load(sl)

    pv = write_pathvqa(tmp_path / "data" / "pathvqa")
    (pv / "images" / "train" / "train_0001.jpg").unlink()
    (pv / "images" / "train" / "train_0001.jpg").symlink_to(outside)
    with pytest.raises(DataError, match=r"image outside dataset in qas/train_vqa\.pkl record 1"):
        pathvqa.load(pv)


# --- 3. images -----------------------------------------------------------------------------------


def test_pixel_limit_refuses_large_images_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 80)).save(path)
    assert MAX_PIXELS == 64 * 1024 * 1024
    with pytest.raises(
        DataError, match=r"big\.png \(train\.jsonl line 4\) has 100x80 = 8,000 pixels.*limit of 4,000"
    ):
        load_rgb(path, "train.jsonl line 4", max_pixels=4000)
    assert load_rgb(path, max_pixels=8000).size == (100, 80)
    store = ImageStore(ImagePreprocessor(4, (0.5,) * 3, (0.5,) * 3), max_pixels=4000)
    with pytest.raises(DataError, match="big.png"):
        store.get(path, "record 1")


def test_pillow_decompression_bomb_limit_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    warned, refused = tmp_path / "warned.png", tmp_path / "refused.png"
    Image.new("L", (80, 80)).save(warned)  # over the limit: Pillow only warns
    Image.new("L", (120, 120)).save(refused)  # over twice the limit: Pillow raises
    for path in (warned, refused):
        with pytest.raises(DataError, match=rf"{path.name} \(rec 2\) is over Pillow's limit"):
            load_rgb(path, "rec 2", max_pixels=None)


@pytest.mark.parametrize("suffix", ["jpg", "png", "webp"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    stored = Image.new("RGB", (32, 16), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 8))  # top half red as stored
    exif = stored.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the stored top becomes the right side
    stored.save(tmp_path / f"o.{suffix}", exif=exif.tobytes())
    img = load_rgb(tmp_path / f"o.{suffix}")
    assert img.size == (16, 32)
    assert img.getpixel((13, 16)) == pytest.approx((255, 0, 0), abs=40)
    assert img.getpixel((2, 16)) == pytest.approx((0, 0, 255), abs=40)


def test_float_image_with_nan_and_infinity(tmp_path):
    values = np.array([[0, 1000, 2000, np.nan, np.inf, -np.inf]], dtype=np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tiff")
    img = load_rgb(tmp_path / "f.tiff")
    assert [img.getpixel((x, 0))[0] for x in range(6)] == [0, 128, 255, 0, 255, 0]


def test_16_bit_pgm_is_scaled_not_stretched(tmp_path):
    # Pillow opens 16-bit PGM as 32-bit "I": still 16-bit grey, so x / 257, not min-max.
    (tmp_path / "g.pgm").write_bytes(b"P5\n3 1\n65535\n" + struct.pack(">3H", 0, 257 * 100, 257 * 50))
    img = load_rgb(tmp_path / "g.pgm")
    assert [img.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (50, 50, 50)]


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [("I;16", 257 * 40, (40, 40, 40)), ("P", 1, (200, 10, 10)), ("LA", (100, 255), (100, 100, 100)),
     ("LA", (100, 0), (255, 255, 255)), ("RGBA", (1, 2, 3, 255), (1, 2, 3))],
)  # fmt: skip
def test_wide_palette_and_alpha_modes_are_rotated_and_converted(tmp_path, mode, value, expected):
    img = Image.new(mode, (6, 4), value)
    if mode == "P":
        img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    exif = img.getexif()
    exif[0x0112] = 8
    img.save(tmp_path / "m.png", exif=exif.tobytes())
    out = load_rgb(tmp_path / "m.png")
    assert out.mode == "RGB" and out.size == (4, 6) and out.getpixel((1, 1)) == expected


# --- 4. text -------------------------------------------------------------------------------------


def test_bytes_that_are_not_utf8_in_jsonl_name_the_line_and_are_skippable(tmp_path):
    _rows(tmp_path, [_row(), _row()])
    good = (tmp_path / "train.jsonl").read_bytes()
    (tmp_path / "train.jsonl").write_bytes(
        good + b'{"image": "a.png", "question": "caf\xe9?", "answer": "no"}\n'
    )
    with pytest.raises(DataError, match=r"invalid utf-8 in train\.jsonl line 3 .*byte 35"):
        jsonl.load(tmp_path)
    splits = jsonl.load(tmp_path, skip_invalid=True, val_fraction=0.0)
    assert len(splits.train) == 2 and Counter(r.reason for r in splits.rejected) == {"invalid utf-8": 1}


def test_csv_bad_bytes_and_oversized_fields_name_the_line_and_are_skippable(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    huge = "x" * 200_000
    (tmp_path / "train.csv").write_bytes(
        b"image,question,answer\na.png,Is it red?,yes\na.png,caf\xe9?,no\n"
        + f'a.png,"{huge}",no\na.png,"two\nlines?",yes\n'.encode()
    )
    with pytest.raises(DataError, match=r"invalid utf-8 in train\.csv line 3 .*column 'question'"):
        jsonl.load(tmp_path)
    splits = jsonl.load(tmp_path, skip_invalid=True, val_fraction=0.0)
    assert [r.question for r in splits.train] == ["Is it red?", "two\nlines?"]
    assert [(r.source, r.reason) for r in splits.rejected] == [
        ("train.csv line 3", "invalid utf-8"),
        ("train.csv line 4", "malformed csv"),
    ]
    (tmp_path / "train.csv").write_bytes(f"image,question,answer\na.png,{huge},no\n".encode())
    with pytest.raises(
        DataError, match=r"malformed csv in train\.csv line 2 .*field larger than field limit"
    ):
        jsonl.load(tmp_path)


@pytest.mark.parametrize(
    "change",
    [
        {"question": "Is it \ud800 red?"},  # a lone surrogate (JSON "\ud800")
        {"question": "Is it\x00 red?"},
        {"question": "\x1b[2J Is it red?"},
        {"answer": "yes\x07"},
        {"answer": "\udfff"},
    ],
)
def test_text_a_tokenizer_cannot_take_is_a_bad_record(tmp_path, change):
    _rows(tmp_path, [_row(question="Is it\tred,\nreally?"), _row(qid=5, **change)])
    with pytest.raises(
        DataError, match=r"invalid text in train\.jsonl line 2 \(qid 5\).*lone surrogate"
    ) as err:
        jsonl.load(tmp_path)
    assert not re.search(r"[\x00-\x08\x1b\ud800-\udfff]", str(err.value))  # escaped, safe to print
    splits = jsonl.load(tmp_path, skip_invalid=True, val_fraction=0.0)
    assert [r.question for r in splits.train] == ["Is it\tred,\nreally?"]  # whitespace is fine
    assert [r.reason for r in splits.rejected] == ["invalid text"]
    str(splits.rejected[0]).encode("utf-8")  # printable: the detail holds no lone surrogate


def test_vqa_rad_unsafe_text_and_files_that_are_not_utf8(tmp_path):
    root = write_vqa_rad(tmp_path)
    rows = json.loads((root / "testset.json").read_text())
    rows[1]["question"] = "Which\x00 lobe?"
    (root / "testset.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"invalid text in testset\.json record 1 \(qid 101\)"):
        vqa_rad.load(root)
    (root / "testset.json").write_bytes(b'[\n  {"qid": 1,\n   "question": "caf\xe9"}\n]')
    with pytest.raises(DataError, match=r"testset\.json is not UTF-8 text: .* at line 3"):
        vqa_rad.load(root)


def test_json_nested_too_deeply_or_with_giant_numbers(tmp_path):
    for text in ("[" * 100_000, '[{"qid": ' + "9" * 5000 + "}]"):
        root = write_vqa_rad(tmp_path / str(len(text)))
        (root / "trainset.json").write_text(text)
        with pytest.raises(DataError, match=r"trainset\.json"):
            vqa_rad.load(root)
        (root / "train.jsonl").write_text(json.dumps(_row()) + "\n" + text + "\n")
        with pytest.raises(DataError, match=r"malformed json in train\.jsonl line 2"):
            jsonl.load(root)


def test_image_names_the_file_system_refuses_are_missing_images(tmp_path):
    _rows(tmp_path, [_row(image="x" * 5000), _row(image="a\x00.png")])
    with pytest.raises(DataError, match=r"missing image in train\.jsonl line 1 .*not usable"):
        jsonl.load(tmp_path)
    splits = jsonl.load(tmp_path, skip_invalid=True)
    assert [r.reason for r in splits.rejected] == ["missing image", "missing image"]


def test_vqa_v2_annotation_with_a_question_id_that_is_not_a_key(tmp_path):
    root = write_vqa_v2(tmp_path)
    path = root / "v2_mscoco_val2014_annotations.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["question_id"] = [10]
    path.write_text(json.dumps(data))
    with pytest.raises(
        DataError, match=r"missing annotation in .*val2014_questions\.json record 0 \(qid 10\)"
    ):
        vqa_v2.load(root)


def test_error_messages_escape_terminal_control_sequences(tmp_path):
    _rows(tmp_path, [_row(image="gone.png", qid="\x1b]0;owned\x07\x1b[2J")])
    with pytest.raises(DataError) as err:
        jsonl.load(tmp_path)
    assert "\x1b" not in str(err.value) and "\\x1b]0;owned\\x07\\x1b[2J" in str(err.value)
    rejection = jsonl.load(tmp_path, skip_invalid=True).rejected[0]
    assert "\x1b" not in rejection.source + rejection.detail


# --- 5. questions the text encoder truncates -----------------------------------------------------


def test_summary_counts_questions_over_max_length(tmp_path):
    rows = [_row(question="Is it red?"), _row(question="Is the shape in the middle red?", answer="no")]
    _rows(tmp_path, rows)
    (tmp_path / "test.jsonl").write_text(json.dumps(_row(question="What is the colour of the shape?")))
    splits = jsonl.load(tmp_path, val_fraction=0.0)
    vocab = AnswerVocab.from_records(splits.train)
    assert "long_questions" not in summarize(splits, vocab)  # no tokenizer: no count

    def tokenize(question: str) -> list[str]:  # the encoder's special tokens count too
        return ["[CLS]", *question.split(), "[SEP]"]

    summary = summarize(splits, vocab, tokenize=tokenize, max_length=6)
    assert summary["long_questions"] == {"max_length": 6, "train": 1, "val": 0, "test": 1, "longest": 9}
    assert (
        "questions over 6 tokens (truncated): train 1, val 0, test 1 (longest: 9 tokens)"
        in format_summary(summary)
    )
    with pytest.raises(ValueError, match="both tokenize and max_length"):
        summarize(splits, vocab, tokenize=tokenize)


# --- 6. random input to the loaders --------------------------------------------------------------

_FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_TEXT = st.text(st.characters(exclude_categories=()), max_size=20)  # lone surrogates and controls too
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)
_IMAGES = st.sampled_from(["a.png", "images/a.png", "../outside.png", "/etc/passwd", "gone.png", "link.png",
                           "images/../a.png", "a.png\x00", "x" * 300, ""])  # fmt: skip
_QUESTIONS = st.sampled_from(["Is it red?", "What?"]) | _TEXT | _JSON
_ANSWERS = st.sampled_from(["yes", "no", "a cat", "the", 3]) | _TEXT | _JSON
# Every format's names for the image, question and answer (VQA-RAD, JSONL, PathVQA).
_REQUIRED = {"image": _IMAGES, "image_name": _IMAGES, "img_id": _IMAGES, "question": _QUESTIONS,
             "sent": _QUESTIONS, "answer": _ANSWERS}  # fmt: skip
_OPTIONAL = {"answer_type": st.sampled_from(["OPEN", "CLOSED"]) | _JSON, "qid": _JSON,
             "label": st.dictionaries(_TEXT, st.floats() | _JSON, max_size=3) | _JSON}  # fmt: skip
_RECORDS = st.lists(
    st.fixed_dictionaries(_REQUIRED, optional=_OPTIONAL)  # nearly valid, hostile values
    | st.fixed_dictionaries({}, optional={**_REQUIRED, **_OPTIONAL})
    | _JSON,
    max_size=6,
)


def _dataset_dir() -> tempfile.TemporaryDirectory:
    """A folder holding `data/` (the dataset: a.png, images/a.png, link.png -> ../outside.png) and
    `outside.png` beside it."""
    folder = tempfile.TemporaryDirectory()
    root = Path(folder.name) / "data"
    (root / "images").mkdir(parents=True)
    for path in (root / "a.png", root / "images" / "a.png", root.parent / "outside.png"):
        Image.new("RGB", (8, 8)).save(path)
    (root / "link.png").symlink_to(root.parent / "outside.png")
    return folder


def _loads_or_names(load, root: Path, record_pattern: str, file_pattern: str) -> None:
    """`load(root)` either loads records with safe text and images inside `root`, or raises a
    DataError naming the file, and the record when a record is at fault (a RecordBuilder rejection,
    which says "(dataset at ...)")."""
    for skip in (False, True):
        try:
            splits = load(root, skip_invalid=skip)
        except DataError as err:
            message = str(err)
            assert re.search(file_pattern, message), message
            if "(dataset at" in message:
                assert re.search(record_pattern, message), message
            continue
        for record in splits.train + splits.val + splits.test:
            assert not UNSAFE_TEXT.search(record.question + record.answer), record
            assert record.image.resolve().is_relative_to(root.resolve()), record


def _json_text(records: list, ascii_only: bool) -> bytes:
    return json.dumps(records, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@_FUZZ
@given(data=st.binary(max_size=400) | _TEXT.map(lambda text: text.encode("utf-8", "surrogatepass")))
def test_jsonl_and_csv_loaders_on_random_bytes(data):
    with _dataset_dir() as folder:
        root = Path(folder) / "data"
        (root / "train.jsonl").write_bytes(data)
        _loads_or_names(jsonl.load, root, r"train\.jsonl line \d+", r"train\.jsonl line \d+")
        (root / "train.jsonl").unlink()
        (root / "train.csv").write_bytes(b"image,question,answer\n" + data)
        _loads_or_names(jsonl.load, root, r"train\.csv line \d+", r"train\.csv")


@_FUZZ
@given(records=_RECORDS, ascii_only=st.booleans())
def test_jsonl_loader_on_random_records(records, ascii_only):
    with _dataset_dir() as folder:
        root = Path(folder) / "data"
        lines = [json.dumps(r, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass") for r in records]
        (root / "train.jsonl").write_bytes(b"\n".join(lines))
        _loads_or_names(jsonl.load, root, r"train\.jsonl line \d+", r"train\.jsonl line \d+")


@_FUZZ
@given(data=st.binary(max_size=400), records=_RECORDS, ascii_only=st.booleans())
def test_vqa_rad_loader_on_random_bytes_and_records(data, records, ascii_only):
    with _dataset_dir() as folder:
        root = Path(folder) / "data"
        (root / "trainset.json").write_bytes(data)
        (root / "testset.json").write_bytes(_json_text(records, ascii_only))
        _loads_or_names(vqa_rad.load, root, r"(train|test)set\.json record \d+", r"(train|test)set\.json")
        (root / "trainset.json").write_bytes(_json_text(records, ascii_only))
        _loads_or_names(vqa_rad.load, root, r"(train|test)set\.json record \d+", r"(train|test)set\.json")


@_FUZZ
@given(data=st.binary(max_size=400), records=_RECORDS)
def test_pathvqa_loader_on_random_bytes_and_pickled_records(data, records):
    with _dataset_dir() as folder:
        root = Path(folder) / "data"
        (root / "qas").mkdir()
        for split in ("val", "test"):
            (root / "qas" / f"{split}_vqa.pkl").write_bytes(pickle.dumps([]))
        for content in (data, pickle.dumps(records)):
            (root / "qas" / "train_vqa.pkl").write_bytes(content)
            _loads_or_names(pathvqa.load, root, r"qas/train_vqa\.pkl record \d+", r"train_vqa\.pkl")


# --- 7. the image cache --------------------------------------------------------------------------


def test_image_store_cache_is_bounded_and_evicts_the_least_recently_used(tmp_path):
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), (i, 0, 0)).save(paths[-1])
    preprocessor = ImagePreprocessor(4, (0.5,) * 3, (0.5,) * 3)  # 3 x 4 x 4 uint8: 48 bytes an image
    assert ImageStore(preprocessor).max_bytes == CACHE_BYTES
    store = ImageStore(preprocessor, max_bytes=3 * 48)
    for path in paths[:3]:
        store.get(path)
    store.get(paths[0])  # a hit, and now the most recently used
    store.get(paths[3])  # evicts paths[1], the least recently used
    assert store.decoded_count == 4
    store.get(paths[0])
    assert store.decoded_count == 4
    store.get(paths[1])
    assert store.decoded_count == 5

    rng = np.random.default_rng(0)
    for index in rng.integers(0, len(paths), 200):
        tensor = store.get(paths[index])
        assert store.cached_bytes <= store.max_bytes
        assert store.cached_bytes == sum(t.numel() for t in store._images.values())
        assert torch.equal(tensor, store.preprocessor.to_uint8(load_rgb(paths[index])))
    assert len(store._images) == 3

    tiny = ImageStore(preprocessor, max_bytes=10)  # smaller than one image: nothing is kept
    tiny.get(paths[0])
    tiny.get(paths[0])
    assert tiny.decoded_count == 2 and tiny.cached_bytes == 0
