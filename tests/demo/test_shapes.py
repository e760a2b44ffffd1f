"""The shapes world: determinism, held-out combinations, correct and unambiguous text, files on disk."""

import json
import random
import re
from collections import Counter

import numpy as np
import pytest

from blip2.demo import shapes
from blip2.demo.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    NUMBER_WORDS,
    PLURALS,
    SHAPES,
    Scene,
    ShapeObject,
    ShapesConfig,
    captions,
    chat_rng,
    conversation,
    generate,
    make_scene,
    questions,
    render,
    text_rng,
    typed_questions,
    write_split,
)

CFG = ShapesConfig()
SINGULAR = {plural: shape for shape, plural in PLURALS.items()}


def _scenes(split, n, cfg=CFG):
    return [make_scene(split, index, cfg) for index in range(n)]


def _oracle(scene: Scene, question: str) -> str:
    """Answer a generated question from the scene alone, independently of the generator's code."""
    objects = scene.objects
    if match := re.fullmatch(r"how many shapes are there\?", question):
        return NUMBER_WORDS[len(objects)]
    if match := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return NUMBER_WORDS[sum(o.colour == match[1] for o in objects)]
    if match := re.fullmatch(r"how many (\w+) are there\?", question):
        return NUMBER_WORDS[sum(o.shape == SINGULAR[match[1]] for o in objects)]
    if match := re.fullmatch(r"what color is the (\w+)\?", question):
        (only,) = [o for o in objects if o.shape == match[1]]  # unambiguous: exactly one
        return only.colour
    if match := re.fullmatch(r"what shape is the (\w+) object\?", question):
        (only,) = [o for o in objects if o.colour == match[1]]
        return only.shape
    if match := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
        (only,) = [o for o in objects if (o.colour, o.shape) == (match[1], match[2])]
        return only.position
    if match := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any((o.colour, o.shape) == (match[1], match[2]) for o in objects) else "no"
    raise AssertionError(f"unexpected question form: {question!r}")


def test_scenes_and_pixels_are_deterministic():
    for split in shapes.SPLITS:
        assert make_scene(split, 7, CFG) == make_scene(split, 7, CFG)
        first = np.asarray(render(make_scene(split, 7, CFG), CFG))
        second = np.asarray(render(make_scene(split, 7, CFG), CFG))
        np.testing.assert_array_equal(first, second)
    assert captions(make_scene("train", 3, CFG), text_rng("train", 3, CFG)) == captions(
        make_scene("train", 3, CFG), text_rng("train", 3, CFG)
    )


def test_index_split_and_seed_change_the_scene():
    base = make_scene("train", 0, CFG)
    assert make_scene("train", 1, CFG) != base
    assert make_scene("val", 0, CFG) != base
    assert make_scene("train", 0, ShapesConfig(seed=1)) != base


def test_scene_statistics():
    scenes = _scenes("train", 400)
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2, 3}
    for scene in scenes:
        cells = [o.cell for o in scene.objects]
        assert len(set(cells)) == len(cells), "two objects share a grid cell"
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {o.size for s in scenes for o in s.objects} == {"small", "large"}
    repeated = sum(len(s.objects) > len({o.combo for o in s.objects}) for s in scenes)
    assert repeated > 20, "scenes with two objects of the same colour and shape are needed for counting"


def test_held_out_combinations_never_appear_outside_compositional():
    held = set(CFG.held_out)
    assert len(held) == 6 and len(held) / (len(COLOURS) * len(SHAPES)) == pytest.approx(0.2)
    seen = set()
    for split in ("train", "val", "test"):
        for scene in _scenes(split, 300):
            combos = {o.combo for o in scene.objects}
            assert not combos & held, f"{split} scene shows held-out {combos & held}"
            seen |= combos
    assert seen == set(CFG.seen_combos()), "every allowed combination should occur in 900 scenes"


def test_every_compositional_scene_shows_a_held_out_combination():
    held = set(CFG.held_out)
    scenes = _scenes("compositional", 300)
    assert all({o.combo for o in s.objects} & held for s in scenes)
    assert {o.combo for s in scenes for o in s.objects} >= held


