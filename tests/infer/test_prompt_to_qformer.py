"""``llm.prompt_to_qformer``: the Q-Former reads the text prompt with the queries (BLIP-2's VQA fine-tuning,
InstructBLIP), on every path that builds a visual prompt: training, generation, chat; export refuses it."""

from __future__ import annotations

import pytest
import torch

from blip2.data.collate import Stage2Collate
from blip2.infer.generation import prompt_inputs
from blip2.train.stages import stage2_step
from blip2.weights.keymap import KeyMapError

QUESTIONS = ["Question: what color is the cat? Answer:", "Question: what is on the mat? Answer:"]


def features_of(pipe, image_files, count: int = 2) -> torch.Tensor:
    return pipe.model.image_features(pipe.pixel_values([image_files[0]] * count))  # one image, twice: [2, N, D]


def test_the_visual_prompt_depends_on_the_prompt_only_when_asked(tiny_model, image_files):
    reading, blind = tiny_model(prompt_to_qformer=True), tiny_model()
    with torch.no_grad():
        features = features_of(reading, image_files)
        ids, mask = reading.tokenize_text(QUESTIONS)
        asked = reading.model.soft_prompt(features, ids, mask)  # [2, Q, H_llm]
        by_hand = reading.model.llm_proj(reading.model.joint_queries(features, ids, mask))
        torch.testing.assert_close(asked, by_hand)
        assert (asked[0] - asked[1]).abs().max() > 1e-3  # same image, other question: other visual prompt
        none = reading.model.soft_prompt(features, *reading.qformer_prompt_ids(["", ""]))  # no prompt reads as ""
        assert (none - asked).abs().max() > 1e-3
        assert blind.qformer_prompt_ids(QUESTIONS) == (None, None)
        torch.testing.assert_close(blind.model.soft_prompt(features, ids, mask), blind.model.soft_prompt(features))
    with pytest.raises(ValueError, match="needs one tokenized prompt per image"):
        reading.model.soft_prompt(features, *reading.tokenize_text(QUESTIONS + ["one more"]))
    with pytest.raises(ValueError, match="needs one tokenized prompt per image"):
        reading.model.soft_prompt(features)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_generation_reads_each_question_into_the_queries(tiny_model, image_files, family):
    model = tiny_model(family, prompt_to_qformer=True)
    with torch.no_grad():
        features = features_of(model, image_files)
        embeds, _ = prompt_inputs(model, features, QUESTIONS)  # [2, V + T, H_llm]
        visual = model.model.soft_prompt(features, *model.qformer_prompt_ids(QUESTIONS))
        torch.testing.assert_close(embeds[:, : model.model.num_visual], visual)
    answers = model.answer([image_files[0]] * 2, ["what color is the cat?", "what is on the mat?"], max_new_tokens=6)
    one_by_one = [model.answer(image_files[0], q, max_new_tokens=6)[0] for q in ("what color is the cat?", "what is on the mat?")]
    assert answers == one_by_one


def test_training_reaches_the_qformer_text_side_only_when_it_reads_the_prompt(tiny_model, image_files):
    for reads, reached in ((True, True), (False, False)):
        pipe = tiny_model(prompt_to_qformer=reads)
        net = pipe.model.train()
        pixels = pipe.pixel_values(image_files[:2])  # [2, 3, H, W]
        items = [{"image": pixels[0], "image_id": "a", "question": "what color is the cat?", "answers": ["red"]},
                 {"image": pixels[1], "image_id": "b", "text": "a cat on the mat"}]
        collate = Stage2Collate(pipe.llm_tokenizer, 32, qformer_tokenizer=pipe.qformer_tokenizer if reads else None)
        stage2_step(net, collate(items))["loss"].backward()
        grad = net.qformer.word_embeddings.weight.grad  # [V, H]
        words = pipe.qformer_tokenizer("what color is the cat?", add_special_tokens=False).input_ids  # its rows
        assert (grad is not None and bool((grad[words].abs().sum(dim=1) > 0).all())) == reached
        assert net.llm_proj.weight.grad.abs().sum() > 0


def test_chat_encodes_the_image_once_with_no_text(tiny_model, image_files):
    pipe = tiny_model(prompt_to_qformer=True)
    read = []  # the prompt text every visual prompt of the session was built with
    encode = pipe.model.soft_prompt

    def recording(features, ids=None, mask=None):
        read.append(pipe.qformer_tokenizer.decode(ids[0], skip_special_tokens=True))
        return encode(features, ids, mask)

    pipe.model.soft_prompt = recording
    session = pipe.chat(image_files[0])
    replies = [session.ask(question, max_new_tokens=4) for question in ("what color is the cat?", "what is on the mat?")]
    assert read == [""]  # one encoding for both turns, reading no question
    assert replies[0] and replies[1]


def test_export_refuses_a_model_that_reads_the_prompt(tiny_model, tmp_path):
    with pytest.raises(KeyMapError, match="prompt_to_qformer"):
        tiny_model(prompt_to_qformer=True).export_hf(tmp_path / "export")
    assert not (tmp_path / "export").exists()
