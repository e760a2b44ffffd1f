"""`blip2 eval chat`: scripted conversations through ChatSession, replies scored as VQA answers (by hand here), the
blind prior beside them."""

from __future__ import annotations

import json

import pytest
from tiny import tiny_pipeline

from blip2 import cli
from blip2.data.records import DatasetFormatError
from blip2.demo.shapes import ShapesConfig, generate
from blip2.eval.evaluate import evaluate
from blip2.eval.run_chat import blind_prior, read_conversations, score
from blip2.infer.chat import ChatSession


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return generate(root, {"test": 4}, ShapesConfig(image_size=48), progress=False)["test"]


def test_each_conversation_runs_through_a_chat_session_and_is_scored(split, tmp_path):
    pipe = tiny_pipeline("llama")
    results = evaluate("chat", pipe, split, out_dir=tmp_path / "out", limit=3, prior=split, progress=False,
                       max_new_tokens=4)
    conversations = read_conversations(split, 3)
    assert results["num_conversations"] == 3 and results["skipped_images"] == 0
    for row, said in zip(conversations, results["predictions"]):
        session = ChatSession(pipe, row["image"])  # the replies are what a user's session says, turn after turn
        assert [t["reply"] for t in said["turns"]] == [session.ask(t["question"], max_new_tokens=4) for t in row["turns"]]
        assert [t["expected"] for t in said["turns"]] == [t["answer"] for t in row["turns"]]
    metrics = results["metrics"]
    assert metrics["num_questions"] == sum(len(r["turns"]) for r in conversations)
    assert set(metrics["per_turn"]) == {"1", "2", "3"} and 0.0 <= metrics["overall"] <= 1.0
    assert results["blind_prior"]["num_questions"] == metrics["num_questions"]
    report = json.loads((tmp_path / "out" / "chat.json").read_text())
    assert report["metrics"] == metrics and "predictions" not in report


def test_replies_are_scored_like_vqa_answers_by_turn_and_follow_up():
    references = {f"a/{n}": {"answers": [answer] * 10, "question_type": kind}
                  for n, (answer, kind) in enumerate([("red", "color"), ("three", "count"), ("left", "position")], 1)}
    turn_of = {"a/1": (1, False), "a/2": (2, False), "a/3": (3, True)}
    metrics = score({"a/1": "Red.", "a/2": "two", "a/3": "the left"}, references, turn_of)  # "the" is an article
    assert metrics["overall"] == pytest.approx(2 / 3)
    assert metrics["per_question_type"] == {"color": 1.0, "count": 0.0, "position": 1.0}
    assert metrics["per_turn"] == {"1": 1.0, "2": 0.0, "3": 1.0}
    assert metrics["follow_up"] == {"False": 0.5, "True": 1.0}


def test_the_blind_prior_is_each_kinds_most_common_training_answer(tmp_path):
    rows = [{"image": "a.png", "turns": [{"question": "q", "answer": a, "kind": k} for a, k in turns]}
            for turns in ([("red", "color"), ("two", "count")], [("blue", "color"), ("two", "count")],
                          [("blue", "color"), ("one", "count")], [("red", "color")])]
    (tmp_path / "chat.json").write_text(json.dumps(rows))
    assert blind_prior(tmp_path) == {"color": "red", "count": "two"}  # red and blue tie: red was seen first


def test_the_blind_prior_comes_from_the_prior_data_not_the_evaluated_data(split, tmp_path):
    rows = json.loads((split / "chat.json").read_text())
    unlike = [{**row, "turns": [{**turn, "answer": "zzz"} for turn in row["turns"]]} for row in rows]
    (tmp_path / "chat.json").write_text(json.dumps(unlike))
    pipe = tiny_pipeline("llama")
    results = evaluate("chat", pipe, split, prior=tmp_path, progress=False, max_new_tokens=1)
    assert results["blind_prior"]["overall"] == 0.0  # every guess is "zzz"
    itself = evaluate("chat", pipe, split, prior=split, progress=False, max_new_tokens=1)
    assert itself["blind_prior"]["overall"] > 0.0  # each kind's most common answer is in the split it came from


def test_turns_and_follow_ups_are_grouped_as_the_conversations_say(split, monkeypatch):
    conversations = read_conversations(split)
    assert any(t.get("follow_up") for r in conversations for t in r["turns"])
    replies = iter([t["answer"] if t.get("follow_up") else "zzz" for r in conversations for t in r["turns"]])

    class RightOnFollowUps:  # a session whose replies are known: right on every follow-up, wrong elsewhere
        def __init__(self, pipe, image, system=None):
            pass

        def ask(self, question, **gen):
            return next(replies)

    monkeypatch.setattr("blip2.eval.run_chat.ChatSession", RightOnFollowUps)
    metrics = evaluate("chat", tiny_pipeline("llama"), split, progress=False)["metrics"]
    assert metrics["follow_up"] == {"False": 0.0, "True": 1.0}
    assert metrics["per_turn"]["1"] == 0.0  # a first turn refers back to nothing


def test_unreadable_images_are_skipped_and_counted(split, tmp_path):
    rows = json.loads((split / "chat.json").read_text())[:2]
    rows[0]["image"] = "images/missing.png"
    data = tmp_path / "chat.json"
    data.write_text(json.dumps([{**r, "image": str(split / r["image"])} for r in rows]))
    results = evaluate("chat", tiny_pipeline("llama"), data, progress=False, max_new_tokens=2)
    assert results["skipped_images"] == 1 and results["num_conversations"] == 1


@pytest.mark.parametrize("content, message", [
    ("{", "not valid JSON"),
    ('[{"image": "a.png", "messages": []}]', "scripted conversations come from"),
    ('{"image": "a.png"}', "expected a list"),
    ('[{"image": "a.png", "turns": [{"question": "q", "answer": "a"}, {"question": "q"}]}]', "conversations come from"),
    ('[{"image": "a.png", "turns": []}]', "scripted conversations come from"),
])
def test_malformed_conversation_files_are_named(tmp_path, content, message):
    (tmp_path / "chat.json").write_text(content)
    with pytest.raises(DatasetFormatError, match=message):
        read_conversations(tmp_path)


def test_options_of_other_tasks_are_refused_before_any_model_loads(split, capsys):
    assert cli.main(["eval", "chat", str(split), "--features", "x"]) != 0
    assert "--features does not apply to eval chat" in capsys.readouterr().err
