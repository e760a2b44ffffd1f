"""Chat sessions: the cached path answers exactly as recomputing the whole conversation does, while running only
each turn's new positions; template and template-less formats; streaming, stopping, beams, errors."""

from __future__ import annotations

import pytest
import torch

from blip2.data.conversation import IMAGE_ID
from blip2.errors import InputError
from blip2.prompts import vqa_template

QUESTIONS = ["what is on the mat", "what color is the cat", "is the dog red", "a photo of what", "w1 w2 w3"]


def positions_run(model, monkeypatch) -> list[int]:
    """Record the number of input positions of every LLM forward call (decoder positions for T5)."""
    lengths = []
    forward = model.model.llm.model.forward

    def counting(*args, **kwargs):
        inputs = next(kwargs[k] for k in ("inputs_embeds", "input_ids", "decoder_input_ids") if kwargs.get(k) is not None)
        lengths.append(inputs.shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.model.llm.model, "forward", counting)
    return lengths


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("family, seed, bos_first", [("llama", 0, False), ("llama", 3, False), ("opt", 0, False),
                                                     ("opt", 0, True), ("llama", 0, True)])
def test_cached_turns_equal_recomputed_turns_and_run_only_new_positions(tiny_model, image_files, monkeypatch, family,
                                                                        seed, bos_first):
    model = tiny_model(family, seed=seed, bos_before_image=bos_first)
    cached, recomputed = model.chat(image_files[0]), model.chat(image_files[0], cache=False)
    lengths = positions_run(model, monkeypatch)
    fed = []  # the generated tokens the session feeds back (all but each reply's last)
    embed = model.model.llm.embed

    def recording_embed(ids):
        if ids.shape == (1, 1):
            fed.append(int(ids))
        return embed(ids)

    monkeypatch.setattr(model.model.llm, "embed", recording_embed)
    previous, previous_reply, previous_fed = None, "", []
    for turn, question in enumerate(QUESTIONS):
        lengths.clear()
        reply = cached.ask(question, max_new_tokens=12)
        stats = cached.last_stats
        assert lengths[0] == stats.computed_tokens  # the prompt part of the turn: one forward over the new positions
        assert lengths[1:] == [1] * (stats.generated_tokens - 1)  # then one position per generated token but the last
        if previous is not None:
            # reused: the previous prompt, and its reply as far as re-tokenizing the reply's text gives the same tokens
            # (a random model also emits special tokens, which the text drops)
            retokenized = model.llm_tokenizer.hf(previous_reply, add_special_tokens=False)["input_ids"]
            assert stats.reused_tokens == previous.prompt_tokens + common_prefix(previous_fed, retokenized)
            assert stats.computed_tokens < stats.prompt_tokens / 2
        previous, previous_reply, previous_fed = stats, reply, list(fed)
        fed.clear()
        assert reply == recomputed.ask(question, max_new_tokens=12), f"turn {turn}"
        assert stats.reply_ids == recomputed.last_stats.reply_ids, f"turn {turn}"  # token for token, specials too
        assert stats.reply_ids[:-1] == previous_fed  # all but the last were fed back into the cache
        fed.clear()
    assert cached.history == recomputed.history
    assert [role for role, _ in cached.history] == ["user", "assistant"] * len(QUESTIONS)
    assert len({text for role, text in cached.history if role == "assistant"}) > 1, "degenerate replies prove little"


def test_the_soft_prompt_opens_the_first_user_message_of_the_chat_template(tiny_model, image_files):
    model = tiny_model("llama")
    session = model.chat(image_files[0])
    ids = session.format.token_ids(session._messages("what is on the mat"), 4)
    tokenizer = model.llm_tokenizer.hf
    start = ids.index(IMAGE_ID)
    assert ids[start : start + 4] == [IMAGE_ID] * 4 and IMAGE_ID not in ids[start + 4 :]
    assert tokenizer.decode(ids[:start]) == "<|im_start|> system you are a cat <|im_end|> <|im_start|> user"
    assert tokenizer.decode(ids[start + 4 :]) == "what is on the mat <|im_end|> <|im_start|> assistant"


