"""The engine: every request's text equals what the model returns for it alone (ChatSession, caption, answer),
whatever else is in the batch and whenever it arrives; the image and prefix caches skip work; sampling, stop strings,
max tokens, cancelling, a full queue and over-long prompts."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from blip2.infer.decoding import GenerationOptions
from blip2.serve.engine import Delta, Engine, Finished, QueueFull
from blip2.serve.prompts import Message, UserImage

WORDS = "a photo of cat dog the is on mat what color red blue".split()
QUESTIONS = ["what is on the mat", "what color is the cat", "is the dog red", "a photo of what"]


def image(data: bytes) -> UserImage:
    return UserImage.from_bytes(data, max_pixels=10**7)


def user(text: str, *images: UserImage) -> Message:
    return Message("user", text, tuple(images))


def drain(engine: Engine) -> None:
    while engine.busy:
        engine.step()


def text_of(handle) -> Finished:
    """Check that the streamed pieces join to the final text; return the final event."""
    events = list(handle.events())
    assert all(isinstance(e, Delta) for e in events[:-1]) and isinstance(events[-1], Finished)
    assert "".join(e.text for e in events[:-1]) == events[-1].text
    return events[-1]


def submit(engine, messages, prompt_format="chat", stop=(), **gen):
    return engine.submit(engine.prompt(messages, prompt_format), GenerationOptions(**gen), list(stop))


@pytest.mark.parametrize("family", ["llama", "opt", "t5"])
def test_each_reply_equals_the_model_alone_whatever_shares_the_batch(tiny_model, pngs, family):
    pipe = tiny_model(family)
    engine = Engine(pipe, max_batch=3, max_queue=8)
    images = [image(data) for data in pngs]
    lengths = [12, 4, 9, 7]  # rows leave at different steps
    sessions = [pipe.chat(images[i % 3].image) for i in range(4)]
    conversations = [[user(QUESTIONS[i], images[i % 3])] for i in range(4)]
    for turn in range(2):
        handles = [submit(engine, conversations[0], max_new_tokens=lengths[0])]
        engine.step()
        engine.step()
        handles.append(submit(engine, conversations[1], max_new_tokens=lengths[1]))  # joins a running batch
        engine.step()
        handles += [submit(engine, conversations[i], max_new_tokens=lengths[i]) for i in (2, 3)]  # one waits
        drain(engine)
        replies = [text_of(handle) for handle in handles]
        for i, (session, reply) in enumerate(zip(sessions, replies)):
            expected = session.ask(conversations[i][-1].text, max_new_tokens=lengths[i])
            assert reply.text == expected, f"turn {turn}, conversation {i}"
            assert reply.usage.completion_tokens == session.last_stats.generated_tokens
            assert reply.usage.prompt_tokens == session.last_stats.prompt_tokens
            conversations[i] += [Message("assistant", reply.text), user(QUESTIONS[(i + turn + 1) % 4])]
    assert engine.stats.max_batch_seen == 3
    texts = [text for session in sessions for role, text in session.history if role == "assistant"]
    assert len(set(texts)) > 2, "degenerate replies prove little"


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_a_busy_engine_stays_exact(tiny_model, pngs, family):
    """Sixteen requests of random lengths arriving at random steps into five rows: rows leave and are replaced,
    longer prompts join shorter ones, the storage is rebuilt; every answer is still the model's alone."""
    pipe = tiny_model(family)
    engine = Engine(pipe, max_batch=5, max_queue=16)
    rng = random.Random(0)
    images = [image(data) for data in pngs]
    requests = []
    for i in range(16):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
        requests.append((images[i % 3], words, rng.randint(1, 20)))
    handles = []
    for picture, question, length in requests:
        handles.append(submit(engine, [user(question, picture)], "vqa", max_new_tokens=length))
        for _ in range(rng.randint(0, 3)):
            engine.step()
    drain(engine)
    for (picture, question, length), handle in zip(requests, handles):
        assert text_of(handle).text == pipe.answer(picture.image, question, max_new_tokens=length)[0], question
    assert engine.stats.max_batch_seen == 5


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_prompts_admitted_together_run_in_one_forward_and_equal_the_model_alone(tiny_model, pngs, family):
    """Six prompts of different lengths, some extending a cached conversation and some not, run in one prefill
    forward (padded), then a budget that splits them; every reply is still the model's alone."""
    pipe = tiny_model(family)
    images = [image(data) for data in pngs]
    for budget in (10_000, 60):
        engine = Engine(pipe, max_batch=8, prefill_budget=budget)
        first = submit(engine, [user(QUESTIONS[0], images[0])], max_new_tokens=6)
        drain(engine)
        history = [user(QUESTIONS[0], images[0]), Message("assistant", text_of(first).text)]
        cases = [(history + [user(QUESTIONS[1])], 5), ([user(QUESTIONS[2], images[1])], 9),
                 ([user(" ".join(WORDS * 3), images[2])], 4), (history + [user(QUESTIONS[3])], 7),
                 ([user("red", images[0])], 8), ([user(QUESTIONS[1], images[2])], 3)]  # fmt: skip
        before = engine.stats.prefill_forwards
        handles = [submit(engine, messages, max_new_tokens=n) for messages, n in cases]
        drain(engine)
        forwards = engine.stats.prefill_forwards - before
        assert forwards == 1 if budget == 10_000 else 1 < forwards < len(cases)
        replies = [text_of(handle) for handle in handles]
        for (messages, n), reply in zip(cases, replies):
            session = pipe.chat(messages[0].images[0].image)
            for message in messages[:-1]:
                if message.role == "user":
                    session.ask(message.text, max_new_tokens=6)
            assert reply.text == session.ask(messages[-1].text, max_new_tokens=n), (budget, messages[-1])
        assert replies[0].usage.cached_tokens > len(history) and replies[3].usage.cached_tokens > len(history)


