"""Conversations in stage-2 batches: rendered exactly as the LLM's chat template renders them (checked against the
template itself, not against this project's renderer), labels on each reply and its end-of-text token only, and
caption/VQA rows in the same batch scored exactly as alone."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import family_tokenizer, tiny_pipeline

from blip2.data.collate import Stage2Collate
from blip2.data.conversation import IMAGE_ID
from blip2.data.datasets import open_dataset
from blip2.data.records import DatasetFormatError
from blip2.data.text import IGNORE, LLMTokenizer
from blip2.errors import InputError
from blip2.models.losses import text_losses

V = 3
MESSAGES = [
    {"role": "user", "content": "what color is the cat ?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "what is on the mat ?"},
    {"role": "assistant", "content": "a dog ."},
]


@pytest.fixture
def chatml() -> LLMTokenizer:
    return LLMTokenizer(family_tokenizer("llama"), is_encoder_decoder=False)


def template_ids(tokenizer: LLMTokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    text = tokenizer.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer.hf(text, add_special_tokens=False)["input_ids"]


def chat_item(messages=MESSAGES, image_id="0") -> dict:
    return {"image": torch.zeros(3, 32, 32), "image_id": image_id, "messages": messages}


def test_a_conversation_reads_as_its_chat_template_and_learns_each_reply(chatml):
    batch = Stage2Collate(chatml, 64, num_visual=V)([chat_item()])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert batch["attention_mask"].all()
    text = [i for i in ids if i != IMAGE_ID]
    assert text == template_ids(chatml, MESSAGES, generation_prompt=False)
    first = ids.index(IMAGE_ID)  # the image opens the first user message, right before its text
    assert ids[first: first + V] == [IMAGE_ID] * V and IMAGE_ID not in ids[first + V:]
    assert text[:first] == template_ids(chatml, [{"role": "user", "content": ""}], False)[:first]
    spans, position = [], 0
    while position < len(labels):  # each maximal run of scored positions
        if labels[position] == IGNORE:
            position += 1
            continue
        end = position
        while end < len(labels) and labels[end] != IGNORE:
            end += 1
        spans.append((position, end))
        position = end
    replies = [m for m in MESSAGES if m["role"] == "assistant"]
    assert len(spans) == len(replies)
    im_end = chatml.eos_token_id
    for (start, end), reply, asked in zip(spans, replies, (MESSAGES[:1], MESSAGES[:3])):
        before = [i for i in ids[:start] if i != IMAGE_ID]
        assert before == template_ids(chatml, asked, generation_prompt=True)  # what chat reads before replying
        assert labels[start:end] == ids[start:end] == chatml.ids(reply["content"]) + [im_end]


def test_caption_rows_in_a_batch_with_a_conversation_lose_nothing(chatml):
    """A caption row gets placeholders in place of the prepended visual prompt; its loss is the same to float precision."""
    pipe = tiny_pipeline("llama")
    model = pipe.model
    collate = Stage2Collate(pipe.llm_tokenizer, 64, num_visual=model.num_visual)
    caption = {"image": torch.zeros(3, 32, 32), "image_id": "1", "text": "a red cat on the mat", "captions": ()}
    alone, mixed = collate([caption]), collate([caption, chat_item()])
    assert IMAGE_ID not in alone["input_ids"] and (mixed["input_ids"][0] == IMAGE_ID).sum() == model.num_visual
    with torch.no_grad():
        torch.manual_seed(0)
        features = torch.randn(2, 5, model.cfg.qformer.encoder_width)
        prompt = model.soft_prompt(features)  # [2, V, H]
        loss_alone, tokens_alone = text_losses(model, prompt[:1], alone)
        loss_mixed, tokens_mixed = text_losses(model, prompt, mixed)
    assert tokens_mixed[0] == tokens_alone[0] and tokens_mixed[1] == 6  # "red" + <|im_end|>, "a dog ." + <|im_end|>
    torch.testing.assert_close(loss_mixed[0], loss_alone[0], rtol=1e-5, atol=1e-5)


def test_the_reply_loss_is_the_llms_own_next_token_loss_after_the_image(chatml):
    """Recomputed by hand: embed the conversation with the visual prompt in place, run the LLM, score each reply token."""
    pipe = tiny_pipeline("llama")
    model = pipe.model
    batch = Stage2Collate(pipe.llm_tokenizer, 64, num_visual=model.num_visual)([chat_item()])
    ids = batch["input_ids"][0]
    with torch.no_grad():
        prompt = model.soft_prompt(torch.randn(1, 5, model.cfg.qformer.encoder_width))  # [1, V, H]
        summed, tokens = text_losses(model, prompt, batch)
        slots = (ids == IMAGE_ID).nonzero().squeeze(1)
        embeds = model.llm.embed(ids.clamp(min=0)[None]).clone()
        embeds[0, slots] = prompt[0]
        logits = model.llm.model(inputs_embeds=embeds).logits[0].log_softmax(-1)  # [T, vocab]
    scored = [t for t in range(1, len(ids)) if batch["labels"][0, t] != IGNORE]
    expected = -sum(logits[t - 1, ids[t]] for t in scored)
    assert tokens.item() == len(scored) == 6
    torch.testing.assert_close(summed[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_a_conversation_for_an_llm_without_a_chat_template_is_refused(family):
    tokenizer = LLMTokenizer(family_tokenizer(family), is_encoder_decoder=family == "t5")
    collate = Stage2Collate(tokenizer, 64, num_visual=V, decoder_start_token_id=0)
    with pytest.raises(InputError, match="decoder-only LLM with a chat template"):
        collate([chat_item()])


def test_conversation_limits_are_named(chatml):
    with pytest.raises(InputError, match="num_visual"):
        Stage2Collate(chatml, 64)([chat_item()])
    with pytest.raises(InputError, match="raise llm.max_text_len"):
        Stage2Collate(chatml, 4, num_visual=V)([chat_item()])
    batch = Stage2Collate(chatml, 20, num_visual=V)([chat_item()])  # cut inside the second reply: the rest unscored
    assert batch["input_ids"].shape[1] == 20 + V and batch["labels"].shape == batch["input_ids"].shape
    scored = batch["labels"][0] != IGNORE
    assert scored.any() and torch.equal(batch["labels"][0][scored], batch["input_ids"][0][scored])
    first = Stage2Collate(chatml, 64, num_visual=V)([chat_item()])["input_ids"][0].tolist().index(IMAGE_ID)
    assert Stage2Collate(chatml, first, num_visual=V)([chat_item()])["input_ids"].shape[1] == first + V  # just fits
    with pytest.raises(InputError, match="raise llm.max_text_len"):
        Stage2Collate(chatml, first - 1, num_visual=V)([chat_item()])  # one image position cut off


@pytest.mark.parametrize("messages, message", [
    ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "what?"}], "open with a user message"),
    ([{"role": "user", "content": "what?"}], "no assistant message"),
    ([{"role": "robot", "content": "beep"}], "'messages' must be a list"),
])
def test_malformed_conversation_files_name_the_record(tmp_path, messages, message):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"image": "a.png", "messages": messages}]))
    with pytest.raises(DatasetFormatError, match=message):
        open_dataset(path, task="chat")
