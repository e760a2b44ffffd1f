"""Text from images through the LLM: captions, answers, instructed generation, streaming.

Every prompt goes in as ``[visual prompt ; BOS + prompt]`` (decoder-only) or ``[visual prompt ; prompt + EOS]``
into the encoder (encoder-decoder), the layout BLIP-2 trains with (``Blip2Model.prompt_inputs``).
Prompts are never cut silently: one that does not fit the LLM's context window, together with the visual
tokens and ``max_new_tokens``, raises ``ValueError`` naming it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from blip2.infer.batching import Images, as_image_list, as_text_list, batch_slices, pair_up, pixel_batch, select
from blip2.infer.decoding import GenerationOptions, stream_tokens, text_pieces
from blip2.models.language import FrozenLLM

if TYPE_CHECKING:
    from blip2.models.blip2 import Blip2Model

# The paper's VQA prompts (section 4.2): OPT-style decoder-only LLMs, and Flan-T5.
VQA_TEMPLATES = {False: "Question: {} Answer:", True: "Question: {} Short answer:"}  # keyed by is_encoder_decoder


def vqa_template(llm: FrozenLLM) -> str:
    return VQA_TEMPLATES[llm.is_encoder_decoder]


def format_questions(questions: Sequence[str], template: str) -> list[str]:
    """Put each question into ``template``, which must hold exactly one ``{}``."""
    if template.count("{}") != 1:
        raise ValueError(f"prompt_template must contain exactly one '{{}}' where the question goes, got {template!r}")
    return [template.replace("{}", question.strip()) for question in questions]


def context_length(llm: FrozenLLM) -> int | None:
    """The LLM's context window in tokens (None when its positions are not bounded, as with T5's relative ones)."""
    return getattr(llm.model.config.get_text_config(), "max_position_embeddings", None)


def check_prompt_lengths(llm: FrozenLLM, num_visual: int, prompts: Sequence[str], options: GenerationOptions) -> int:
    """Raise if a prompt does not fit the context window; return the longest prompt's token count."""
    tokenized = llm.tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
    counts = [len(ids) for ids in tokenized]
    longest = max(counts, default=0)
    limit = context_length(llm)
    if limit is None:
        return longest
    reserved = num_visual + 1 + (0 if llm.is_encoder_decoder else options.max_new_tokens)  # + BOS or EOS
    for index, count in enumerate(counts):
        if count + reserved > limit:
            raise ValueError(
                f"prompt {index} is {count} tokens; with {num_visual} visual tokens, BOS/EOS and max_new_tokens="
                f"{options.max_new_tokens} that exceeds the LLM's context of {limit} tokens by "
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
        raise ValueError(f"{count} images but {len(listed)} prompts: give one prompt per image, or one string for all")
    return listed


@torch.no_grad()
def generate(
    model: "Blip2Model",
    images: Images,
    prompts: str | Sequence[str] | None,
    batch_size: int,
    options: GenerationOptions,
) -> list[str]:
    """One text per image (``prompts`` None: unconditional, i.e. captioning), in batches of ``batch_size``."""
    llm = model._require_llm()
    images = as_image_list(images)
    prompts = resolve_prompts(prompts, len(images))
    check_prompt_lengths(llm, model.num_visual, prompts, options)  # every prompt, before any work
    texts: list[str] = []
    for where in batch_slices(len(images), batch_size):
        features = model.image_features(pixel_batch(model, images, where))  # [b, N, D]
        texts += generate_from_features(model, features, prompts[where], options)
    return texts


@torch.no_grad()
def generate_from_features(
    model: "Blip2Model", features: torch.Tensor, prompts: Sequence[str], options: GenerationOptions
) -> list[str]:
    """Frozen image features [B, N, D] and a prompt per row ("": none) -> the text after each prompt, through
    transformers' ``generate`` (one batch; the texts are what follows the prompts)."""
    llm = model._require_llm()
    embeds, mask = prompt_embeddings(model, features, prompts, options)
    with options.seeded(embeds.device):
        out = llm.model.generate(inputs_embeds=embeds, attention_mask=mask, **options.hf_kwargs(llm))
    # with inputs_embeds only, a decoder-only model returns just the new tokens (as does the decoder of T5)
    return [text.strip() for text in llm.tokenizer.batch_decode(out, skip_special_tokens=True)]


@torch.no_grad()
def prompt_embeddings(
    model: "Blip2Model", features: torch.Tensor, prompts: Sequence[str], options: GenerationOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked prompts -> LLM input embeddings [B, Q + T, H] and mask [B, Q + T], nothing cut."""
    longest = check_prompt_lengths(model._require_llm(), model.num_visual, prompts, options)
    return model.prompt_inputs(features, prompts, max_len=max(longest, 1) + 1)  # + BOS (decoder-only) or EOS (T5)


def answer(
    model: "Blip2Model",
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
    prompts = format_questions([questions[i] for i in question_index], template or vqa_template(model._require_llm()))
    return generate(model, select(images, image_index), prompts, batch_size, options)


def stream(model: "Blip2Model", image, prompt: str | None, options: GenerationOptions) -> Iterator[str]:
    """Text pieces for one image as they are decoded (greedy or sampling); they join to what ``generate`` returns.

    The image is read and the prompt checked now; decoding happens as the iterator is consumed, in the
    caller's thread (no worker thread: an error surfaces at the ``next`` that hit it, and abandoning the
    iterator simply stops decoding).
    """
    llm = model._require_llm()
    if options.num_beams > 1:
        raise ValueError("streaming decodes one sequence token by token: use num_beams=1 (greedy or do_sample)")
    images = as_image_list(image)
    if len(images) != 1:
        raise ValueError(f"stream takes one image, got {len(images)}: use generate for several")
    prompts = resolve_prompts(prompt, 1)
    with torch.no_grad():
        features = model.image_features(pixel_batch(model, images, slice(None)))  # [1, N, D]
        embeds, mask = prompt_embeddings(model, features, prompts, options)
    return text_pieces(stream_tokens(llm, embeds, mask, options), llm.tokenizer)
