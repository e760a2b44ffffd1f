"""Text from images through the LLM: captions, answers, instructed generation, streaming.

Every prompt goes in as ``[visual prompt ; BOS + prompt]`` (decoder-only) or ``[visual prompt ; prompt + EOS]``
into the encoder (encoder-decoder), the layout BLIP-2 trains with; a model loaded from transformers reads its
prompts as its saved processor tokenizes them (``LLMTokenizer.prompt_specials``).
Prompts are never cut silently: one that does not fit the LLM's context window, together with the visual
tokens and ``max_new_tokens``, raises ``ValueError`` naming it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from blip2.data.text import pad
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
from blip2.infer.decoding import GenerationOptions, stream_tokens, text_pieces
from blip2.prompts import format_questions, vqa_template

if TYPE_CHECKING:
    from blip2.pipeline import Blip2Pipeline


def check_prompt_lengths(pipe: "Blip2Pipeline", prompts: Sequence[str], options: GenerationOptions) -> int:
    """Raise if a prompt does not fit the context window; return the longest prompt's token count."""
    llm = pipe.model.require_llm()
    counts = [len(ids) for ids in pipe.llm_tokenizer.batch_ids(prompts)] if prompts else []
    longest = max(counts, default=0)
    limit = llm.context_length()
    if limit is None:
        return longest
    reserved = pipe.model.num_visual + 1 + (0 if llm.is_encoder_decoder else options.max_new_tokens)  # + BOS or EOS
    for index, count in enumerate(counts):
        if count + reserved > limit:
            raise InputError(
                f"prompt {index} is {count} tokens; with {pipe.model.num_visual} visual tokens, BOS/EOS and "
                f"max_new_tokens={options.max_new_tokens} that exceeds the LLM's context of {limit} tokens by "
                f"{count + reserved - limit}: shorten the prompt or lower max_new_tokens"
            )
    return longest


def resolve_prompts(prompts: str | Sequence[str] | None, count: int) -> list[str]:
    """None -> no prompt (""); one string -> the same for every image; a list -> one per image, none empty."""
    if prompts is None:
        return [""] * count
    listed = as_text_list(prompts, "prompt")
    if isinstance(prompts, str):
        return listed * count
    if len(listed) != count:
        raise InputError(f"{count} images but {len(listed)} prompts: give one prompt per image, or one string for all")
    return listed


@torch.no_grad()
def generate(
    pipe: "Blip2Pipeline",
    images: Images,
    prompts: str | Sequence[str] | None,
    batch_size: int,
    options: GenerationOptions,
) -> list[str]:
    """One text per image (``prompts`` None: unconditional, i.e. captioning), in batches of ``batch_size``."""
    pipe.model.require_llm()
    images = as_image_list(images)
    prompts = resolve_prompts(prompts, len(images))
    check_prompt_lengths(pipe, prompts, options)  # every prompt, before any work
    texts: list[str] = []
    for where in batch_slices(len(images), batch_size):
        features = pipe.model.image_features(pixel_batch(pipe, images, where))  # [b, N, D]
        texts += generate_from_features(pipe, features, prompts[where], options)
    return texts


@torch.no_grad()
def generate_from_features(
    pipe: "Blip2Pipeline", features: torch.Tensor, prompts: Sequence[str], options: GenerationOptions
) -> list[str]:
    """Frozen image features [B, N, D] and a prompt per row ("": none) -> the text after each prompt, through
    transformers' ``generate`` (one batch; the texts are what follows the prompts)."""
    llm, tokenizer = pipe.model.require_llm(), pipe.llm_tokenizer
    embeds, mask = prompt_embeddings(pipe, features, prompts, options)
    with options.seeded(embeds.device):
        out = llm.model.generate(inputs_embeds=embeds, attention_mask=mask, **options.hf_kwargs(tokenizer))
    # with inputs_embeds only, a decoder-only model returns just the new tokens (as does the decoder of T5)
    return [tokenizer.decode(row) for row in out.tolist()]


