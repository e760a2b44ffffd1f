"""The real default model (EfficientNet-Lite0 + MiniLM Q-Former + SmolLM2-135M-Instruct with its chat template; the
Q-Former is untrained, so the texts mean nothing, but every template, cache and batch is the real one)."""

from __future__ import annotations

import io

import openai
import pytest
import torch
from PIL import Image

import blip2
from blip2.infer.decoding import GenerationOptions
from blip2.serve.engine import Engine
from blip2.serve.prompts import Message, UserImage


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)  # the untrained Q-Former's random parts: repeatable
    return blip2.load("default")


def photo_bytes(colour) -> bytes:
    image = Image.new("RGB", (200, 150), "white")
    image.paste(colour, (50, 40, 150, 110))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_smollm2_conversations_in_one_batch_equal_chat_sessions(model):
    engine = Engine(model, max_batch=4)
    images = [UserImage.from_bytes(photo_bytes(colour), 10**8) for colour in [(30, 60, 200), (200, 40, 40)]]
    questions = [["What is in the picture?", "What colour is it?"], ["Describe the image.", "Is it big?"]]
    sessions = [model.chat(image.image) for image in images]
    conversations = [[], []]
    for turn in range(2):
        handles = []
        for i in range(2):
            conversations[i].append(Message("user", questions[i][turn], (images[i],) if turn == 0 else ()))
            handles.append(engine.submit(engine.prompt(conversations[i]), GenerationOptions(max_new_tokens=12 + 4 * i)))
            engine.step()  # the second conversation joins the first one's batch
        while engine.busy:
            engine.step()
        for i, handle in enumerate(handles):
            reply = handle.result()
            assert reply.text == sessions[i].ask(questions[i][turn], max_new_tokens=12 + 4 * i), (turn, i)
            if turn:
                assert reply.usage.cached_tokens == sessions[i].last_stats.reused_tokens > 0
            conversations[i].append(Message("assistant", reply.text))
    assert engine.stats.max_batch_seen == 2 and engine.images.misses == 2


def test_the_openai_client_on_the_default_model(model, serve, data_url):
    server, engine = serve(model=model)
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    url = data_url(photo_bytes((30, 60, 200)))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is in the picture?"}]}]  # fmt: skip
    chunks = api.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    session = model.chat(UserImage.from_bytes(photo_bytes((30, 60, 200)), 10**8).image)
    assert text == session.ask("What is in the picture?", max_new_tokens=12) and text