@pytest.mark.parametrize("family", ["llama", "opt", "t5"])
def test_captions_and_answers_equal_model_generate(tiny_model, pngs, family):
    pipe = tiny_model(family)
    engine = Engine(pipe, max_batch=4)
    images = [image(data) for data in pngs]
    handles = [submit(engine, [user("", images[0])], "vqa", max_new_tokens=10)]
    engine.step()
    handles.append(submit(engine, [user(QUESTIONS[0], images[1])], "vqa", max_new_tokens=6))
    engine.step()
    handles.append(submit(engine, [user("", images[2])], "vqa", max_new_tokens=8))
    drain(engine)
    caption, answer, caption2 = (text_of(h).text for h in handles)
    assert caption == pipe.caption(images[0].image, max_new_tokens=10)[0]
    assert answer == pipe.answer(images[1].image, QUESTIONS[0], max_new_tokens=6)[0]
    assert caption2 == pipe.caption(images[2].image, max_new_tokens=8)[0]


def test_a_later_turn_reuses_the_conversation_cache_and_the_image_is_encoded_once(tiny_model, pngs, monkeypatch):
    pipe = tiny_model("llama")
    engine = Engine(pipe, max_batch=4)
    photo = image(pngs[0])
    encoded, positions = [], []
    image_features, forward = pipe.model.image_features, pipe.model.llm.model.forward
    monkeypatch.setattr(pipe.model, "image_features", lambda pixels: encoded.append(1) or image_features(pixels))
    monkeypatch.setattr(pipe.model.llm.model, "forward",
                        lambda *a, **k: positions.append(k["inputs_embeds"].shape[1]) or forward(*a, **k))
    first = submit(engine, [user(QUESTIONS[0], photo)], max_new_tokens=6)
    drain(engine)
    reply = text_of(first)
    assert reply.usage.cached_tokens == 0 and encoded == [1]
    conversation = [user(QUESTIONS[0], photo), Message("assistant", reply.text), user(QUESTIONS[1])]
    prompt = engine.prompt(conversation)
    positions.clear()
    second = engine.submit(prompt, GenerationOptions(max_new_tokens=6))
    drain(engine)
    usage = text_of(second).usage
    assert encoded == [1], "the second turn's image came from the image cache"
    assert usage.cached_tokens >= reply.usage.prompt_tokens  # the whole first prompt, and the reply as re-tokenized
    assert positions[0] == usage.prompt_tokens - usage.cached_tokens  # only the rest of the prompt ran
    assert positions[1:] == [1] * (usage.completion_tokens - 1)
    session = pipe.chat(photo.image)
    session.ask(QUESTIONS[0], max_new_tokens=6)
    third = submit(engine, conversation, max_new_tokens=6)
    drain(engine)
    assert text_of(third).text == session.ask(QUESTIONS[1], max_new_tokens=6)
    assert engine.images.hits >= 2 and engine.prefixes.hits >= 2


