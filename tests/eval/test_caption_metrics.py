"""COCO caption metrics through pycocoevalcap: tokenisation, known scores, Java fallbacks, no hangs."""

import sys
import warnings

import pytest

from blip2.eval import caption_metrics
from blip2.eval.caption_metrics import (
    MetricSkippedWarning,
    evaluate_captions,
    find_java,
    ptb_tokenize,
    simple_tokenize,
    spice_available,
)

needs_java = pytest.mark.skipif(find_java() is None, reason="java is not installed")
FAST = ("Bleu", "ROUGE_L", "CIDEr")  # the pure-Python metrics

PLAIN_CAPTIONS = ["A black-and-white dog's toy, on the grass!", "Don't stop: it's 1,000 cats.",
                  "two people riding bikes down a street", "A man's hat is RED; the woman's is blue?"]


def test_simple_tokenize_splits_like_ptb():
    assert simple_tokenize(PLAIN_CAPTIONS[0]) == "a black-and-white dog 's toy on the grass"
    assert simple_tokenize(PLAIN_CAPTIONS[1]) == "do n't stop it 's 1,000 cats"
    assert simple_tokenize("A  cat\nsitting... 'here'") == "a cat sitting here"


@needs_java
def test_ptb_tokenizer_agrees_with_simple_tokenize_on_plain_captions():
    assert ptb_tokenize(PLAIN_CAPTIONS + ["", "café\r\nau lait"], find_java()) == (
        [simple_tokenize(caption) for caption in PLAIN_CAPTIONS] + ["", "café au lait"])


def run(predictions, references, metrics=FAST):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast metrics never warn when java is there
        return evaluate_captions(predictions, references, metrics=metrics)


def test_identical_captions_score_perfectly():
    captions = {"img1": "a red square above a blue circle", "img2": "two green triangles side by side",
                "img3": "an orange star in the corner"}
    scores = run(captions, {key: [caption] for key, caption in captions.items()})
    for n in range(1, 5):
        assert scores[f"Bleu_{n}"] == pytest.approx(1.0)
    assert scores["ROUGE_L"] == pytest.approx(1.0)
    # CIDEr-D of a caption equal to its only reference, no n-gram shared with other images: 10 * cosine 1
    assert scores["CIDEr"] == pytest.approx(10.0)


def test_hand_checked_bleu_and_rouge():
    scores = run({0: "a cat sits on the mat"}, {0: ["the cat is on the mat"]})
    # unigrams: cat, on, the, mat match -> 4/6; bigrams: "on the", "the mat" -> 2/5; equal lengths: no brevity penalty
    assert scores["Bleu_1"] == pytest.approx(4 / 6)
    assert scores["Bleu_2"] == pytest.approx((4 / 6 * 2 / 5) ** 0.5)
    assert scores["Bleu_4"] < 1e-3  # no 4-gram matches
    # LCS "cat on the mat" = 4 of 6 words both ways: P = R = 2/3, so F(beta=1.2) = 2/3
    assert scores["ROUGE_L"] == pytest.approx(2 / 3)
    # CIDEr weighs n-grams by rarity across images: with one image every weight is log(1/1) = 0
    assert scores["CIDEr"] == 0.0


def test_cider_averages_over_images_and_ignores_case_and_punctuation():
    scores = run({1: "A red square, above a blue circle!", 2: "nothing in common here"},
                 {1: ["a red square above a blue circle"], 2: ["two green triangles side by side"]})
    assert scores["CIDEr"] == pytest.approx(5.0)  # (10 + 0) / 2


def test_input_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"1 id\(s\) without a prediction \(e.g. \['b'\]\)"):
        evaluate_captions({"a": "x"}, {"a": ["x"], "b": ["y"]}, metrics=FAST)
    with pytest.raises(ValueError, match=r"references\['a'\] must be a non-empty list"):
        evaluate_captions({"a": "x"}, {"a": "x"}, metrics=FAST)
    with pytest.raises(ValueError, match="unknown caption metrics \\['BLEU'\\]"):
        evaluate_captions({"a": "x"}, {"a": ["x"]}, metrics=("BLEU",))


def test_without_java_falls_back_and_skips_java_metrics(monkeypatch):
    monkeypatch.setattr(caption_metrics, "find_java", lambda: None)
    predictions = {0: "a cat sits on the mat", 1: "a dog runs in the park"}
    references = {0: ["the cat is on the mat"], 1: ["a dog runs in the park", "a dog running in a park"]}
    with pytest.warns(MetricSkippedWarning) as caught:
        scores = evaluate_captions(predictions, references)
    messages = " | ".join(str(w.message) for w in caught)
    assert "simple_tokenize" in messages and "METEOR skipped" in messages and "SPICE skipped" in messages
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    monkeypatch.undo()
    if find_java() is not None:  # plain captions: the fallback gives the official numbers
        assert scores == pytest.approx(run(predictions, references))


@pytest.mark.skipif(spice_available(), reason="Stanford CoreNLP is installed for SPICE here")
def test_spice_skipped_without_corenlp_and_nothing_downloaded():
    with pytest.warns(MetricSkippedWarning, match="SPICE skipped"):
        scores = evaluate_captions({0: "a cat"}, {0: ["a cat"]}, metrics=("SPICE",))
    assert scores == {}
    assert not spice_available()


@needs_java
def test_meteor_known_values():
    # one METEOR process for two captions: an exact match (sentence score 1.0) and one wrong article
    # (0.518); the corpus score pools their statistics: 0.6024, as pycocoevalcap's Meteor gives
    scores = run({0: "a cat sits on the mat", 1: "the dog runs in the park"},
                 {0: ["a cat sits on the mat"], 1: ["a dog runs in the park"]}, metrics=("METEOR",))
    assert scores == {"METEOR": pytest.approx(0.6023830789401222, abs=1e-9)}


def test_java_helper_process_is_killed_on_timeout(tmp_path):
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    with caption_metrics._LineProcess(sleeper, tmp_path, timeout_s=0.5, name="sleeper") as process:
        with pytest.raises(RuntimeError, match="sleeper ran past 0.5 s and was killed"):
            process.receive()
    assert process._process.returncode is not None


def test_java_helper_process_reports_a_crash(tmp_path):
    crasher = [sys.executable, "-c", "import sys; sys.stderr.write('no paraphrase table'); sys.exit(3)"]
    with caption_metrics._LineProcess(crasher, tmp_path, timeout_s=60, name="crasher") as process:
        with pytest.raises(RuntimeError, match="crasher exited with code 3: no paraphrase table"):
            process.receive()
