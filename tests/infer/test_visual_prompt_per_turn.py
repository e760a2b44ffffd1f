"""``llm.visual_prompt_per_turn``: every user message of a conversation opens with its own visual prompt, the
Q-Former reading that message as a VQA question; training rows, the loss and ``ChatSession`` agree, and the chat
cache still holds across turns (earlier turns' prompts do not change)."""

from __future__ import annotations

import pytest
import torch
from tiny import family_tokenizer, tiny_pipeline

from blip2.config import ConfigError, LLMConfig
from blip2.data.collate import Stage2Collate
from blip2.data.conversation import IMAGE_ID
from blip2.data.text import IGNORE, LLMTokenizer
from blip2.errors import InputError
from blip2.models.losses import stage2_losses
from blip2.prompts import turn_prompt

MESSAGES = [
    {"role": "user", "content": "what color is the cat ?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "what is on the mat ?"},
    {"role": "assistant", "content": "a dog ."},
]
QUESTIONS = ["Question: what color is the cat ? Answer:", "Question: what is on the mat ? Answer:"]


def chat_item(image_id="0") -> dict:
    return {"image": torch.zeros(3, 32, 32), "image_id": image_id, "messages": MESSAGES}


def caption_item() -> dict:
    return {"image": torch.zeros(3, 32, 32), "image_id": "1", "text": "a red cat on the mat", "captions": ()}


def collate_for(pipe, max_len: int = 64, per_turn: bool = True) -> Stage2Collate:
    return Stage2Collate(pipe.llm_tokenizer, max_len, qformer_tokenizer=pipe.qformer_tokenizer,
                         num_visual=pipe.model.num_visual, per_turn=per_turn)


def read_back(pipe, batch) -> list[str]:
    return [pipe.qformer_tokenizer.decode(ids, skip_special_tokens=True) for ids in batch["prompt_ids"]]


def test_the_option_needs_a_qformer_that_reads_text():
    with pytest.raises(ConfigError, match="needs llm.prompt_to_qformer"):
        LLMConfig(visual_prompt_per_turn=True)
    chatml = LLMTokenizer(family_tokenizer("llama"), is_encoder_decoder=False)
    with pytest.raises(InputError, match="qformer_tokenizer"):
        Stage2Collate(chatml, 64, num_visual=3, per_turn=True)


def test_each_user_message_opens_with_a_visual_prompt_read_from_it():
    pipe = tiny_pipeline(visual_prompt_per_turn=True)
    V = pipe.model.num_visual
    one = collate_for(pipe, per_turn=False)([caption_item(), chat_item()])
    each = collate_for(pipe)([caption_item(), chat_item()])
    ids, text = each["input_ids"][1].tolist(), [i for i in one["input_ids"][1].tolist() if i != IMAGE_ID]
    assert [i for i in ids if i != IMAGE_ID] == text  # the same conversation, only more images in it
    starts = [i for i, token in enumerate(ids) if token == IMAGE_ID and (i == 0 or ids[i - 1] != IMAGE_ID)]
    assert len(starts) == 2 and all(ids[s: s + V] == [IMAGE_ID] * V for s in starts)
    user = pipe.llm_tokenizer.ids(MESSAGES[2]["content"])
    assert ids[starts[1] + V: starts[1] + V + len(user)] == user  # the second prompt opens the second message
    assert read_back(pipe, each) == ["", "question : what color is the cat? answer :",
                                     "question : what is on the mat? answer :"]
    assert each["prompt_image"].tolist() == [0, 1, 1]
    assert read_back(pipe, one) == ["", ""] and "prompt_image" not in one
    # the replies are learned as before: the same tokens scored
    scored = [each["labels"][1][each["labels"][1] != IGNORE], one["labels"][1][one["labels"][1] != IGNORE]]
    assert torch.equal(*scored) and len(scored[0]) == 6


def test_a_cut_never_splits_a_visual_prompt():
    pipe = tiny_pipeline(visual_prompt_per_turn=True)
    V = pipe.model.num_visual
    full = collate_for(pipe)([chat_item()])["input_ids"][0].tolist()
    second = [i for i, token in enumerate(full) if token == IMAGE_ID][V]  # where the second visual prompt starts
    batch = collate_for(pipe, max_len=second + 2 - 2 * V)([chat_item()])  # the cut falls 2 inside the second prompt
    assert batch["input_ids"][0].tolist() == full[:second]  # cut before it: one visual prompt, one question read
    assert batch["prompt_image"].tolist() == [0]
    assert read_back(pipe, batch) == ["question : what color is the cat? answer :"]


def test_the_loss_places_each_turns_own_visual_prompt():
    """Recomputed by hand: each turn's visual prompt from the Q-Former reading that question, placed where the
    placeholders of that turn are, then the LLM's next-token loss on the replies."""
    pipe = tiny_pipeline(visual_prompt_per_turn=True)
    model = pipe.model
    batch = collate_for(pipe)([chat_item(), caption_item()])
    torch.manual_seed(0)
    features = torch.randn(2, 5, model.cfg.qformer.encoder_width)  # [B, N, D]
    with torch.no_grad():
        loss = stage2_losses(model, features, batch)["loss"]
        first, second = (model.soft_prompt(features[:1], *pipe.tokenize_text([q])) for q in QUESTIONS)  # [1, V, H]
        caption = model.soft_prompt(features[1:], *pipe.tokenize_text([""]))
        total, count = 0.0, 0
        for row, visual in ((0, torch.cat([first[0], second[0]])), (1, caption[0])):
            ids, labels = batch["input_ids"][row], batch["labels"][row]
            embeds = model.llm.embed(ids.clamp(min=0)[None]).clone()
            embeds[0, ids == IMAGE_ID] = visual
            logits = model.llm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"][row][None])
            logp = logits.logits[0].log_softmax(-1)  # [T, vocab]
            scored = [t for t in range(1, len(ids)) if labels[t] != IGNORE]
            total, count = total - sum(logp[t - 1, ids[t]] for t in scored), count + len(scored)
    torch.testing.assert_close(loss, total / count, rtol=1e-5, atol=1e-5)
    swapped = dict(batch, prompt_image=batch["prompt_image"].flip(0))  # another image behind each prompt
    assert (stage2_losses(model, features, swapped)["loss"] - loss).abs() > 1e-4


def test_placeholders_that_do_not_match_the_prompts_are_named():
    pipe = tiny_pipeline(visual_prompt_per_turn=True)
    model = pipe.model
    batch = collate_for(pipe)([chat_item()])  # two visual prompts in one row
    prompt = model.soft_prompt(torch.randn(1, 5, model.cfg.qformer.encoder_width), *pipe.tokenize_text([""]))
    with pytest.raises(InputError, match="image placeholders"):
        model.place_visual(prompt, batch["input_ids"])  # one prompt for two slots


def test_chat_reads_each_turn_into_its_own_prompt_and_keeps_the_cache(image_files):
    pipe = tiny_pipeline(visual_prompt_per_turn=True)
    model = pipe.model
    read = []
    encode = model.soft_prompt

    def recording(features, ids=None, mask=None):
        read.append([pipe.qformer_tokenizer.decode(row, skip_special_tokens=True) for row in ids])
        return encode(features, ids, mask)

    model.soft_prompt = recording
    cached, recomputed = pipe.chat(image_files[0]), pipe.chat(image_files[0], cache=False)
    questions = ["what color is the cat?", "what is on the mat?", "what color is the cat?"]
    previous_prompt = 0
    for turn, question in enumerate(questions):
        read.clear()
        reply = cached.ask(question, max_new_tokens=6)
        assert read == ([[f"question : {question} answer :"]] if turn < 2 else [])  # only the new turn is read
        stats = cached.last_stats
        assert reply == recomputed.ask(question, max_new_tokens=6)
        assert stats.reply_ids == recomputed.last_stats.reply_ids
        assert stats.reused_tokens >= previous_prompt  # the earlier turns, their visual prompts included
        previous_prompt = stats.prompt_tokens
    # what chat read on the second turn is the training row's prefix: training trains what chat asks
    row = collate_for(pipe)([{**chat_item(), "messages": [
        {"role": "user", "content": questions[0]}, {"role": "assistant", "content": cached.history[1][1]},
        {"role": "user", "content": questions[1]}, {"role": "assistant", "content": cached.history[3][1]}]}])
    messages = [{"role": r, "content": t} for r, t in cached.history[:3]]
    asked = cached.format.token_ids(messages, model.num_visual, images=[1, 0, 1])
    assert row["input_ids"][0].tolist()[: len(asked)] == asked
    with torch.no_grad():
        features = model.image_features(pipe.pixel_values([image_files[0]]))
        second = encode(features, *pipe.tokenize_text(["Question: what is on the mat? Answer:"]))[0]
    torch.testing.assert_close(cached._visuals["what is on the mat?"], second)


def test_a_message_without_text_is_read_as_no_text():
    """An image sent alone (the server's caption form) gets the visual prompt of no text, as captions are trained."""
    assert turn_prompt("  what is it?  ", False) == "Question: what is it? Answer:"
    assert turn_prompt("what is it?", True) == "Question: what is it? Short answer:"
    assert turn_prompt("", False) == "" and turn_prompt("  ", False) == ""
