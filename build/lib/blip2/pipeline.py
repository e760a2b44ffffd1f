"""What users call: ``blip2.load(source)`` returns a ``Blip2Pipeline``, the pure model (``blip2.models.blip2``)
with its tokenizers and preprocessing, and every inference method (caption, answer, generate, stream, chat,
embeddings, ITM) plus save and export. The server's engine and the search index are built on it.

Images are PIL images or paths (one or a sequence; pixel values [B, 3, H, W] work too); every method batches
internally. ``**gen`` are the fields of ``blip2.infer.decoding.GenerationOptions``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from blip2.config import Blip2Config
from blip2.data.images import load_image
from blip2.data.text import qformer_ids
from blip2.factory import Parts, load_parts
from blip2.infer import embeddings, generation
from blip2.infer.batching import ImageInput, Images
from blip2.infer.chat import ChatSession
from blip2.infer.decoding import GenerationOptions
from blip2.infer.qformer_generation import qformer_caption
from blip2.weights.checkpoint import save_checkpoint
from blip2.weights.hf import export_hf


class Blip2Pipeline:
    """A model ready for use: ``model`` (a ``Blip2Model``), ``qformer_tokenizer``, ``llm_tokenizer`` (None for a
    stage-1 model) and ``preprocess`` (the image encoder's)."""

    def __init__(self, model, qformer_tokenizer, llm_tokenizer, preprocess) -> None:
        self.model = model
        self.qformer_tokenizer = qformer_tokenizer
        self.llm_tokenizer = llm_tokenizer
        self.preprocess = preprocess

    @classmethod
    def from_parts(cls, parts: Parts) -> "Blip2Pipeline":
        return cls(*parts)

    @property
    def cfg(self) -> Blip2Config:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device: str | torch.device) -> "Blip2Pipeline":
        self.model.to(device)
        return self

    # ---- turning input into tensors ------------------------------------------------------------------------------

    def pixel_values(self, images: Sequence[ImageInput]) -> Tensor:
        """PIL images or paths -> [B, 3, H, W] with the encoder's own preprocessing."""
        pixels = self.preprocess([load_image(image) for image in images])
        return pixels.to(self.device, self.model.vision_dtype)

    def tokenize_text(self, texts: Sequence[str], max_len: int | None = None) -> tuple[Tensor, Tensor]:
        """Q-Former text ([CLS] ... [SEP]) -> input_ids, attention_mask [B, T] on the model's device."""
        ids, mask = qformer_ids(self.qformer_tokenizer, texts, max_len or self.cfg.qformer.max_text_len)
        return ids.to(self.device), mask.to(self.device)

    def qformer_prompt_ids(self, prompts: Sequence[str]) -> tuple[Tensor | None, Tensor | None]:
        """The prompts as the Q-Former reads them with ``llm.prompt_to_qformer`` (else (None, None))."""
        if self.cfg.llm is None or not self.cfg.llm.prompt_to_qformer:
            return None, None
        return self.tokenize_text(prompts)

    # ---- inference: what users call (docs/inference.md) ---------------------------------------------------------

    def generate(
        self, images: Images, prompts: str | Sequence[str] | None = None, batch_size: int = 8, **gen
    ) -> list[str]:
        """Text for each image, conditioned on a prompt per image (or one for all; None: no prompt).

        Greedy by default; ``num_beams`` for beam search, ``do_sample`` (with ``temperature``, ``top_p``,
        ``top_k``) for sampling; ``max_new_tokens`` (30). A prompt too long for the LLM raises ValueError.
        """
        return generation.generate(self, images, prompts, batch_size, GenerationOptions.from_kwargs(gen))

    def stream(self, image: ImageInput, prompt: str | None = None, **gen) -> Iterator[str]:
        """``generate`` for one image, as text pieces while they are decoded (greedy or sampling)."""
        return generation.stream(self, image, prompt, GenerationOptions.from_kwargs(gen))

    def caption(self, images: Images, prompt: str | None = None, batch_size: int = 8, **gen) -> list[str]:
        """A caption per image; ``prompt`` (e.g. "a photo of") is a prefix the caption continues."""
        return self.generate(images, prompt, batch_size, **gen)

    def answer(
        self,
        images: Images,
        questions: str | Sequence[str],
        prompt_template: str | None = None,
        batch_size: int = 8,
        **gen,
    ) -> list[str]:
        """Short answers: one question per image (or one for all, or one image for all questions).

        Each question goes into the paper's prompt, "Question: {} Answer:" (decoder-only) or
        "Question: {} Short answer:" (encoder-decoder), unless ``prompt_template`` (with one ``{}``) says otherwise.
        """
        options = GenerationOptions.from_kwargs(gen)
        return generation.answer(self, images, questions, prompt_template, batch_size, options)

    def chat(self, image: ImageInput, system: str | None = None, cache: bool = True) -> ChatSession:
        """A multi-turn conversation about ``image`` that encodes it once and keeps the LLM's key/value cache."""
        return ChatSession(self, image, system=system, cache=cache)

    def image_embeddings(self, images: Images, batch_size: int = 32) -> Tensor:
        """Normalised ITC embeddings [B, Q, 256], one per query (image-text similarity = max over queries)."""
        return embeddings.image_embeddings(self, images, batch_size)

    def text_embeddings(self, texts: str | Sequence[str], batch_size: int = 64) -> Tensor:
        """Normalised ITC embeddings [B, 256] of the texts ([CLS] through ``text_proj``)."""
        return embeddings.text_embeddings(self, texts, batch_size)

    def itm(self, images: Images, texts: str | Sequence[str], batch_size: int = 32) -> Tensor:
        """Image-text match probabilities [B] (softmax of the ITM head, class 1) for pairs (image i, text i)."""
        return embeddings.itm(self, images, texts, batch_size)

    def qformer_caption(self, images: Images, batch_size: int = 8, **gen) -> list[str]:
        """Captions from the Q-Former alone ([DEC]-started generation against the cached queries; no LLM needed).

        Greedy, sampling or beam search (``num_beams``); stops at [SEP] or after ``max_new_tokens``.
        """
        return qformer_caption(self, images, batch_size, GenerationOptions.from_kwargs(gen))

    # ---- saving ---------------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Config + trainable weights (safetensors); the frozen parts are named by the config, not copied."""
        return save_checkpoint(self.model, directory)

    def export_hf(self, directory: str | Path) -> Path:
        """A full, self-contained transformers Blip2 directory (frozen parts included)."""
        tokenizer = self.qformer_tokenizer if self.llm_tokenizer is None else self.llm_tokenizer.hf
        return export_hf(self.model, tokenizer, self.preprocess, directory)


def load(source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         **parts) -> Blip2Pipeline:
    """Load a model from a preset name, a directory saved here, a transformers Blip2 directory or a LAVIS ``.pth``.

    ``dtype`` applies to the frozen encoder and LLM; the Q-Former and heads stay fp32 (as in BLIP-2).
    A LAVIS ``.pth`` holds no frozen parts: name them in ``parts`` (see ``blip2.factory.load_lavis``).
    """
    pipe = Blip2Pipeline.from_parts(load_parts(source, **parts)).to(device)
    if dtype is not None:
        for frozen in pipe.model.frozen_modules():
            frozen.to(dtype)
    pipe.model.eval()
    return pipe