def test_held_out_combinations_never_appear_in_training_text():
    phrases = [f"{colour} {form}" for colour, shape in HELD_OUT for form in (shape, PLURALS[shape])]
    for index in range(300):
        scene = make_scene("train", index, CFG)
        rng = text_rng("train", index, CFG)
        text = " ".join(captions(scene, rng)) + " " + " ".join(q for q, _ in questions(scene, rng))
        messages, _ = conversation(scene, chat_rng("train", index, CFG))
        text += " " + " ".join(m["content"] for m in messages)
        leaked = [phrase for phrase in phrases if re.search(rf"\b{phrase}\b", text)]
        assert not leaked, f"train image {index} mentions {leaked}"


def test_compositional_questions_focus_on_the_held_out_objects():
    involve = [
        q.held_out
        for index in range(200)
        for q in typed_questions(make_scene("compositional", index, CFG), text_rng("compositional", index, CFG))
    ]
    assert sum(involve) / len(involve) > 0.5


def test_hand_built_scene_captions():
    scene = Scene(
        objects=(
            ShapeObject("circle", "red", "large", (1, 0)),
            ShapeObject("square", "blue", "small", (0, 2)),
            ShapeObject("square", "blue", "large", (2, 1)),
        ),
        background="gray",
        texture="plain",
    )
    texts = captions(scene, random.Random(0))
    assert len(texts) == 5 and len(set(texts)) == 5
    assert texts[0] in ("a red circle and two blue squares", "two blue squares and a red circle")
    assert texts[1] == texts[0] + " on a plain gray background"
    assert texts[2].startswith("there is ")
    for phrase in (
        "a large red circle on the left",
        "a small blue square in the top right corner",
        "a large blue square at the bottom",
    ):
        assert phrase in texts[2]
    assert texts[3].startswith("three shapes on a plain gray background: ")
    assert texts[4] in ("an image of a circle and two squares", "an image of two squares and a circle")


def test_articles_before_vowels():
    scene = Scene(objects=(ShapeObject("star", "orange", "small", (1, 1)),))
    texts = captions(scene, random.Random(0))
    assert texts[0] == "an orange star"
    assert texts[2] == "there is a small orange star in the center"
    assert texts[3] == "one shape on a plain gray background: an orange star"


def test_every_answer_is_correct_single_word_and_unambiguous():
    positions = {"left", "right", "top", "bottom", "center"}
    vocabulary = set(NUMBER_WORDS) | set(COLOURS) | set(SHAPES) | positions | {"yes", "no"}
    kinds = Counter()
    for split in ("train", "compositional"):
        for index in range(300):
            scene = make_scene(split, index, CFG)
            asked = typed_questions(scene, text_rng(split, index, CFG), CFG.held_out)
            assert len({q.kind for q in asked}) == len(asked), "at most one question per type"
            for q in asked:
                kinds[q.kind] += 1
                assert q.answer in vocabulary and " " not in q.answer
                assert q.answer == _oracle(scene, q.question), (scene, q)
    assert set(kinds) == {"count", "color", "shape", "position", "exists"}


def _follow_up_oracle(scene: Scene, previous, question: str) -> str:
    """Answer a follow-up from the scene and the question before it ("it", "them": what that question named)."""
    objects = scene.objects
    if match := re.fullmatch(r"is there an? (\w+) (\w+)\?", previous.question):
        same = [o for o in objects if (o.colour, o.shape) == (match[1], match[2])]
        if question == "where is it?":
            (only,) = same
            return only.position
        if question == "how many of them are there?":
            return NUMBER_WORDS[len(same)]
        assert question == f"how many {PLURALS[match[2]]} are there?", (previous, question)
    elif match := re.fullmatch(r"what shape is the (\w+) object\?", previous.question):
        assert question == "where is it?", (previous, question)
        (only,) = [o for o in objects if o.colour == match[1]]
        return only.position
    else:
        assert previous.kind == "color" and question == f"how many {previous.answer} shapes are there?"
    return _oracle(scene, question)


