"""Stage-1 outputs for users: ITC embeddings of images and texts, and ITM match probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from blip2.data.text import encode
from blip2.errors import InputError
from blip2.infer.batching import (
    Images,
    as_image_list,
    as_text_list,
    batch_slices,
    pair_up,
    pixel_batch,
    select,
)

if TYPE_CHECKING:
    from blip2.pipeline import Blip2Pipeline


@torch.no_grad()
def image_embeddings(pipe: "Blip2Pipeline", images: Images, batch_size: int) -> Tensor:
    """Normalised per-query embeddings [B, Q, E], as ITC compares them (similarity = max over queries)."""
    model = pipe.model
    images = as_image_list(images)
    parts = [torch.empty(0, model.qformer.num_queries, model.cfg.qformer.embed_dim, device=model.device)]
    for where in batch_slices(len(images), batch_size):
        features = model.image_features(pixel_batch(pipe, images, where))  # [b, N, D]
        parts.append(model.image_embeds_itc(model.query_states(features).queries))  # [b, Q, E]
    return torch.cat(parts)


@torch.no_grad()
def text_embeddings(pipe: "Blip2Pipeline", texts: str | Sequence[str], batch_size: int) -> Tensor:
    """Normalised [CLS] embeddings [B, E] of the texts run alone through the Q-Former."""
    model = pipe.model
    texts = as_text_list(texts, "text")
    parts = [torch.empty(0, model.cfg.qformer.embed_dim, device=model.device)]  # no text: [0, E]
    if texts:
        check_text_lengths(pipe, texts)
    for where in batch_slices(len(texts), batch_size):
        parts.append(model.text_embeds_itc(*pipe.tokenize_text(texts[where], max_len=_text_limit(pipe))))
    return torch.cat(parts)


@torch.no_grad()
def itm(pipe: "Blip2Pipeline", images: Images, texts: str | Sequence[str], batch_size: int) -> Tensor:
    """P(match) [B] for image i with text i (one image with many texts, or many images with one text, works too)."""
    model = pipe.model
    images = as_image_list(images)
    texts = check_text_lengths(pipe, as_text_list(texts, "text"))
    image_index, text_index = pair_up(len(images), "images", len(texts), "texts")
    probabilities = [torch.empty(0, device=model.device)]
    for where in batch_slices(len(image_index), batch_size):
        pairs = select(images, image_index[where])
        features = model.image_features(pixel_batch(pipe, pairs, slice(None)))  # [b, N, D]
        ids, mask = pipe.tokenize_text([texts[i] for i in text_index[where]], max_len=_text_limit(pipe))
        probabilities.append(model.itm_logits(features, ids, mask).softmax(dim=-1)[:, 1])  # class 1 = match
    return torch.cat(probabilities)


def check_text_lengths(pipe: "Blip2Pipeline", texts: list[str]) -> list[str]:
    """Texts unchanged, if each fits the Q-Former's position table; a longer one raises instead of being cut."""
    limit = _text_limit(pipe)
    for index, length in enumerate(qformer_lengths(pipe, texts)):
        if length > limit:
            raise InputError(
                f"text {index} is {length} Q-Former tokens ([CLS] and [SEP] included), more than its {limit} "
                "positions: shorten it"
            )
    return texts


def qformer_lengths(pipe: "Blip2Pipeline", texts: list[str]) -> list[int]:
    """Each text's Q-Former token count, [CLS] and [SEP] included, tokenized as the embeddings tokenize it."""
    return [len(ids) for ids in encode(pipe.qformer_tokenizer, texts, split_special_tokens=True)["input_ids"]]


def _text_limit(pipe: "Blip2Pipeline") -> int:
    return pipe.model.cfg.qformer.max_position_embeddings