@torch.no_grad()
def prompt_embeddings(
    pipe: "Blip2Pipeline", features: torch.Tensor, prompts: Sequence[str], options: GenerationOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked prompts -> LLM input embeddings [B, V + T, H] and mask [B, V + T], nothing cut."""
    longest = check_prompt_lengths(pipe, prompts, options)
    specials = len(pipe.llm_tokenizer.prefix) + len(pipe.llm_tokenizer.suffix)
    return prompt_inputs(pipe, features, prompts, max_len=max(longest, 1) + max(specials, 1))  # nothing cut


def prompt_inputs(
    pipe: "Blip2Pipeline", features: torch.Tensor, prompts: Sequence[str], max_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LLM input for generation, ``[visual prompt ; BOS + prompt]`` (decoder-only, left padded) or
    ``[visual prompt ; prompt + EOS]`` (encoder-decoder), or the special tokens the tokenizer adds itself
    (``LLMTokenizer.prompt_ids``) -> (embeds [B, V + T, H_llm], mask [B, V + T]).

    Prompts are cut to ``max_len`` tokens (special tokens included; default ``cfg.llm.max_text_len``, the training
    length); the inference functions check lengths first and pass a limit that cuts nothing.
    """
    model = pipe.model
    llm = model.require_llm()
    visual = model.soft_prompt(features, *pipe.qformer_prompt_ids(prompts))  # [B, V, H_llm]
    tokenizer = pipe.llm_tokenizer
    rows = tokenizer.prompt_ids(prompts, max_len or model.cfg.llm.max_text_len)
    ids, mask = pad(rows, tokenizer.pad_token_id, pad_left=not llm.is_encoder_decoder)  # [B, T]
    ids, mask = ids.to(visual.device), mask.to(visual.device)
    embeds = torch.cat([visual, llm.embed(ids)], dim=1)
    return embeds, torch.cat([torch.ones(visual.shape[:2], dtype=mask.dtype, device=mask.device), mask], dim=1)


def answer(
    pipe: "Blip2Pipeline",
    images: Images,
    questions: str | Sequence[str],
    template: str | None,
    batch_size: int,
    options: GenerationOptions,
) -> list[str]:
    """One answer per (image, question) pair; one image or one question pairs with all of the other."""
    questions = as_text_list(questions, "question")
    images = as_image_list(images)
    image_index, question_index = pair_up(len(images), "images", len(questions), "questions")
    template = template or vqa_template(pipe.model.require_llm().is_encoder_decoder)
    prompts = format_questions([questions[i] for i in question_index], template)
    return generate(pipe, select(images, image_index), prompts, batch_size, options)


def stream(pipe: "Blip2Pipeline", image, prompt: str | None, options: GenerationOptions) -> Iterator[str]:
    """Text pieces for one image as they are decoded (greedy or sampling); they join to what ``generate`` returns.

    The image is read and the prompt checked now; decoding happens as the iterator is consumed, in the
    caller's thread (no worker thread: an error surfaces at the ``next`` that hit it, and abandoning the
    iterator simply stops decoding).
    """
    llm = pipe.model.require_llm()
    if options.num_beams > 1:
        raise InputError("streaming decodes one sequence token by token: use num_beams=1 (greedy or do_sample)")
    images = as_image_list(image)
    if len(images) != 1:
        raise InputError(f"stream takes one image, got {len(images)}: use generate for several")
    prompts = resolve_prompts(prompt, 1)
    with torch.no_grad():
        features = pipe.model.image_features(pixel_batch(pipe, images, slice(None)))  # [1, N, D]
        embeds, mask = prompt_embeddings(pipe, features, prompts, options)
    tokens = stream_tokens(llm, embeds, mask, options, pipe.llm_tokenizer)
    return text_pieces(tokens, pipe.llm_tokenizer)