def test_conversations_ask_answerable_questions_and_follow_ups_about_what_was_asked():
    answers, follow_ups, kinds_differ, described = Counter(), 0, 0, 0
    for split in ("train", "compositional"):
        for index in range(300):
            scene = make_scene(split, index, CFG)
            messages, turns = conversation(scene, chat_rng(split, index, CFG), CFG.held_out)
            opened = len(messages) - 2 * len(turns)  # 2: a description first, 0: the first question first
            assert opened in (0, 2) and [m["role"] for m in messages] == ["user", "assistant"] * (opened // 2 + len(turns))
            if opened:
                described += 1
                assert messages[0]["content"] in shapes.OPENERS
                assert all(re.search(rf"\b({o.shape}|{PLURALS[o.shape]})\b", messages[1]["content"]) for o in scene.objects)
            assert [m["content"] for m in messages[opened:]] == [t for turn in turns for t in (turn.question, turn.answer)]
            assert len(turns) >= 2 and not turns[0].follow_up
            for previous, turn in zip(turns, turns[1:]):
                expected = _follow_up_oracle(scene, previous, turn.question) if turn.follow_up else _oracle(scene, turn.question)
                assert turn.answer == expected, (scene, previous, turn)
            assert turns[0].answer == _oracle(scene, turns[0].question)
            follow_ups += turns[-1].follow_up
            kinds_differ += turns[0].kind != turns[1].kind
            answers.update(turn.answer for turn in turns)
    assert follow_ups > 0.9 * 600 and kinds_differ == 600
    assert 0.4 < described / 600 < 0.6  # both openings are trained: the one chat users (and the evaluation) start with
    assert answers["no"] > 0.5 * answers["yes"] and answers["zero"] > 0  # honest "no" and "none" answers occur


def test_answer_balance_keeps_a_blind_guess_weak():
    answers = Counter()
    for index in range(500):
        scene = make_scene("train", index, CFG)
        for q in typed_questions(scene, text_rng("train", index, CFG)):
            answers[(q.kind, q.answer)] += 1
    yes, no = answers[("exists", "yes")], answers[("exists", "no")]
    assert 0.4 < yes / (yes + no) < 0.6
    colour_answers = [answers[("color", c)] for c in COLOURS]
    assert min(colour_answers) > 0.5 * max(colour_answers)


def test_render_draws_the_scene():
    cfg = ShapesConfig(image_size=96)
    scene = Scene(
        objects=(ShapeObject("circle", "red", "large", (1, 1)), ShapeObject("cross", "blue", "small", (0, 0))),
        background="white",
        texture="plain",
    )
    pixels = np.asarray(render(scene, cfg))
    assert pixels.shape == (96, 96, 3)
    assert tuple(pixels[48, 48]) == COLOURS["red"]  # centre of the centre cell
    assert tuple(pixels[16, 16]) == COLOURS["blue"]  # centre of the top left cell
    assert tuple(pixels[90, 90]) == (235, 235, 235)  # empty bottom right cell: the white tint


def test_large_shapes_cover_more_pixels_than_small():
    def area(size, shape):
        scene = Scene(objects=(ShapeObject(shape, "green", size, (1, 1)),), background="black")
        return int((np.asarray(render(scene, CFG)) == COLOURS["green"]).all(axis=-1).sum())

    for shape in SHAPES:
        small, large = area("small", shape), area("large", shape)
        assert 300 < small < large, shape  # visible at 224 px, and the sizes differ
        assert large > 2 * small, shape


def test_grainy_background_varies_around_its_tint():
    circle = ShapeObject("circle", "red", "small", (1, 1))
    scene = Scene(objects=(circle,), background="gray", texture="grainy", noise_seed=3)
    corner = np.asarray(render(scene, CFG))[:40, :40, 0].astype(float)
    assert 5 < corner.std() < 25
    assert abs(corner.mean() - BACKGROUNDS["gray"]) < 5


def test_config_validation():
    with pytest.raises(ValueError, match="max_objects"):
        ShapesConfig(max_objects=9)
    with pytest.raises(ValueError, match="unknown combination"):
        ShapesConfig(held_out=(("pink", "circle"),))
    with pytest.raises(ValueError, match="image_size"):
        ShapesConfig(image_size=8)
    assert ShapesConfig(held_out=[["red", "star"]]).held_out == (("red", "star"),)
    with pytest.raises(ValueError, match="unknown shapes split"):
        make_scene("training", 0, CFG)


def test_max_objects_four_uses_the_word_four():
    cfg = ShapesConfig(max_objects=4)
    assert max(len(s.objects) for s in _scenes("train", 200, cfg)) == 4


def test_write_split_files(tmp_path):
    cfg = ShapesConfig(image_size=64)
    folder = write_split(tmp_path, "val", 5, cfg, progress=False)
    assert sorted(p.name for p in (folder / "images").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    rows = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in rows] == [f"val_{i:06d}" for i in range(5)]
    assert all(len(r["captions"]) == 5 and (folder / r["image"]).is_file() for r in rows)
    vqa = json.loads((folder / "vqa.json").read_text())
    assert len(vqa) >= 5 * 3
    assert all(len(set(q["answers"])) == 1 and len(q["answers"]) == 10 for q in vqa)
    assert len({q["question_id"] for q in vqa}) == len(vqa)
    coco = json.loads((folder / "coco_captions.json").read_text())
    assert [image["id"] for image in coco["images"]] == list(range(5))
    assert len(coco["annotations"]) == 25 and len({a["id"] for a in coco["annotations"]}) == 25
    assert coco["annotations"][0]["caption"] == rows[0]["captions"][0]
    # the image on disk is the rendered scene
    from PIL import Image

    on_disk = np.asarray(Image.open(folder / "images" / "000002.png"))
    np.testing.assert_array_equal(on_disk, np.asarray(render(make_scene("val", 2, cfg), cfg)))


def test_generate_is_idempotent_and_redoes_changed_splits(tmp_path, monkeypatch):
    cfg = ShapesConfig(image_size=48)
    folders = generate(tmp_path, {"train": 4, "compositional": 2}, cfg, progress=False)
    assert set(folders) == {"train", "compositional"}
    written = []
    real_write = shapes.write_split
    def recording_write(root, split, *args, **kwargs):
        written.append(split)
        return real_write(root, split, *args, **kwargs)

    monkeypatch.setattr(shapes, "write_split", recording_write)
    generate(tmp_path, {"train": 4, "compositional": 2}, cfg, progress=False)
    assert written == []
    generate(tmp_path, {"train": 6, "compositional": 2}, cfg, progress=False)
    assert written == ["train"]
    generate(tmp_path, {"train": 6, "compositional": 2}, ShapesConfig(image_size=48, seed=5), progress=False)
    assert written == ["train", "train", "compositional"]
    (tmp_path / "train" / shapes.META_FILE).unlink()  # an interrupted run leaves no marker
    generate(tmp_path, {"train": 6}, ShapesConfig(image_size=48, seed=5), progress=False)
    assert written[-1] == "train"


def test_generate_rejects_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="unknown shapes splits"):
        generate(tmp_path, {"dev": 3}, progress=False)


def test_the_opening_coin_leaves_the_evaluated_turns_as_they_were():
    """`blip2 eval chat` asks a conversation's turns: they are drawn right after the opener, as before the coin that
    drops the opener existed, so evaluation scripts (and scores) stay comparable with earlier datasets."""
    for index in range(50):
        scene = make_scene("test", index, CFG)
        _, turns = conversation(scene, chat_rng("test", index, CFG), CFG.held_out)
        rng = chat_rng("test", index, CFG)
        rng.choice(captions(scene, rng)[:3]), rng.choice(shapes.OPENERS)  # the opener's draws
        assert turns == shapes.chat_turns(scene, rng, CFG.held_out)
