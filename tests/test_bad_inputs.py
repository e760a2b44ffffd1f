"""Bad input through the real CLI, as a hostile user types it: every case a one-line error (exit 2) naming the cause,
or an honest partial result (exit 1), never a traceback; and data already written stays whole."""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml
from PIL import Image
from tiny import TINY_QFORMER, tiny_recipe

from blip2 import pipeline
from blip2.cli import main
from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2.demo.shapes import generate
from blip2.factory import build
from blip2.weights.checkpoint import save_checkpoint

UNTRANSLATABLE = "caf\udce9"  # how Python hands over a Latin-1 byte the terminal could not decode as UTF-8


@pytest.fixture
def checkpoint(tiny_parts, randomize, tmp_path):
    vision_dir, llm_dir = tiny_parts("opt")
    cfg = Blip2Config(VisionConfig(kind="hf", path=str(vision_dir)), QFormerConfig(**{**TINY_QFORMER, "max_position_embeddings": 64}),
                      LLMConfig(kind="hf", path=str(llm_dir)))
    model = build(cfg, init_qformer=False).model
    for offset, part in enumerate([model.qformer, model.llm_proj, model.vision_proj, model.text_proj]):
        randomize(part, 10 + offset)
    return save_checkpoint(model, tmp_path / "checkpoint")


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "cat.png"
    Image.new("RGB", (40, 30), (200, 80, 20)).save(path)
    return path


