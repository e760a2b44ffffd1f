"""VQA accuracy: the official answer normalisation and the leave-one-out 10-annotator accuracy."""

import json

import numpy as np
import pytest
import torch

from blip2.eval.report import write_report
from blip2.eval.vqa_metrics import evaluate_vqa, normalize_answer, vqa_accuracy


@pytest.mark.parametrize("raw, normalized", [
    ("Two.", "2"),                           # period dropped, number word -> digit
    ("the dog", "dog"),                      # article dropped
    ("An apple", "apple"),
    ("dont", "don't"),                       # contraction restored
    ("whats", "what's"),
    ("none", "0"),
    ("eleven", "eleven"),                    # only zero..ten are mapped
    ("1,000", "1000"),                       # a digit,digit comma makes every mark vanish
    ("2.5", "2.5"),                          # a period before a digit stays
    ("mr. smith", "mr smith"),
    ("Yes!", "yes"),
    ("yes, it is", "yes it is"),             # a mark next to a space is removed ...
    ("black-and-white", "black and white"),  # ... otherwise it becomes a space
    ("(red)", "red"),
    ("it's", "it's"),                        # apostrophes are not punctuation here
    ("3:30", "3:30"),                        # nor colons
    ("  A   Red\tBall \n", "red ball"),      # whitespace collapsed, lowercased
])
def test_normalize_answer_matches_official_rules(raw, normalized):
    assert normalize_answer(raw) == normalized


@pytest.mark.parametrize("matches, accuracy", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_ten_answers_leave_one_out_accuracy(matches, accuracy):
    # mean over the 10 leave-one-out subsets of min(matches in the 9 others / 3, 1):
    # e.g. 2 matches: 8 subsets see 2 (2/3), 2 subsets see 1 (1/3) -> (8*2/3 + 2*1/3) / 10 = 0.6
    answers = ["yes"] * matches + ["no"] * (10 - matches)
    assert vqa_accuracy("yes", answers) == pytest.approx(accuracy)


def test_accuracy_compares_normalised_answers():
    answers = ["2", "2", "2", "two", "3", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("Two.", answers) == pytest.approx(1.0)  # four matches once "two" -> "2"
    assert vqa_accuracy("the three", answers) == pytest.approx(1.0)
    assert vqa_accuracy("four", answers) == 0.0


def test_single_answer_is_exact_match_after_normalisation():
    assert vqa_accuracy("The red circle.", ["red circle"]) == 1.0
    assert vqa_accuracy("blue circle", ["red circle"]) == 0.0


def test_few_answers_use_a_reachable_threshold():
    # n answers: threshold min(3, n - 1), so unanimous agreement always scores 1.0
    assert vqa_accuracy("cat", ["cat", "dog"]) == pytest.approx(0.5)  # subsets: {dog} -> 0, {cat} -> 1
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(2 / 3)  # (1/2 + 1/2 + 1) / 3
    assert vqa_accuracy("cat", ["cat", "cat", "cat"]) == pytest.approx(1.0)


def test_accuracy_rejects_missing_answers():
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("yes", "yes")


def vqa_references():
    def answers(*words):
        return [{"answer": word, "answer_id": i + 1} for i, word in enumerate(words)]
    return {
        1: {"answers": answers(*["yes"] * 10), "question_type": "is the", "answer_type": "yes/no"},
        2: {"answers": answers(*["2"] * 2 + ["3"] * 8), "question_type": "how many", "answer_type": "number"},
        3: {"answers": answers(*["red"] * 5 + ["blue"] * 5), "question_type": "what color", "answer_type": "other"},
        4: {"answers": answers(*["white"] * 10), "question_type": "what color", "answer_type": "other"},
    }


def test_evaluate_vqa_overall_and_per_type():
    predictions = {1: "Yes", 2: "two", 3: "blue", 4: "black"}
    result = evaluate_vqa(predictions, vqa_references())
    assert result["num_questions"] == 4
    assert result["overall"] == pytest.approx((1.0 + 0.6 + 1.0 + 0.0) / 4)
    assert result["per_question_type"] == pytest.approx({"how many": 0.6, "is the": 1.0, "what color": 0.5})
    assert result["per_answer_type"] == pytest.approx({"number": 0.6, "other": 0.5, "yes/no": 1.0})


def test_evaluate_vqa_with_plain_answer_lists():
    result = evaluate_vqa({"q1": "Square.", "q2": "circle"}, {"q1": ["square"], "q2": ["triangle"]})
    assert result == {"overall": 0.5, "num_questions": 2}


def test_evaluate_vqa_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"1 question\(s\) without a prediction \(e.g. \['q2'\]\)"):
        evaluate_vqa({"q1": "yes"}, {"q1": ["yes"], "q2": ["no"]})
    with pytest.raises(ValueError, match="question 'q1' needs a non-empty list"):
        evaluate_vqa({"q1": "yes"}, {"q1": []})
    with pytest.raises(ValueError, match="1 of 2 references lack 'question_type'"):
        evaluate_vqa({1: "yes", 2: "no"}, {1: {"answers": ["yes"], "question_type": "is"}, 2: {"answers": ["no"]}})


def test_write_report_round_trips_vqa_results(tmp_path):
    result = evaluate_vqa({1: "Yes", 2: "two", 3: "blue", 4: "black"}, vqa_references())
    result["loss"] = torch.tensor(0.25)  # one-element tensors and numpy scalars are unwrapped
    result["steps"] = np.int64(7)
    json_path, md_path = write_report(result, tmp_path / "reports", "vqa_val")
    assert json_path == tmp_path / "reports" / "vqa_val.json" and md_path.suffix == ".md"
    stored = json.loads(json_path.read_text())
    assert stored["overall"] == pytest.approx(0.65) and stored["loss"] == 0.25 and stored["steps"] == 7
    assert stored["per_question_type"]["what color"] == pytest.approx(0.5)
    table = md_path.read_text().splitlines()
    assert table[0] == "# vqa_val"
    assert "| overall | 0.6500 |" in table
    assert "| per_question_type/what color | 0.5000 |" in table
    assert "| per_answer_type/yes/no | 1.0000 |" in table
    assert "| num_questions | 4 |" in table


def test_write_report_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        write_report({"a": 1.0}, tmp_path, "../escape")
    with pytest.raises(TypeError, match=r"results/scores is a Tensor"):
        write_report({"scores": torch.zeros(3)}, tmp_path, "bad")