def test_without_a_template_the_first_turn_is_the_vqa_prompt(tiny_model, image_files):
    for family in ("opt", "t5"):
        model = tiny_model(family)
        session = model.chat(image_files[1])
        first = session.ask("what is on the mat", max_new_tokens=6)
        assert first == model.answer(image_files[1], "what is on the mat", max_new_tokens=6)[0]
        second = session.ask("what color is the cat", max_new_tokens=6)
        first_reply = session.history[1][1]
        template = vqa_template(model.model.llm.is_encoder_decoder)
        turns = [template.format("what is on the mat"), first_reply, template.format("what color is the cat")]
        prompt = " ".join(turn for turn in turns if turn)
        assert second == model.generate(image_files[1], prompt, max_new_tokens=6)[0]


def test_t5_chat_recomputes_and_still_matches(tiny_model, image_files):
    model = tiny_model("t5")
    session, baseline = model.chat(image_files[0]), model.chat(image_files[0], cache=False)
    for question in QUESTIONS[:3]:
        assert session.ask(question, max_new_tokens=6) == baseline.ask(question, max_new_tokens=6)
        assert session.last_stats.reused_tokens == 0
    assert "".join(session.stream("w1 w2", max_new_tokens=6)) == baseline.ask("w1 w2", max_new_tokens=6)


def test_streamed_turns_equal_asked_turns_and_a_stopped_stream_keeps_its_partial_reply(tiny_model, image_files):
    model = tiny_model("llama", seed=3)
    streamed, asked = model.chat(image_files[2]), model.chat(image_files[2])
    for question in QUESTIONS[:3]:
        assert "".join(streamed.stream(question, max_new_tokens=10)) == asked.ask(question, max_new_tokens=10)
    pieces = streamed.stream("what is on the mat", max_new_tokens=10)
    next(pieces)
    pieces.close()
    partial = streamed.history[-1][1]
    full = asked.ask("what is on the mat", max_new_tokens=10)
    assert full.startswith(partial) and len(partial) < len(full)
    # the conversation goes on from the partial reply, through the cache, as a recomputation of it would
    recomputed = model.chat(image_files[2], cache=False)
    for role, text in streamed.history:
        recomputed._turns.append((role, text))
    assert streamed.ask("w1 w2", max_new_tokens=8) == recomputed.ask("w1 w2", max_new_tokens=8)
    # starting a turn while another streams closes the first
    unfinished = streamed.stream("w3", max_new_tokens=8)
    next(unfinished)
    streamed.ask("w4", max_new_tokens=4)
    assert [text for role, text in streamed.history if role == "user"][-2:] == ["w3", "w4"]


def test_beam_turns_recompute_and_later_greedy_turns_still_match(tiny_model, image_files):
    model = tiny_model("llama", seed=3)
    cached, recomputed = model.chat(image_files[0]), model.chat(image_files[0], cache=False)
    assert cached.ask(QUESTIONS[0], max_new_tokens=8) == recomputed.ask(QUESTIONS[0], max_new_tokens=8)
    beams = dict(max_new_tokens=8, num_beams=3)
    assert cached.ask(QUESTIONS[1], **beams) == recomputed.ask(QUESTIONS[1], **beams)
    assert cached.last_stats.reused_tokens == 0
    assert cached.ask(QUESTIONS[2], max_new_tokens=8) == recomputed.ask(QUESTIONS[2], max_new_tokens=8)
    assert cached.last_stats.reused_tokens > 0
    with pytest.raises(ValueError, match="beam search cannot stream"):
        cached.stream("w1", num_beams=2)


def test_sampled_chat_is_reproducible_with_a_seed(tiny_model, image_files):
    model = tiny_model("llama")
    replies = []
    for _ in range(2):
        session = model.chat(image_files[0])
        replies.append([session.ask(q, max_new_tokens=8, do_sample=True, temperature=1.5, seed=5) for q in QUESTIONS[:3]])
    assert replies[0] == replies[1]


