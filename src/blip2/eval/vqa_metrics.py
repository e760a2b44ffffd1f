"""VQA accuracy as the official VQAv2 evaluation script computes it (GT-Vision-Lab ``vqaEval.py``).

Both sides first get newlines/tabs turned into spaces and outer whitespace stripped. Then, by default
(``normalize="official"``), the answers are normalised only when the human answers disagree: if all of them
are the same string, the prediction must equal it exactly. Normalisation (``normalize_answer``), in this
order: punctuation removed or replaced by a space; periods not followed by a digit removed (at most 32, as
officially); lowercased; number words "none", "zero".."ten" to digits; the articles a/an/the dropped;
apostrophe-less contractions restored ("dont" -> "don't"); words joined by single spaces.
``normalize="always"`` normalises both sides of every question (raw answers such as "Square." then match).

Accuracy of one prediction against n human answers (n = 10 in VQAv2): the mean, over the n
leave-one-out subsets of the answers, of ``min(#subset answers equal to the prediction / t, 1)``
with ``t = min(3, n - 1)``. For n = 10 this is exactly the official metric (t = 3); with a single
answer it is exact match. See docs/evaluation.md.
"""

from __future__ import annotations

import functools
import re
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, Literal

from blip2.errors import InputError

# Replaced by a space, or removed when it touches a space or the text holds a digit,digit comma.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!")
DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
PERIOD_LIMIT = 32  # the official script passes re.UNICODE (= 32) as sub()'s count: the 33rd period on stays
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# The official table, minus entries that can never change a word: identity entries ("let's",
# "she's") and keys with a capital "I" ("Im", "Ive", ...), which never match lowercased words.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

OFFICIAL_MATCH_THRESHOLD = 3  # "an answer is 100% right if at least 3 humans gave it"
Normalize = Literal["official", "always"]
NORMALIZE_MODES: tuple[str, ...] = ("official", "always")


def strip_punctuation(text: str) -> str:
    """The official punctuation step: each mark is deleted or replaced by a space, then stray periods go.

    A mark is deleted (not spaced) when it appears next to a space anywhere in the text, or when
    the text holds a comma between two digits; so "1,000" -> "1000", "yes, it is" -> "yes it is",
    "black-and-white" -> "black and white". Periods go unless a digit follows ("2.5" stays), the first 32 of
    them only ("..." -> "", "...5" -> ".5").
    """
    has_digit_comma = DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text  # tested on the input, as officially
        out = out.replace(mark, "" if touches_space or has_digit_comma else " ")
    return PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=PERIOD_LIMIT)


def canonical_words(text: str) -> str:
    """The official word step: lowercase, number words to digits, drop articles, restore contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def clean_whitespace(answer: str) -> str:
    """Newlines and tabs to spaces, outer whitespace stripped: all the official script does to every answer."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


@functools.lru_cache(maxsize=1 << 16)  # answers repeat a lot: VQAv2 val normalises 2.3M strings
def normalize_answer(answer: str) -> str:
    """Normalise an answer as the official VQA evaluation does: "Two." -> "2", "the dog" -> "dog"."""
    return canonical_words(strip_punctuation(clean_whitespace(answer)))


def check_normalize(normalize: str) -> None:
    if normalize not in NORMALIZE_MODES:
        raise InputError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, got {normalize!r}")


def compared_answers(prediction: str, answers: Sequence[str], normalize: Normalize = "official") -> tuple[str, list[str]]:
    """(prediction, answers) as they are compared. ``"official"``: normalised only when the human answers
    (whitespace-cleaned) are not all the same string; ``"always"``: normalised for every question."""
    check_normalize(normalize)
    prediction, answers = clean_whitespace(prediction), [clean_whitespace(answer) for answer in answers]
    if normalize == "always" or len(set(answers)) > 1:
        return normalize_answer(prediction), [normalize_answer(answer) for answer in answers]
    return prediction, answers


