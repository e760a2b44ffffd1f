"""VQA accuracy: the official answer normalisation and the leave-one-out 10-annotator accuracy.

OFFICIAL_NORMALIZED and OFFICIAL_ACCURACY were obtained by running GT-Vision-Lab's own script once, outside this
repository (github.com/GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py at a013f00, its two Python 2
print statements ported to Python 3, nothing else changed): ``processDigitArticle(processPunctuation(s))`` after the
script's newline/tab/strip step for the first table, and ``VQAEval.evaluate()`` on one question (answers with
distinct ``answer_id`` as in the VQAv2 files; ``evalQA`` / 100) for the second. The script itself is not vendored.
"""

import json

import numpy as np
import pytest
import torch

from blip2.cli import main as cli_main
from blip2.eval.report import write_report
from blip2.eval.vqa_metrics import evaluate_vqa, normalize_answer, vqa_accuracy

TEN_YES = ["yes"] * 10
NO5 = ["no"] * 5

# input -> the official processPunctuation + processDigitArticle
OFFICIAL_NORMALIZED = {
    "Two.": "2", "yes.": "yes", "yes...": "yes", "...5": ".5", "2.5.": "2.5", "1.0": "1.0", "1.": "1", ".": "",
    "a..b": "ab", "red.blue": "redblue", "x.5.y": "x.5y", "one.two": "onetwo", "3 . 5": "3 5",
    "." * 32 + "yes": "yes", "." * 33 + "yes": ".yes", "." * 40 + "yes": "." * 8 + "yes",  # 32 periods at most
    "Yes!": "yes", "yes?!": "yes", "a ? b": "b", "yes, it is": "yes it is", "1,000": "1000", "10,5 dogs": "105 dogs",
    "a-b 1,2": "ab 12", "black-and-white": "black and white", "e-mail": "e mail", "(red)": "red",
    "it's": "it's", "3:30": "3:30", "dont": "don't", "Dont": "don't", "Im": "im", "hes": "he's", "he's": "he's",
    "let's": "let's", "ow's'at": "'ow's'at", "the dog": "dog", "a": "", "an apple": "apple", "none": "0",
    "ten": "10", "eleven": "eleven", "  A   Red\tBall \n": "red ball",
}

# (prediction, the ten human answers, the official script's accuracy)
OFFICIAL_ACCURACY = [
    ("yes", TEN_YES, 1.0),
    ("Yes", TEN_YES, 0.0),  # unanimous answers: nothing is normalised
    ("yes.", TEN_YES, 0.0),
    (" yes\n", TEN_YES, 1.0),  # ... but whitespace is always cleaned
    ("yes", ["yes"] * 9 + [" yes\t"], 1.0),  # unanimous once cleaned
    ("two", ["2"] * 10, 0.0),
    ("1.0", ["1"] * 10, 0.0),
    ("the dog", ["dog"] * 10, 0.0),
    ("yes", ["Yes."] * 10, 0.0),
    ("Yes.", ["Yes."] * 10, 1.0),
    ("yes.", ["yes"] * 9 + ["Yes"], 1.0),  # not unanimous: both sides normalised
    ("Two.", ["2", "2", "2", "two"] + ["3"] * 6, 1.0),
    ("the three", ["2", "2", "2", "two"] + ["3"] * 6, 1.0),
    ("1.0", ["1"] * 5 + ["one"] * 5, 0.0),  # a period before a digit stays
    ("1", ["1"] * 5 + ["one"] * 5, 1.0),
    ("yes...", ["yes"] * 5 + NO5, 1.0),
    ("...5", ["5"] * 3 + [".5"] * 3 + ["0.5"] * 4, 0.9),  # "...5" -> ".5"
    ("." * 40 + "yes", ["yes"] * 5 + NO5, 0.0),  # 8 periods survive
    ("an", ["the", "a"] + ["no"] * 8, 0.6),  # articles vanish: "" == ""
    ("Dont", ["don't", "don't", "do not", "do not", "do not", "do not", "don't", "no", "no", "no"], 0.9),
    ("none", ["0", "0", "zero"] + ["1"] * 7, 0.9),
    ("1,000", ["1000", "1000", "1 000", "1000"] + ["5"] * 6, 0.9),
    ("black-and-white", ["black and white", "black and white", "black & white"] + ["bw"] * 7, 0.6),
    ("2.", ["2", "2"] + ["3"] * 8, 0.6),
    ("yes", ["yes", "yes"] + ["no"] * 8, 0.6),
    ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),
]