def test_another_user_with_the_same_image_reuses_its_prefix(tiny_model, pngs):
    pipe = tiny_model("llama")
    engine = Engine(pipe)
    photo = image(pngs[1])
    submit(engine, [user(QUESTIONS[0], photo)], max_new_tokens=3)
    drain(engine)
    handle = submit(engine, [user(QUESTIONS[2], photo)], max_new_tokens=3)
    drain(engine)
    prompt = engine.prompt([user(QUESTIONS[2], photo)])
    shared = prompt.ids.index(-1) + pipe.model.num_visual  # system prompt, "user", the image
    assert text_of(handle).usage.cached_tokens >= shared
    other = submit(engine, [user(QUESTIONS[2], image(pngs[2]))], max_new_tokens=3)
    drain(engine)
    assert text_of(other).usage.cached_tokens == prompt.ids.index(-1)  # another image: only what precedes it


def test_seeded_sampling_equals_the_session_and_depends_on_the_seed(tiny_model, pngs):
    pipe = tiny_model("llama")
    engine = Engine(pipe)
    photo = image(pngs[0])
    gen = dict(do_sample=True, temperature=1.5, top_p=0.9, max_new_tokens=10)
    handles = [submit(engine, [user(QUESTIONS[0], photo)], seed=seed, **gen) for seed in (1, 2, 3)]
    handles.append(submit(engine, [user(QUESTIONS[1], photo)], max_new_tokens=10))  # greedy in the same batch
    drain(engine)
    texts = [text_of(h).text for h in handles]
    for seed, text in zip((1, 2, 3), texts):
        assert text == pipe.chat(photo.image).ask(QUESTIONS[0], seed=seed, **gen)
    assert len(set(texts[:3])) > 1


def test_stop_strings_cut_the_reply_and_max_tokens_ends_it(tiny_model, pngs):
    pipe = tiny_model("opt")
    engine = Engine(pipe)
    photo = image(pngs[0])
    full = submit(engine, [user(QUESTIONS[0], photo)], max_new_tokens=12)
    drain(engine)
    full = text_of(full)
    words = full.text.split()
    assert len(words) >= 4 and full.finish_reason == "length" and full.usage.completion_tokens == 12
    stop = " ".join(words[2:4])
    cut = submit(engine, [user(QUESTIONS[0], photo)], stop=["zzz", stop], max_new_tokens=12)
    drain(engine)
    cut = text_of(cut)
    assert cut.text == full.text[: full.text.index(stop)].rstrip() and cut.finish_reason == "stop"
    assert cut.usage.completion_tokens < 12


def test_the_options_own_stop_rules_equal_the_session(tiny_model, pngs):
    """GenerationOptions' rules, as ``decode_loop`` applies them: more stop tokens (``eos_token_id``), stop strings
    (kept in the text), no stop token before ``min_new_tokens``."""
    pipe = tiny_model("opt")
    engine = Engine(pipe)
    photo = image(pngs[0])
    session = pipe.chat(photo.image)
    words = session.ask(QUESTIONS[0], max_new_tokens=12).split()
    ids = session.last_stats.reply_ids
    cases = [dict(eos_token_id=ids[3]), dict(stop_strings=" ".join(words[2:4])),
             dict(eos_token_id=ids[1], min_new_tokens=6)]  # fmt: skip
    handles = [submit(engine, [user(QUESTIONS[0], photo)], max_new_tokens=12, **case) for case in cases]
    drain(engine)
    replies = [text_of(handle) for handle in handles]
    for case, reply in zip(cases, replies):
        assert reply.text == pipe.chat(photo.image).ask(QUESTIONS[0], max_new_tokens=12, **case), case
    assert replies[0].finish_reason == "stop" and replies[0].usage.completion_tokens <= 4
    assert replies[1].finish_reason == "stop" and replies[1].text.endswith(" ".join(words[2:4]))
    assert replies[2].usage.completion_tokens >= 6


def test_a_cancelled_request_frees_its_row_at_the_next_step(tiny_model, pngs):
    engine = Engine(tiny_model("llama"), max_batch=1, max_queue=1)
    photo = image(pngs[0])
    first = submit(engine, [user(QUESTIONS[0], photo)], max_new_tokens=200)
    second = submit(engine, [user(QUESTIONS[1], photo)], max_new_tokens=3)
    with pytest.raises(QueueFull) as full:
        submit(engine, [user(QUESTIONS[2], photo)], max_new_tokens=3)
    assert full.value.retry_after >= 1
    engine.step()
    assert engine.running == 1 and engine.waiting == 1
    first.cancel()
    engine.step()
    assert engine.running <= 1 and engine.waiting == 0  # the second request took the row
    drain(engine)
    events = list(first.events())
    assert events[-1].finish_reason == "cancelled" and events[-1].usage.completion_tokens < 10
    assert text_of(second).finish_reason in ("stop", "length")