def vqa_accuracy(prediction: str, answers: Sequence[str], normalize: Normalize = "official") -> float:
    """Accuracy in [0, 1] of one predicted answer against the human answers of one question.

    With 10 answers: 0 matches -> 0.0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0 (leave-one-out
    average of min(matches / 3, 1)). With one answer: exact match. ``normalize``: see ``compared_answers``
    (the official default compares unanimous answers unnormalised: "Yes" against ten "yes" scores 0).
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise InputError(f"vqa_accuracy needs a non-empty list of human answers, got {answers!r}")
    predicted, answers = compared_answers(prediction, answers, normalize)
    is_match = [answer == predicted for answer in answers]
    if len(is_match) == 1:
        return float(is_match[0])
    threshold = min(OFFICIAL_MATCH_THRESHOLD, len(is_match) - 1)
    total_matches = sum(is_match)
    subset_scores = [min((total_matches - left_out) / threshold, 1.0) for left_out in is_match]
    return sum(subset_scores) / len(subset_scores)


def _reference_fields(question_id: Hashable, reference: Any) -> tuple[Sequence[str], str | None, str | None]:
    """(answers, question_type, answer_type) of one reference: a list of answers or a VQA-style dict."""
    if isinstance(reference, Mapping):
        if "answers" not in reference:
            raise InputError(f"reference for question {question_id!r} is a dict without an 'answers' key: "
                             f"{reference!r}")
        answers = [a["answer"] if isinstance(a, Mapping) else a for a in reference["answers"]]
        question_type, answer_type = reference.get("question_type"), reference.get("answer_type")
    else:
        answers, question_type, answer_type = reference, None, None
    if isinstance(answers, str) or len(answers) == 0:
        raise InputError(f"reference for question {question_id!r} needs a non-empty list of answers, got {answers!r}")
    return answers, question_type, answer_type


def _mean_by_group(scores: list[float], groups: list[str | None], field: str) -> dict[str, float] | None:
    """Mean score per group; None when no reference names a group; an error when only some do."""
    missing = [i for i, group in enumerate(groups) if group is None]
    if len(missing) == len(groups):
        return None
    if missing:
        raise InputError(f"{len(missing)} of {len(groups)} references lack '{field}' while others have it; "
                         f"give it for every question or for none")
    members: dict[str, list[float]] = defaultdict(list)
    for score, group in zip(scores, groups):
        members[group].append(score)
    return {group: sum(values) / len(values) for group, values in sorted(members.items())}


def evaluate_vqa(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Any], normalize: Normalize = "official"
) -> dict[str, Any]:
    """Mean VQA accuracy (fraction in [0, 1]) over questions, with per-type breakdowns when given.

    predictions: question id -> predicted answer.
    references: question id -> list of human answers, or a dict as in the VQA annotation files:
    ``{"answers": [str or {"answer": str}, ...], "question_type": ..., "answer_type": ...}``.
    Returns ``{"overall", "num_questions"}`` plus ``"per_question_type"`` / ``"per_answer_type"``
    when the references carry those fields. Both mappings must cover the same question ids.
    ``normalize``: "official" (normalise only questions whose human answers differ) or "always".
    """
    missing = [qid for qid in references if qid not in predictions]
    extra = [qid for qid in predictions if qid not in references]
    if missing or extra:
        raise InputError(f"predictions and references must cover the same questions: {len(missing)} question(s) "
                         f"without a prediction (e.g. {missing[:3]}), {len(extra)} prediction(s) without a "
                         f"reference (e.g. {extra[:3]})")
    if not references:
        raise InputError("evaluate_vqa got no questions: references is empty")
    scores, question_types, answer_types = [], [], []
    for qid, reference in references.items():
        answers, question_type, answer_type = _reference_fields(qid, reference)
        scores.append(vqa_accuracy(predictions[qid], answers, normalize))
        question_types.append(question_type)
        answer_types.append(answer_type)
    results: dict[str, Any] = {"overall": sum(scores) / len(scores), "num_questions": len(scores)}
    for key, field, groups in (("per_question_type", "question_type", question_types),
                               ("per_answer_type", "answer_type", answer_types)):
        breakdown = _mean_by_group(scores, groups, field)
        if breakdown is not None:
            results[key] = breakdown
    return results


def majority_answers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """(group, answer) pairs -> each group's most common answer (ties: the first seen): the blind prior, what a
    model that answers each kind of question alike, never looking at the image, says."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for group, answer in pairs:
        counts[group][answer] += 1
    return {group: answers.most_common(1)[0][0] for group, answers in counts.items()}