@pytest.mark.parametrize("raw, normalized", OFFICIAL_NORMALIZED.items())
def test_normalize_answer_equals_the_official_script(raw, normalized):
    assert normalize_answer(raw) == normalized


@pytest.mark.parametrize("prediction, answers, accuracy", OFFICIAL_ACCURACY)
def test_accuracy_equals_the_official_script(prediction, answers, accuracy):
    assert vqa_accuracy(prediction, answers) == pytest.approx(accuracy)
    as_dicts = {"answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]}
    assert evaluate_vqa({1: prediction}, {1: as_dicts})["overall"] == pytest.approx(accuracy)


def test_always_normalises_unanimous_answers_too():
    assert vqa_accuracy("Yes.", TEN_YES, normalize="always") == 1.0
    assert vqa_accuracy("the two", ["2"] * 10, normalize="always") == 1.0
    assert vqa_accuracy("Yes.", TEN_YES) == 0.0  # the official default
    # where the answers differ the two modes agree
    for prediction, answers, accuracy in OFFICIAL_ACCURACY:
        if len({a.strip() for a in answers}) > 1:
            assert vqa_accuracy(prediction, answers, normalize="always") == pytest.approx(accuracy)
    with pytest.raises(ValueError, match="normalize must be one of official, always, got 'sometimes'"):
        vqa_accuracy("yes", TEN_YES, normalize="sometimes")


def test_cli_takes_normalize_for_vqa_only(capsys):
    assert cli_main(["eval", "caption", "data.json", "--normalize", "always"]) == 2
    assert "--normalize does not apply to eval caption" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["eval", "vqa", "data.json", "--normalize", "sometimes"])


@pytest.mark.parametrize("raw, normalized", [
    ("An apple", "apple"),
    ("whats", "what's"),
    ("2.5", "2.5"),                          # a period before a digit stays
    ("mr. smith", "mr smith"),
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
    assert vqa_accuracy("four", answers) == 0.0


def test_single_answer_is_exact_match():
    # one answer is unanimous: exact match (whitespace cleaned) officially, after normalisation with "always"
    assert vqa_accuracy(" red circle\n", ["red circle"]) == 1.0
    assert vqa_accuracy("The red circle.", ["red circle"]) == 0.0
    assert vqa_accuracy("The red circle.", ["red circle"], normalize="always") == 1.0
    assert vqa_accuracy("blue circle", ["red circle"], normalize="always") == 0.0


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
    predictions = {1: "yes", 2: "two", 3: "blue", 4: "black"}
    result = evaluate_vqa(predictions, vqa_references())
    assert result["num_questions"] == 4
    assert result["overall"] == pytest.approx((1.0 + 0.6 + 1.0 + 0.0) / 4)
    assert result["per_question_type"] == pytest.approx({"how many": 0.6, "is the": 1.0, "what color": 0.5})
    assert result["per_answer_type"] == pytest.approx({"number": 0.6, "other": 0.5, "yes/no": 1.0})
    predictions[1] = "Yes"  # against ten unanimous "yes": right only when every answer is normalised
    assert evaluate_vqa(predictions, vqa_references())["per_answer_type"]["yes/no"] == 0.0
    assert evaluate_vqa(predictions, vqa_references(), normalize="always")["per_answer_type"]["yes/no"] == 1.0


def test_evaluate_vqa_with_plain_answer_lists():
    result = evaluate_vqa({"q1": "Square.", "q2": "circle"}, {"q1": ["square"], "q2": ["triangle"]}, normalize="always")
    assert result == {"overall": 0.5, "num_questions": 2}
    assert evaluate_vqa({"q1": "square", "q2": "Square."}, {"q1": ["square"], "q2": ["square"]})["overall"] == 0.5


def test_evaluate_vqa_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"1 question\(s\) without a prediction \(e.g. \['q2'\]\)"):
        evaluate_vqa({"q1": "yes"}, {"q1": ["yes"], "q2": ["no"]})
    with pytest.raises(ValueError, match="question 'q1' needs a non-empty list"):
        evaluate_vqa({"q1": "yes"}, {"q1": []})
    with pytest.raises(ValueError, match="1 of 2 references lack 'question_type'"):
        evaluate_vqa({1: "yes", 2: "no"}, {1: {"answers": ["yes"], "question_type": "is"}, 2: {"answers": ["no"]}})


def test_write_report_round_trips_vqa_results(tmp_path):
    result = evaluate_vqa({1: "yes", 2: "two", 3: "blue", 4: "black"}, vqa_references())
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
