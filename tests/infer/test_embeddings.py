"""ITC embeddings and ITM probabilities for users: values, normalisation, batching, pairing, bad input."""

from __future__ import annotations

import pytest
import torch

from blip2.data.images import ImageError


@torch.no_grad()
def test_image_and_text_embeddings_are_the_itc_features(tiny_model, image_files):
    model = tiny_model(None)
    images = model.image_embeddings(image_files, batch_size=2)
    assert images.shape == (3, 4, 16)
    features = model.model.image_features(model.pixel_values(image_files))
    torch.testing.assert_close(images, model.model.image_embeds_itc(model.model.query_states(features).queries))
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(3, 4))

    texts = ["a photo of a cat", "a dog on the mat", "red"]
    embedded = model.text_embeddings(texts, batch_size=2)
    assert embedded.shape == (3, 16)
    ids, mask = model.tokenize_text(texts)
    torch.testing.assert_close(embedded, model.model.text_embeds_itc(ids, mask))
    torch.testing.assert_close(model.text_embeddings("red"), embedded[2:])
    assert model.image_embeddings([]).shape == (0, 4, 16)


@torch.no_grad()
def test_itm_is_the_match_probability_of_each_pair(tiny_model, image_files):
    model = tiny_model("opt")  # a stage-2 model has the stage-1 heads too
    texts = ["a photo of a cat", "a dog on the mat", "red"]
    probabilities = model.itm(image_files, texts, batch_size=2)
    features = model.model.image_features(model.pixel_values(image_files))
    logits = model.model.itm_logits(features, *model.tokenize_text(texts))
    torch.testing.assert_close(probabilities, logits.softmax(-1)[:, 1])
    assert ((probabilities > 0) & (probabilities < 1)).all() and probabilities.std() > 0
    one_image = model.itm(image_files[0], texts)
    torch.testing.assert_close(one_image[0], probabilities[0])
    assert one_image.shape == (3,)
    assert model.itm(image_files, "red").shape == (3,)
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        model.itm(image_files, texts[:2])


def test_embedding_inputs_are_checked(tiny_model, image_files, tmp_path):
    model = tiny_model(None)
    with pytest.raises(ValueError, match="text 1 is empty"):
        model.text_embeddings(["a cat", ""])
    with pytest.raises(ValueError, match="text 0 is 102 Q-Former tokens.*64 positions"):
        model.text_embeddings(["cat " * 100])
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageError, match="missing.png: file not found"):
        model.image_embeddings([image_files[0], missing])
    with pytest.raises(ValueError, match="batch_size"):
        model.image_embeddings(image_files, batch_size=0)
