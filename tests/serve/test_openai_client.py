"""The official ``openai`` package against a real server: chat, streaming, a 3-turn conversation, embeddings, and
the errors a client sees (bad request, wrong key, unknown model, a full queue)."""

from __future__ import annotations

import base64
import struct
import threading

import openai
import pytest
import torch

from blip2.serve.prompts import UserImage

QUESTIONS = ["what is on the mat", "what color is the cat", "is the dog red"]


def client(server, key="unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


@pytest.fixture
def image_message(data_url):
    """``image_message(text, png_bytes)`` -> a user message with the image (as a data: URL), then the text."""

    def make(text: str, png: bytes) -> dict:
        return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                            {"type": "text", "text": text}]}  # fmt: skip

    return make


def test_chat_streaming_and_models(serve, pngs, image_message):
    server, engine = serve("llama")
    api = client(server)
    assert [m.id for m in api.models.list()] == ["tiny"]
    messages = [image_message(QUESTIONS[0], pngs[0])]
    reply = api.chat.completions.create(model="tiny", messages=messages, max_tokens=10)
    picture = UserImage.from_bytes(pngs[0], 10**7).image
    expected = engine.pipe.chat(picture).ask(QUESTIONS[0], max_new_tokens=10)
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.object == "chat.completion"
    assert reply.usage.prompt_tokens > engine.model.num_visual and 1 <= reply.usage.completion_tokens <= 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(api.chat.completions.create(model="tiny", messages=messages, max_tokens=10, stream=True,
                                              stream_options={"include_usage": True}))  # fmt: skip
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == expected and len([p for p in pieces if p]) >= 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: from the prefix cache


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_a_three_turn_conversation_equals_a_chat_session_and_reuses_the_cache(serve, pngs, family, image_message):
    server, engine = serve(family)
    api = client(server)
    session = engine.pipe.chat(UserImage.from_bytes(pngs[1], 10**7).image)
    messages = [{"role": "system", "content": "you are a cat"}] if family == "llama" else []
    session.system = messages[0]["content"] if messages else None
    previous_prompt = 0
    for turn, question in enumerate(QUESTIONS):
        messages.append(image_message(question, pngs[1]) if turn == 0 else {"role": "user", "content": question})
        reply = api.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=turn)
        text = reply.choices[0].message.content
        assert text == session.ask(question, max_new_tokens=8), f"turn {turn}"
        if turn:
            assert reply.usage.prompt_tokens_details.cached_tokens >= previous_prompt
        previous_prompt = reply.usage.prompt_tokens
        messages.append({"role": "assistant", "content": text})
    assert engine.images.misses == 1 and engine.images.hits == 2  # the image was encoded once


def test_embeddings_of_texts_and_images(serve, pngs, data_url):
    server, engine = serve("llama")
    api = client(server)
    texts = ["a photo of a cat", "a red dog"]
    out = api.embeddings.create(model="tiny", input=texts)  # the client asks for base64 and decodes it
    expected = engine.pipe.text_embeddings(texts)
    got = torch.tensor([item.embedding for item in out.data])
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-6)
    assert out.usage.prompt_tokens == sum(len(ids) for ids in engine.pipe.qformer_tokenizer(texts)["input_ids"])
    floats = api.embeddings.create(model="tiny", input=[texts[0], data_url(pngs[2])], encoding_format="float")
    image = engine.pipe.image_embeddings(UserImage.from_bytes(pngs[2], 10**7).image)[0]  # [Q, E]
    assert torch.allclose(torch.tensor(floats.data[0].embedding), expected[0], atol=1e-6)
    assert torch.allclose(torch.tensor(floats.data[1].embedding), image.flatten(), atol=1e-6)
    raw = api.embeddings.with_raw_response.create(model="tiny", input="a cat", encoding_format="base64").http_response
    packed = base64.b64decode(raw.json()["data"][0]["embedding"])
    unpacked = torch.tensor(struct.unpack(f"<{len(packed) // 4}f", packed))
    assert torch.allclose(unpacked, engine.pipe.text_embeddings(["a cat"])[0], atol=1e-6)


def test_errors_the_client_raises(serve, pngs, image_message):
    server, engine = serve("llama", api_key="sesame", engine=dict(max_batch=1, max_queue=0))
    with pytest.raises(openai.AuthenticationError, match="Bearer"):
        client(server, "wrong").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    api = client(server, "sesame")
    with pytest.raises(openai.NotFoundError, match="'gpt-4o' is not served here"):
        api.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="is not valid base64") as bad:
        api.chat.completions.create(model="tiny", messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}])
    assert bad.value.body["param"] == "messages[0].content[0]"
    gate = threading.Event()
    engine.call(gate.wait)  # the engine thread waits here: requests queue up
    stream = api.chat.completions.create(model="tiny", messages=[image_message("cat", pngs[0])], max_tokens=5,
                                         stream=True)  # fmt: skip
    next(iter(stream))  # accepted: it takes the only place (one row, no queue behind it)
    with pytest.raises(openai.RateLimitError) as busy:
        api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert int(busy.value.response.headers["retry-after"]) >= 1
    gate.set()
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)  # the first one is answered
    assert api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
