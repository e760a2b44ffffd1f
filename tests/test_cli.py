"""`blip2 caption / ask / chat / embed`: in-process on a tiny saved checkpoint (loaded through ``--model DIR``),
then through real subprocesses on the default model."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from blip2.cli import build_parser, main
from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2.factory import build
from blip2.pipeline import load
from blip2.weights.checkpoint import save_checkpoint

TINY_QFORMER = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=64,
                    num_query_tokens=4, embed_dim=16, cross_attention_freq=1, init_from=None)  # fmt: skip


@pytest.fixture
def checkpoint(tiny_parts, randomize, tmp_path):
    """A tiny model saved by blip2 (random trainable parts; frozen parts named by path) -> its directory."""
    vision_dir, llm_dir = tiny_parts("opt")
    cfg = Blip2Config(
        vision=VisionConfig(kind="hf", path=str(vision_dir)),
        qformer=QFormerConfig(**TINY_QFORMER),
        llm=LLMConfig(kind="hf", path=str(llm_dir)),
    )
    model = build(cfg, init_qformer=False).model
    trainable = [model.qformer, model.vision_norm, model.vision_proj, model.text_proj, model.itm_head, model.llm_proj]
    for offset, part in enumerate(trainable):
        randomize(part, 10 + offset)
    return save_checkpoint(model, tmp_path / "checkpoint")


@pytest.fixture
def folder(image_files, tmp_path):
    """A folder with two images at the top, one in a subfolder, a truncated PNG and a text file."""
    root = tmp_path / "pictures"
    (root / "nested").mkdir(parents=True)
    Image.open(image_files[0]).save(root / "b.png")
    Image.open(image_files[1]).save(root / "a.jpg")
    Image.open(image_files[2]).save(root / "nested" / "c.png")
    (root / "broken.png").write_bytes(image_files[0].read_bytes()[:70])
    (root / "notes.txt").write_text("not an image")
    return root


def run(argv: list[str], capsys, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_caption_walks_folders_reports_bad_images_and_continues(checkpoint, folder, tmp_path, capsys):
    missing = tmp_path / "missing.png"
    code, out, err = run(["caption", str(folder), str(missing), "--model", str(checkpoint), "--batch-size", "2",
                          "--max-new-tokens", "4"], capsys)  # fmt: skip
    assert code == 1
    lines = [line.split("\t") for line in out.splitlines()]
    assert [Path(path).name for path, _ in lines] == ["a.jpg", "b.png", "c.png"]  # sorted, recursive, .txt skipped
    model = load(checkpoint)
    expected = model.caption([path for path, _ in lines], max_new_tokens=4)
    assert [caption for _, caption in lines] == expected
    assert "broken.png: corrupt or truncated image data" in err and "missing.png: file not found" in err
    assert "2 input(s) failed" in err and "Traceback" not in err

    code, out, err = run(["caption", str(folder), "--model", str(checkpoint), "--json", "--decoder", "qformer",
                          "--num-beams", "2", "--max-new-tokens", "4"], capsys)  # fmt: skip
    results = json.loads(out)
    assert code == 1 and [Path(r["image"]).name for r in results] == ["a.jpg", "b.png", "c.png", "broken.png"]
    expected = model.qformer_caption([r["image"] for r in results[:3]], num_beams=2, max_new_tokens=4)
    assert [r["caption"] for r in results[:3]] == expected
    assert "corrupt" in results[3]["error"]


def test_ask_prints_the_answer_or_json(checkpoint, image_files, capsys):
    argv = ["ask", str(image_files[0]), "w1 w2", "--model", str(checkpoint), "--max-new-tokens", "5"]
    code, out, _ = run([*argv, "--json"], capsys)
    assert code == 0
    expected = load(checkpoint).answer(image_files[0], "w1 w2", max_new_tokens=5)[0]
    assert json.loads(out) == {"image": str(image_files[0]), "question": "w1 w2", "answer": expected}
    code, out, _ = run(argv, capsys)
    assert code == 0 and out == expected + "\n"


def test_bad_input_is_one_clean_line_and_exit_2(checkpoint, image_files, folder, tmp_path, capsys):
    cases = [
        (["ask", str(folder / "broken.png"), "w1"], "blip2 ask: error: " + str(folder / "broken.png") + ": corrupt"),
        (["ask", str(image_files[0]), "  "], "blip2 ask: error: question 0 is empty"),
        (["ask", str(image_files[0]), "w1", "--temperature", "0"], "temperature must be > 0"),
        (["embed", str(image_files[0]), "--output", str(tmp_path / "x.pt")], "must end in .safetensors or .npz"),
        (["caption", str(image_files[0]), "--prompt", ""], "blip2 caption: error: prompt 0 is empty"),
        (["eval", "caption", str(folder), "--caption-index", "0"], "error: --caption-index does not apply to eval caption"),
        (["eval", "retrieval", str(folder), "--annotations", "a.json"], "--annotations does not apply to eval retrieval"),
    ]
    for argv, message in cases:
        code, out, err = run([*argv, "--model", str(checkpoint)], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["caption", "x.png", "--decoder", "gpt"])  # Literal choices


def test_chat_streams_replies_and_obeys_commands(checkpoint, image_files, tmp_path, capsys, monkeypatch):
    lines = ["w1 w2", "", "/reset", f"/image {tmp_path / 'missing.png'}", f"/image {image_files[1]}", "w3", "/help", "/quit", "w4"]
    argv = ["chat", str(image_files[0]), "--model", str(checkpoint), "--max-new-tokens", "5"]
    code, out, err = run(argv, capsys, "\n".join(lines) + "\n", monkeypatch)
    assert code == 0
    model = load(checkpoint)
    first = model.chat(image_files[0]).ask("w1 w2", max_new_tokens=5)
    second = model.chat(image_files[1]).ask("w3", max_new_tokens=5)
    assert out.splitlines() == [first, second]  # "w4" after /quit is never read
    assert "(conversation cleared)" in err and "missing.png: file not found" in err and "/image PATH" in err

    code, out, _ = run(["chat", str(image_files[0]), "--model", str(checkpoint), "--json", "--max-new-tokens", "5"],
                       capsys, "w1 w2\nw3\n", monkeypatch)  # end of input without /quit  # fmt: skip
    session = model.chat(image_files[0])
    expected = [{"user": q, "assistant": session.ask(q, max_new_tokens=5)} for q in ("w1 w2", "w3")]
    assert code == 0 and [json.loads(line) for line in out.splitlines()] == expected


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_embed_writes_image_and_text_embeddings(checkpoint, folder, tmp_path, capsys, suffix):
    output = tmp_path / f"vectors{suffix}"
    code, out, err = run(["embed", str(folder), "--texts", "w1 w2", "w3", "--output", str(output),
                          "--model", str(checkpoint), "--json"], capsys)  # fmt: skip
    assert code == 1 and "broken.png" in err  # reported, the others embedded
    summary = json.loads(out)
    assert summary["image_embeds"] == [3, 4, 16] and summary["text_embeds"] == [2, 16]
    if suffix == ".npz":
        with np.load(output) as saved:  # plain arrays: no pickle needed
            images, texts = torch.from_numpy(saved["image_embeds"]), torch.from_numpy(saved["text_embeds"])
            paths = list(saved["images"])
    else:
        with safe_open(output, "pt") as saved:
            images, texts = saved.get_tensor("image_embeds"), saved.get_tensor("text_embeds")
            paths = json.loads(saved.metadata()["images"])
    model = load(checkpoint)
    torch.testing.assert_close(images, model.image_embeddings(paths))
    torch.testing.assert_close(texts, model.text_embeddings(["w1 w2", "w3"]))
    assert [Path(p).name for p in paths] == ["a.jpg", "b.png", "c.png"]


# ---- real subprocesses on the default model -----------------------------------------------------------------------


def blip2_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "blip2.cli", *args], input=stdin, capture_output=True, text=True, env=env)


@pytest.fixture
def photo(tmp_path) -> Path:
    image = Image.new("RGB", (160, 120), "white")
    image.paste((200, 30, 30), (40, 30, 120, 90))
    path = tmp_path / "red square.png"
    image.save(path)
    return path


def test_default_model_caption_subprocess(photo, tmp_path):
    broken = tmp_path / "zero.jpg"
    broken.write_bytes(b"")
    done = blip2_cli("caption", str(photo), str(broken), "--max-new-tokens", "5")
    assert done.returncode == 1, done.stderr
    path, caption = done.stdout.splitlines()[0].split("\t")
    assert path == str(photo)  # the untrained default Q-Former may well caption with an empty string
    assert f"blip2 caption: error: {broken}: empty file (0 bytes)" in done.stderr and "Traceback" not in done.stderr


def test_default_model_ask_json_subprocess(photo):
    done = blip2_cli("ask", str(photo), "What colour is the square?", "--json", "--max-new-tokens", "6")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["image"] == str(photo) and reply["question"] == "What colour is the square?"
    assert isinstance(reply["answer"], str)  # the default Q-Former is untrained: its answers are often empty


def test_default_model_chat_subprocess(photo):
    done = blip2_cli("chat", str(photo), "--max-new-tokens", "8", stdin="hello\n/reset\nhello\n/quit\n")
    assert done.returncode == 0, done.stderr
    replies = done.stdout.splitlines()
    assert len(replies) == 2 and replies[0] == replies[1]  # after /reset the same question, same reply
    assert "(conversation cleared)" in done.stderr


def test_repeated_list_options_accumulate():
    args = build_parser().parse_args(["train", "r.yaml", "--set", "train.steps=5", "--set", "train.lr=1e-3", "data.x=1"])
    assert args.set == ["train.steps=5", "train.lr=1e-3", "data.x=1"]  # none of them silently dropped
    assert build_parser().parse_args(["train", "r.yaml"]).set is None


def test_annotated_options_carry_their_help_line_and_keep_their_type(capsys):
    args = build_parser().parse_args(["demo", "--stage1-steps", "5", "--full"])
    assert args.stage1_steps == 5 and args.full is True  # Annotated[int | None, ...] still parses as an int
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    assert "--stage1-steps STAGE1_STEPS stage-1 steps (default: the plan's)" in shown
    assert "--full, --no-full the longer plan aimed at every bar" in shown


def commands(parser, prefix=()):
    """Every (sub)command's words, e.g. ("index", "build"), found through the parser's subparsers."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from commands(sub, (*prefix, name))


def test_no_option_shows_a_bare_none_default(capsys):
    found = list(commands(build_parser()))
    assert ("eval",) in found and ("index", "build") in found
    for words in found:
        with pytest.raises(SystemExit):
            build_parser().parse_args([*words, "--help"])
        shown = " ".join(capsys.readouterr().out.split()).replace("--seed SEED (default: None)", "")  # no seed
        assert "(default: None)" not in shown, words