def test_over_long_prompts_are_refused_with_the_counts(tiny_model, pngs):
    engine = Engine(tiny_model("llama"))
    with pytest.raises(ValueError, match=r"the prompt is \d+ tokens .* context of 256 tokens"):
        submit(engine, [user(" ".join(["cat"] * 200), image(pngs[0]))], max_new_tokens=100)


def test_the_engine_thread_serves_threads_and_asyncio_at_once(tiny_model, pngs):
    pipe = tiny_model("llama")
    engine = Engine(pipe, max_batch=2).start()
    photo = image(pngs[0])
    results = {}

    def worker(i):
        results[i] = submit(engine, [user(QUESTIONS[i], photo)], max_new_tokens=8).result().text

    async def streamed():
        handle = submit(engine, [user(QUESTIONS[3], photo)], max_new_tokens=8)
        return "".join([event.text async for event in handle.aevents() if isinstance(event, Delta)])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    results[3] = asyncio.run(streamed())
    for thread in threads:
        thread.join()
    assert engine.call(lambda: 41 + 1).result() == 42
    engine.stop()
    for i, text in results.items():
        assert text == pipe.chat(photo.image).ask(QUESTIONS[i], max_new_tokens=8)


def test_a_failing_forward_fails_its_requests_and_the_engine_serves_on(tiny_model, pngs, monkeypatch):
    pipe = tiny_model("llama")
    engine = Engine(pipe).start()
    forward, broken = pipe.model.llm.model.forward, {"when": None}

    def failing(*args, **kwargs):
        if broken["when"] is not None and broken["when"](kwargs["inputs_embeds"].shape[1]):
            raise RuntimeError("the device fell over")
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.model.llm.model, "forward", failing)
    for when, data in [(lambda positions: positions == 1, pngs[0]), (lambda positions: positions > 1, pngs[2])]:
        broken["when"] = when  # a decode step fails, then a prompt's forward
        with pytest.raises(RuntimeError, match="fell over"):
            submit(engine, [user(QUESTIONS[0], image(data))], max_new_tokens=5).result()
        assert engine.running == 0
        broken["when"] = None
        assert submit(engine, [user(QUESTIONS[1], image(pngs[0]))], max_new_tokens=5).result().usage.completion_tokens
    assert engine.stats.failed == 2
    engine.stop()


def test_a_model_that_reads_each_turn_is_served_as_its_chat_session_reads(tiny_model, pngs):
    """``llm.visual_prompt_per_turn``: each user message opens with the latest image's visual prompt read from that
    message; replies equal ChatSession's, and the second turn still reuses the first turn's cached positions."""
    pipe = tiny_model(visual_prompt_per_turn=True)
    engine = Engine(pipe, max_batch=4)
    encode, encoded = pipe.model.image_features, []
    pipe.model.image_features = lambda pixels: encoded.append(len(pixels)) or encode(pixels)
    picture = image(pngs[0])
    first = submit(engine, [user(QUESTIONS[0], picture)], max_new_tokens=6)
    other = submit(engine, [user(QUESTIONS[2], image(pngs[1]))], max_new_tokens=5)
    drain(engine)
    answered = text_of(first).text
    conversation = [user(QUESTIONS[0], picture), Message("assistant", answered), user(QUESTIONS[1])]
    prompt = engine.prompt(conversation)
    assert prompt.images == [picture, picture] and prompt.reads == [QUESTIONS[0], QUESTIONS[1]]
    second = submit(engine, conversation, max_new_tokens=6)
    drain(engine)
    assert encoded == [1, 1]  # each image once, though the first is read into two visual prompts
    session = pipe.chat(picture.image)
    assert answered == session.ask(QUESTIONS[0], max_new_tokens=6)
    reply = text_of(second)
    assert reply.text == session.ask(QUESTIONS[1], max_new_tokens=6)
    assert reply.usage.cached_tokens >= len(engine.prompt(conversation[:1]).ids)
    assert text_of(other).text == pipe.chat(image(pngs[1]).image).ask(QUESTIONS[2], max_new_tokens=5)
    assert engine.images.misses == 5  # a visual prompt per (image, message), and each image's features
