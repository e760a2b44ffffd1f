"""``llm.prompt_to_qformer``: the Q-Former reads the text prompt with the queries (BLIP-2's VQA fine-tuning,
InstructBLIP), on every path that builds a visual prompt: training, generation, chat; export refuses it."""

from __future__ import annotations

import pytest
import torch

from blip2.train.stages import Stage2Collate, stage2_step
from blip2.weights.keymap import KeyMapError

QUESTIONS = ["Question: what color is the cat? Answer:", "Question: what is on the mat? Answer:"]


def features_of(model, image_files, count: int = 2) -> torch.Tensor:
    return model.image_features(model.pixel_values([image_files[0]] * count))  # one image, twice: [2, N, D]


def test_the_visual_prompt_depends_on_the_prompt_only_when_asked(tiny_model, image_files):
    reading, blind = tiny_model(prompt_to_qformer=True), tiny_model()
    with torch.no_grad():
        features = features_of(reading, image_files)
        asked = reading.soft_prompt(features, QUESTIONS)  # [2, Q, H_llm]
        ids, mask = reading.tokenize_text(QUESTIONS)
        by_hand = reading.llm_proj(reading.joint_queries(features, ids, mask))
        torch.testing.assert_close(asked, by_hand)
        assert (asked[0] - asked[1]).abs().max() > 1e-3  # same image, other question: other visual prompt
        none = reading.soft_prompt(features)
        torch.testing.assert_close(none, reading.soft_prompt(features, ["", ""]))  # no prompt reads as ""
        assert (none - asked).abs().max() > 1e-3
        torch.testing.assert_close(blind.soft_prompt(features, QUESTIONS), blind.soft_prompt(features))  # ignored
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        reading.soft_prompt(features, QUESTIONS + ["one more"])


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_generation_reads_each_question_into_the_queries(tiny_model, image_files, family):
    model = tiny_model(family, prompt_to_qformer=True)
    with torch.no_grad():
        features = features_of(model, image_files)
        embeds, _ = model.prompt_inputs(features, QUESTIONS)  # [2, V + T, H_llm]
        torch.testing.assert_close(embeds[:, : model.num_visual], model.soft_prompt(features, QUESTIONS))
    answers = model.answer([image_files[0]] * 2, ["what color is the cat?", "what is on the mat?"], max_new_tokens=6)
    one_by_one = [model.answer(image_files[0], q, max_new_tokens=6)[0] for q in ("what color is the cat?", "what is on the mat?")]
    assert answers == one_by_one


def test_training_reaches_the_qformer_text_side_only_when_it_reads_the_prompt(tiny_model, image_files):
    for reads, reached in ((True, True), (False, False)):
        model = tiny_model(prompt_to_qformer=reads).train()
        pixels = model.pixel_values(image_files[:2])  # [2, 3, H, W]
        items = [{"image": pixels[0], "image_id": "a", "question": "what color is the cat?", "answers": ["red"]},
                 {"image": pixels[1], "image_id": "b", "text": "a cat on the mat"}]
        stage2_step(model, Stage2Collate(model.llm, 32)(items))["loss"].backward()
        grad = model.qformer.word_embeddings.weight.grad  # [V, H]
        words = model.tokenizer("what color is the cat?", add_special_tokens=False).input_ids  # the question's rows
        assert (grad is not None and bool((grad[words].abs().sum(dim=1) > 0).all())) == reached
        assert model.llm_proj.weight.grad.abs().sum() > 0


def test_chat_encodes_the_image_once_with_no_text(tiny_model, image_files):
    model = tiny_model(prompt_to_qformer=True)
    read = []  # the prompts every visual prompt of the session was built with
    encode = model.soft_prompt
    model.soft_prompt = lambda features, prompts=None: read.append(prompts) or encode(features, prompts)
    session = model.chat(image_files[0])
    replies = [session.ask(question, max_new_tokens=4) for question in ("what color is the cat?", "what is on the mat?")]
    assert read == [None]  # one encoding for both turns, reading no question
    assert replies[0] and replies[1]


def test_export_refuses_a_model_that_reads_the_prompt(tiny_model, tmp_path):
    with pytest.raises(KeyMapError, match="prompt_to_qformer"):
        tiny_model(prompt_to_qformer=True).export_hf(tmp_path / "export")
    assert not (tmp_path / "export").exists()