@pytest.fixture
def shapes(tmp_path):
    return generate(tmp_path / "shapes", {"train": 8, "val": 0, "test": 4, "compositional": 0}, progress=False)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # what the fixtures printed
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def recipe_file(tmp_path, tiny_parts, shapes, **train) -> str:
    vision_dir, _ = tiny_parts(None)
    recipe = tiny_recipe(tmp_path, vision_dir, None, 1, shapes["train"].parent, **train)
    recipe["data"] = {"captions": [str(shapes["train"])]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize("key, value, message", [
    ("lr", "fast", r"train.lr must be a number, got 'fast' \(str\)"),
    ("steps", True, r"train.steps must be a whole number, got True \(bool\)"),
    ("batch_size", 2.5, r"train.batch_size must be a whole number, got 2.5 \(float\)"),
    ("epochs", 3, r"unknown train keys: \['epochs'\]"),
])
def test_recipe_values_are_type_checked_by_key(tmp_path, tiny_parts, shapes, capsys, key, value, message):
    path = recipe_file(tmp_path, tiny_parts, shapes, **{key: value})
    code, _, err = run(["train", path], capsys)
    assert code == 2 and err.count("\n") == 1
    assert re.search(message, err), err


def test_yaml_syntax_errors_name_the_file_or_override_and_line(tmp_path, tiny_parts, shapes, checkpoint, picture,
                                                               capsys):
    path = recipe_file(tmp_path, tiny_parts, shapes)
    broken = tmp_path / "broken.yaml"
    broken.write_text(open(path).read() + "train: [oops\n")
    code, _, err = run(["train", broken], capsys)
    assert code == 2 and f"{broken} is not valid YAML" in err and "line" in err
    code, _, err = run(["train", path, "--set", "train.lr=[1"], capsys)
    assert code == 2 and "override 'train.lr=[1' is not valid YAML" in err
    config = checkpoint / "config.yaml"
    config.write_text(config.read_text() + "  : : [\n")
    code, _, err = run(["caption", picture, "--model", checkpoint], capsys)
    assert code == 2 and f"{config} is not valid YAML" in err


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, tiny_parts, shapes, checkpoint, picture, capsys,
                                                       monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    code, _, err = run(["embed", picture, "--output", blocker / "e.safetensors", "--model", checkpoint], capsys)
    assert code == 2 and "--output" in err and "a-file is not a writable folder" in err
    code, _, err = run(["eval", "caption", shapes["test"], "--model", checkpoint, "--out", blocker / "out"], capsys)
    assert code == 2 and "--out" in err and "a-file is not a writable folder" in err
    code, _, err = run(["train", recipe_file(tmp_path, tiny_parts, shapes, out_dir=str(blocker / "run"))], capsys)
    assert code == 2 and "train.out_dir" in err and "a-file is not a writable folder" in err
    assert blocker.read_text() == "keep me"


def test_text_that_is_not_utf8_is_refused_by_name(checkpoint, picture, capsys):
    code, _, err = run(["ask", picture, UNTRANSLATABLE, "--model", checkpoint], capsys)
    assert code == 2 and "--question is not UTF-8 text (caf\\udce9)" in err


def test_embed_without_texts_writes_the_image_embeddings(checkpoint, picture, tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    code, stdout, _ = run(["embed", picture, "--output", out, "--model", checkpoint], capsys)
    assert code == 0 and "image_embeds [1, 4, 16], text_embeds [0, 16]" in stdout and out.is_file()


def test_caption_lines_stay_one_per_image(checkpoint, picture, tmp_path, capsys, monkeypatch):
    other = tmp_path / "other.png"
    Image.open(picture).save(other)
    monkeypatch.setattr(pipeline.Blip2Pipeline, "caption", lambda self, images, *a, **k: ["two\ncats\tand\r\na dog"] * len(images))
    code, out, _ = run(["caption", picture, other, "--model", checkpoint], capsys)
    assert code == 0 and out.splitlines() == [f"{picture}\ttwo cats and a dog", f"{other}\ttwo cats and a dog"]


def test_image_problems_are_named(tmp_path, checkpoint, capsys, monkeypatch):
    loop = tmp_path / "loop.png"
    os.symlink(loop, loop)
    broken = tmp_path / "broken.png"
    os.symlink(tmp_path / "gone.png", broken)
    big = tmp_path / "big.png"
    Image.new("RGB", (20, 10)).save(big)
    monkeypatch.setenv("BLIP2_MAX_PIXELS", "100")
    code, _, err = run(["caption", loop, broken, big, "--model", checkpoint], capsys)
    assert code == 1 and "loop.png: a symbolic link loop" in err and "broken.png: a broken symbolic link" in err
    assert "big.png: 20x10 = 200 pixels is above the limit of 100" in err and "BLIP2_MAX_PIXELS=200 blip2" in err


def test_annotations_that_match_no_image_fail_instead_of_scoring_nothing(tmp_path, checkpoint, picture, capsys):
    coco = {"images": [{"id": 1, "file_name": picture.name}], "annotations": [{"image_id": "1", "caption": "a cat"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    code, _, err = run(["eval", "caption", tmp_path / "coco.json", "--model", checkpoint], capsys)
    assert code == 2 and "none of the 1 annotations' image_id matches an image id" in err and "'1' (str)" in err


def test_caching_data_with_no_readable_image_writes_no_cache(tmp_path, checkpoint, capsys):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"image": "bad.png", "caption": "x"}) + "\n")
    code, _, err = run(["cache-features", tmp_path / "manifest.jsonl", "--model", checkpoint,
                        "--out", tmp_path / "features"], capsys)
    assert code == 2 and "nothing to cache" in err and not (tmp_path / "features").exists()


def test_info_takes_its_source_either_way(capsys):
    code, out, _ = run(["info", "default-stage1"], capsys)
    assert code == 0 and "model: default-stage1" in out
    code, out, _ = run(["info", "--source", "default-stage1"], capsys)
    assert code == 0 and "model: default-stage1" in out
    code, _, err = run(["info", "default-stage1", "--source", "default"], capsys)
    assert code == 2 and "SOURCE given twice" in err


def test_library_bugs_keep_their_traceback(checkpoint, picture, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug inside the library")

    monkeypatch.setattr(pipeline.Blip2Pipeline, "caption", broken)
    with pytest.raises(ValueError, match="a bug inside the library"):
        main(["caption", str(picture), "--model", str(checkpoint)])


def test_the_trainers_messages_reach_the_terminal_unless_quiet(tmp_path, tiny_parts, shapes, capsys):
    path = recipe_file(tmp_path, tiny_parts, shapes, steps=1, batch_size=4)
    code, _, err = run(["train", path, "--set", "data.feature_cache=null"], capsys)
    assert code == 0 and "blip2.train: saved" in err
    code, _, err = run(["train", path, "--set", "data.feature_cache=null", "train.steps=2", "--resume", "auto", "-q"],
                       capsys)
    assert code == 0 and "blip2.train: saved" not in err  # warnings only
