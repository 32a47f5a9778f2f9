"""Answer normalisation, VQA accuracy and the open-answer vocabulary.

`normalize_answer` follows the official VQA evaluation script (``vqaEval.py`` of the VQA API) and is
used for training targets and evaluation alike, so a prediction is scored against the same strings
the model was trained on.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from .records import OPEN, YES_NO, VQARecord

# The contraction table of the official evaluation script, less the entries that can never fire
# (capitalised keys, applied after lowercasing; keys mapped to themselves) and less its one reversed
# entry ("somebody'd" -> "somebodyd").
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

ARTICLES = frozenset({"a", "an", "the"})

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")  # fmt: skip

# The official script's period pattern, "(?!<=\d)(\.)(?!\d)", removes every period not followed by a
# digit (its first look-ahead is always true); this is that behaviour, written plainly.
_PERIOD = re.compile(r"\.(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"\d,\d")


def _strip_punctuation(text: str) -> str:
    """Punctuation next to a space (or anywhere, in text with a number like 10,000) is deleted;
    elsewhere it becomes a space ("yes/no" -> "yes no")."""
    in_number = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        glued = in_number or (mark + " " in text) or (" " + mark in text)
        out = out.replace(mark, "" if glued else " ")
    return _PERIOD.sub("", out)


def normalize_answer(text: str | int | float) -> str:
    """The VQA evaluation normalisation: case, punctuation, number words, articles, contractions.

    JSON numbers (VQA-RAD stores some answers as ``4``) are taken in their string form first.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise TypeError(f"an answer must be a string or a number, not {type(text).__name__}: {text!r}")
    return _normalize_text(str(text))


@functools.lru_cache(maxsize=1 << 16)
def _normalize_text(text: str) -> str:
    # Cached: datasets repeat a few thousand answers hundreds of thousands of times (VQA v2).
    text = text.replace("\n", " ").replace("\t", " ").strip()
    words = []
    for word in _strip_punctuation(text).lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_soft_scores(answers: Sequence[str]) -> dict[str, float]:
    """Soft targets from human answers: min(count / 3, 1) per distinct normalised answer."""
    counts = Counter(normalize_answer(answer) for answer in answers)
    return {answer: min(count / 3.0, 1.0) for answer, count in counts.items()}


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Official VQA accuracy: min(#matching humans / 3, 1) averaged over the leave-one-out subsets.

    With 10 answers that is the 10 subsets of 9; with fewer, the subsets of n - 1. A single human
    answer has no leave-one-out subset to speak of, so it is scored by exact match.
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(answer) == predicted for answer in human_answers]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    return sum(min((total - match) / 3.0, 1.0) for match in matches) / len(matches)


class AnswerVocab:
    """The open-answer vocabulary of a training split, plus the fixed yes/no classes.

    Answers are normalised strings (as stored in `VQARecord.answer`). Open answers are ordered by
    frequency, then alphabetically, so the same records always give the same indices.
    """

    def __init__(self, open_answers: Sequence[str]):
        self.open_answers: list[str] = list(open_answers)
        if set(self.open_answers) & set(YES_NO):
            raise ValueError(f"open answers must not contain {YES_NO}: they belong to the binary head")
        if len(set(self.open_answers)) != len(self.open_answers):
            raise ValueError("open answers contain duplicates")
        self._open = {answer: i for i, answer in enumerate(self.open_answers)}
        self.single_head_answers: list[str] = list(YES_NO) + self.open_answers
        self._single = {answer: i for i, answer in enumerate(self.single_head_answers)}

    @classmethod
    def from_records(
        cls, records: Iterable[VQARecord], min_count: int = 1, max_size: int | None = None
    ) -> AnswerVocab:
        """Build from the open-task records of a training split.

        Each record counts once for its answer and once for every other answer in its
        `answer_scores` (VQA v2's human answers), yes/no excepted. Answers seen fewer than
        `min_count` times are dropped; `max_size` keeps the most frequent.
        """
        if min_count < 1:
            raise ValueError(f"min_count must be at least 1, got {min_count}")
        if max_size is not None and max_size < 1:
            raise ValueError(f"max_size must be at least 1 (or None), got {max_size}")
        counts: Counter[str] = Counter()
        for record in records:
            if record.task != OPEN:
                continue
            answers = {record.answer, *(record.answer_scores or ())}
            counts.update(answer for answer in answers if answer not in YES_NO)
        ranked = sorted(
            (item for item in counts.items() if item[1] >= min_count), key=lambda x: (-x[1], x[0])
        )
        return cls([answer for answer, _ in ranked[:max_size]])

    def __len__(self) -> int:
        return len(self.open_answers)

    def open_index(self, answer: str) -> int | None:
        """Class index of an open answer, or None when it is outside the vocabulary."""
        return self._open.get(answer)

    @staticmethod
    def binary_index(answer: str) -> int:
        """Class index of a yes/no answer (no=0, yes=1)."""
        try:
            return YES_NO.index(answer)
        except ValueError:
            raise ValueError(f"{answer!r} is not a yes/no answer; expected one of {YES_NO}") from None

    def single_index(self, answer: str) -> int | None:
        """Class index in the single head's answer list (yes/no first), or None when unknown."""
        return self._single.get(answer)

    def coverage(self, records: Iterable[VQARecord]) -> dict[str, float]:
        """How many open-task answers of `records` fall inside / outside the vocabulary."""
        open_answers = [record.answer for record in records if record.task == OPEN]
        inside = sum(answer in self._open for answer in open_answers)
        return {
            "open_questions": len(open_answers),
            "in_vocab": inside,
            "out_of_vocab": len(open_answers) - inside,
            "coverage": inside / len(open_answers) if open_answers else 1.0,
        }

    def to_json(self) -> dict[str, Any]:
        """A plain dict to save beside model weights."""
        return {"binary_answers": list(YES_NO), "open_answers": list(self.open_answers)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AnswerVocab:
        """Rebuild from `to_json` output."""
        if not isinstance(data, dict) or not isinstance(data.get("open_answers"), list):
            raise ValueError("an answer vocabulary needs a dict with an 'open_answers' list")
        if data.get("binary_answers", list(YES_NO)) != list(YES_NO):
            raise ValueError(f"binary answers {data['binary_answers']!r} differ from {list(YES_NO)}")
        if not all(isinstance(answer, str) for answer in data["open_answers"]):
            raise ValueError("open answers must all be strings")
        return cls(data["open_answers"])


def first_difference(left: Sequence[str], right: Sequence[str]) -> tuple[int, str, str]:
    """Where two answer lists first differ, and what each holds there (``nothing`` past its end);
    for error messages about vocabularies that must match."""
    position = next((i for i, (a, b) in enumerate(zip(left, right, strict=False)) if a != b), min(len(left), len(right)))

    def at(answers: Sequence[str]) -> str:
        return repr(answers[position]) if position < len(answers) else "nothing"

    return position, at(left), at(right)
