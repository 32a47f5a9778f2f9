"""Answer normalisation (the VQA evaluation rules), VQA accuracy and the answer vocabulary."""

import json
from pathlib import Path

import pytest

from dualhead.vqa.data.answers import AnswerVocab, normalize_answer, vqa_accuracy, vqa_soft_scores
from dualhead.vqa.data.records import VQARecord


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # case and surrounding / inner whitespace
        ("Yes", "yes"),
        ("YES", "yes"),
        (" yes ", "yes"),
        ("multiple   spaces\there\n", "multiple spaces here"),
        # articles
        ("a dog", "dog"),
        ("the cat", "cat"),
        ("An apple", "apple"),
        ("theater", "theater"),
        # number words, including the evaluation script's "none" -> "0"
        ("two", "2"),
        ("Two dogs", "2 dogs"),
        ("ten", "10"),
        ("None", "0"),
        # contractions
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("whats that", "what's that"),
        ("don't", "don't"),
        # punctuation: glued marks become spaces, marks next to a space vanish
        ("yes/no", "yes no"),
        ("T2-MRI", "t2 mri"),
        ("x - ray", "x ray"),
        ("hello, world", "hello world"),
        ("(yes)", "yes"),
        ("what?!", "what"),
        # numbers: thousands separators and decimal points survive, full stops do not
        ("10,000", "10000"),
        ("2.5", "2.5"),
        ("3.4 cm", "3.4 cm"),
        ("csf is white.", "csf is white"),
        ("3.", "3"),
        # JSON numbers (VQA-RAD stores some answers as 4)
        (4, "4"),
        (2.5, "2.5"),
        # everything at once
        ("  The TWO Dogs, dont! ", "2 dogs don't"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_answer_is_idempotent_on_normalised_text():
    for raw in ["Two dogs", "T2-MRI", "10,000", "dont", "csf is white.", "a b.c"]:
        once = normalize_answer(raw)
        assert normalize_answer(once) == once


@pytest.mark.parametrize("bad", [None, True, ["yes"], {"a": 1}])
def test_normalize_answer_rejects_non_text(bad):
    with pytest.raises(TypeError, match="string or a number"):
        normalize_answer(bad)


def test_soft_scores_count_normalised_answers():
    scores = vqa_soft_scores(["Two"] * 2 + ["2"] + ["no"] * 5 + ["a cat", "cat"])
    assert scores == {"2": 1.0, "no": 1.0, "cat": pytest.approx(2 / 3)}
    assert vqa_soft_scores(["yes"]) == {"yes": pytest.approx(1 / 3)}


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        # 10 answers, k matching: (k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)) / 10
        (0, 0.0),
        (1, 0.3),  # 9 subsets with 1 match (1/3), 1 with none
        (2, 0.6),  # 2 * 1/3 + 8 * 2/3 = 6, over 10
        (3, 0.9),  # 3 * 2/3 + 7 * 1 = 9, over 10
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_leave_one_out(matches, expected):
    humans = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("cat", humans) == pytest.approx(expected)


def test_vqa_accuracy_normalises_and_handles_fewer_answers():
    # 4 answers, 3 matching: matched subsets hold 2 matches (2/3), the unmatched one 3 (1).
    assert vqa_accuracy("Two", ["2", "2", "2", "3"]) == pytest.approx((3 * 2 / 3 + 1) / 4)
    # 5 answers, 2 matching: (2 * 1/3 + 3 * 2/3) / 5 = 8/15
    assert vqa_accuracy("a cat", ["cat", "Cat", "dog", "dog", "dog"]) == pytest.approx(8 / 15)
    # One human answer: exact match.
    assert vqa_accuracy("Yes", ["yes"]) == 1.0
    assert vqa_accuracy("no", ["yes"]) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("yes", [])


def _record(answer: str, scores: dict[str, float] | None = None) -> VQARecord:
    return VQARecord(Path("img.png"), "q?", answer, None, answer, "test", answer_scores=scores)


TRAIN = [_record(a) for a in ["dog", "cat", "dog", "cat", "bird", "dog", "cat", "yes", "no", "yes"]]


def test_vocab_orders_by_frequency_then_alphabet_and_skips_yes_no():
    vocab = AnswerVocab.from_records(TRAIN)
    assert vocab.open_answers == ["cat", "dog", "bird"]  # cat and dog tie at 3: alphabetical
    assert len(vocab) == 3
    assert vocab.open_index("dog") == 1
    assert vocab.open_index("fish") is None
    assert vocab.binary_index("no") == 0 and vocab.binary_index("yes") == 1
    with pytest.raises(ValueError, match="not a yes/no answer"):
        vocab.binary_index("cat")
    assert vocab.single_head_answers == ["no", "yes", "cat", "dog", "bird"]
    assert vocab.single_index("yes") == 1 and vocab.single_index("bird") == 4
    assert vocab.single_index("fish") is None
    assert AnswerVocab.from_records(list(reversed(TRAIN))).open_answers == vocab.open_answers


def test_vocab_min_count_and_max_size():
    assert AnswerVocab.from_records(TRAIN, min_count=2).open_answers == ["cat", "dog"]
    assert AnswerVocab.from_records(TRAIN, max_size=1).open_answers == ["cat"]
    with pytest.raises(ValueError, match="min_count"):
        AnswerVocab.from_records(TRAIN, min_count=0)


def test_vocab_counts_soft_score_answers_of_open_records():
    records = [
        _record("cat", {"cat": 1.0, "kitten": 1 / 3, "yes": 1 / 3}),
        _record("yes", {"yes": 1.0, "puppy": 1 / 3}),  # a binary record: not counted
    ]
    assert AnswerVocab.from_records(records).open_answers == ["cat", "kitten"]


def test_vocab_coverage():
    vocab = AnswerVocab.from_records(TRAIN)
    test = [_record(a) for a in ["dog", "fish", "yes", "cat", "owl"]]
    assert vocab.coverage(test) == {"open_questions": 4, "in_vocab": 2, "out_of_vocab": 2, "coverage": 0.5}
    assert vocab.coverage([])["coverage"] == 1.0


def test_vocab_json_round_trip():
    vocab = AnswerVocab.from_records(TRAIN)
    restored = AnswerVocab.from_json(json.loads(json.dumps(vocab.to_json())))
    assert restored.open_answers == vocab.open_answers
    assert restored.single_head_answers == vocab.single_head_answers
    with pytest.raises(ValueError, match="open_answers"):
        AnswerVocab.from_json({"answers": []})
    with pytest.raises(ValueError, match="binary answers"):
        AnswerVocab.from_json({"binary_answers": ["yes", "no"], "open_answers": []})
    with pytest.raises(ValueError, match="binary head"):
        AnswerVocab(["cat", "yes"])