def test_reset_and_set_image(tiny_model, image_files):
    model = tiny_model("llama", seed=3)
    session = model.chat(image_files[0])
    first = session.ask(QUESTIONS[0], max_new_tokens=8)
    session.ask(QUESTIONS[1], max_new_tokens=8)
    session.reset()
    assert session.history == []
    assert session.ask(QUESTIONS[0], max_new_tokens=8) == first
    assert session.last_stats.reused_tokens > 0  # the system prompt and image are still cached
    session.set_image(image_files[1])
    assert session.history == [] and session.last_stats.reused_tokens > 0
    start = session.format.token_ids(session._messages(QUESTIONS[0]), model.model.num_visual).index(IMAGE_ID)
    other = session.ask(QUESTIONS[0], max_new_tokens=8)
    assert session.last_stats.reused_tokens == start  # everything before the image reused, nothing from it on
    assert other == model.chat(image_files[1], cache=False).ask(QUESTIONS[0], max_new_tokens=8)


def test_an_error_mid_turn_drops_the_cache_and_the_session_recovers(tiny_model, image_files, monkeypatch):
    model = tiny_model("llama", seed=3)
    session, baseline = model.chat(image_files[0]), model.chat(image_files[0], cache=False)
    assert session.ask(QUESTIONS[0], max_new_tokens=8) == baseline.ask(QUESTIONS[0], max_new_tokens=8)
    forward = model.model.llm.model.forward
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.model.llm.model, "forward", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        session.ask(QUESTIONS[1], max_new_tokens=8)
    monkeypatch.setattr(model.model.llm.model, "forward", forward)
    assert len(session.history) == 2  # the failed turn is not recorded
    assert session.ask(QUESTIONS[1], max_new_tokens=8) == baseline.ask(QUESTIONS[1], max_new_tokens=8)
    assert session.last_stats.reused_tokens == 0


def test_chat_input_errors(tiny_model, image_files, tmp_path):
    model = tiny_model("llama")
    session = model.chat(image_files[0])
    with pytest.raises(ValueError, match="empty"):
        session.ask("   ")
    with pytest.raises(ValueError, match="context of 256 tokens: reset"):
        session.ask(" ".join(["cat"] * 200), max_new_tokens=50)
    assert session.history == []
    with pytest.raises(InputError, match="stage-1"):
        tiny_model(None).chat(image_files[0])
    broken = tmp_path / "broken.png"
    broken.write_bytes(image_files[0].read_bytes()[:60])
    with pytest.raises(ValueError, match="broken.png"):
        session.set_image(broken)


def test_chat_soft_prompt_is_computed_once(tiny_model, image_files, monkeypatch):
    model = tiny_model("llama")
    session = model.chat(image_files[0])
    encodes = []
    monkeypatch.setattr(model.model.qformer, "forward", lambda *a, _f=model.model.qformer.forward, **k: encodes.append(1) or _f(*a, **k))
    for question in QUESTIONS[:3]:
        session.ask(question, max_new_tokens=4)
    assert encodes == []
    model.chat(image_files[0], cache=False).ask(QUESTIONS[0], max_new_tokens=4)
    assert encodes == [1]
    assert list(session._visuals) == [""] and session._visuals[""].shape == (4, model.model.llm.hidden_size)


def test_bos_before_image_travels_with_the_visual_prompt_in_both_chat_formats(tiny_model, image_files):
    """The whole trained prompt, BOS row included, goes where the format puts the image (measured on the demo
    model: without the BOS row its template chat answers from the LLM's prior)."""
    model = tiny_model("llama", bos_before_image=True)  # has a chat template
    session = model.chat(image_files[0])
    with torch.no_grad():
        prompt = model.model.soft_prompt(model.model.image_features(model.pixel_values([image_files[0]])))  # [1, 1 + Q, H]
    assert torch.equal(session._visual([""]), prompt[0])
    opt = tiny_model("opt", bos_before_image=True)  # no template: BLIP-2's VQA prompt, the layout stage 2 trains
    qa = opt.chat(image_files[0])
    assert qa._visual([""]).shape[0] == opt.model.num_visual == opt.model.qformer.num_queries + 1
    assert qa.ask("what is on the mat", max_new_tokens=6) == opt.answer(image_files[0], "what is on the mat",
                                                                      max_new_tokens=6)[0]
