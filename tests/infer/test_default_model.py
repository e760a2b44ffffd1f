"""The real default model (EfficientNet-Lite0 + MiniLM Q-Former + SmolLM2-135M-Instruct; the Q-Former is untrained,
so the texts mean nothing, but every shape, template and cache is the real one)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import blip2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)  # the untrained Q-Former's cross-attention and queries are random: make them repeatable
    return blip2.load("default")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    image = Image.new("RGB", (200, 150), "white")
    image.paste((30, 60, 200), (50, 40, 150, 110))
    return image


def test_chat_on_smollm2_reuses_its_cache_and_equals_recomputation(model, photo):
    cached, recomputed = model.chat(photo), model.chat(photo, cache=False)
    questions = ["What is in the picture?", "What colour is it?", "Describe it in one word.", "Thank you!"]
    previous = None
    for turn, question in enumerate(questions):
        reply = cached.ask(question, max_new_tokens=16)
        assert reply == recomputed.ask(question, max_new_tokens=16), f"turn {turn}"
        stats = cached.last_stats
        if previous is not None:  # the previous prompt (and normally its reply) comes from the cache
            assert stats.reused_tokens >= previous.prompt_tokens and stats.computed_tokens < stats.prompt_tokens / 2
        previous = stats
    assert any(text for role, text in cached.history if role == "assistant")
    ids = cached.format.token_ids(cached._messages("next"), model.model.qformer.num_queries)
    start = ids.index(-1)
    text_before = model.llm_tokenizer.hf.decode(ids[:start])
    assert text_before.startswith("<|im_start|>system\n") and text_before.endswith("<|im_start|>user\n")


def test_stream_generate_and_the_other_heads(model, photo):
    streamed = "".join(model.stream(photo, "A photo of", max_new_tokens=12))
    assert streamed == model.caption(photo, "A photo of", max_new_tokens=12)[0]
    captions = model.caption([photo, photo.rotate(90, expand=True)], max_new_tokens=8, batch_size=1)
    assert len(captions) == 2
    assert len(model.qformer_caption(photo, num_beams=3, max_new_tokens=8)) == 1
    embeds = model.image_embeddings([photo, photo])
    assert embeds.shape == (2, 32, 256)
    torch.testing.assert_close(embeds[0], embeds[1])
    assert model.text_embeddings(["a blue rectangle"]).shape == (1, 256)
    probability = model.itm(photo, ["a blue rectangle", "a dog"])
    assert probability.shape == (2,) and ((probability >= 0) & (probability <= 1)).all()
