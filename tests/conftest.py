"""Shared fixtures: tiny random transformers Blip2 parts (vision, Q-Former, OPT / Llama / T5) built in-process, tiny
pipelines and small image files. The builders live in ``tiny.py``."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tiny import (
    IMAGE_SIZE,
    NUMBERED,
    randomize_,
    text_model,
    tiny_pipeline,
    vision_config,
    word_tokenizer,
)


def numbered_tokenizer(bos: bool = True, image_token: bool = False) -> transformers.PreTrainedTokenizerFast:
    """<pad>=0, </s>=1, <s>=2 (the BOS when ``bos``), <unk>=3, then w0..w39 (and <image> when asked)."""
    tokenizer = word_tokenizer(["<pad>", "</s>", "<s>", "<unk>"], NUMBERED, eos_token="</s>", pad_token="<pad>",
                               bos_token="<s>" if bos else None)
    if image_token:
        tokenizer.add_tokens([transformers.AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    return tokenizer


def text_config(kind: str, tokenizer) -> transformers.PretrainedConfig:
    """Tiny OPT / Llama (decoder-only) or Flan-T5-style T5 (encoder-decoder) configs for ``tokenizer``."""
    return text_model(kind, tokenizer, max_positions=64).config


@pytest.fixture
def tiny_blip2(tmp_path):
    """Factory: a saved random transformers Blip2 directory and the model in it.

    ``text``: "opt", "llama" or "t5" (a Blip2ForConditionalGeneration) or None (a Blip2ForImageTextRetrieval).
    The LLM tokenizer holds ``<image>`` (id 44, the LLM vocabulary's last row), ``config.image_token_id``.
    """

    def make(
        text: str | None = "opt",
        num_layers: int = 2,
        cross_attention_freq: int = 2,
        num_query_tokens: int = 6,
        seed: int = 0,
    ):
        retrieval = text is None
        tokenizer = numbered_tokenizer(bos=text != "t5", image_token=True)
        image_token = tokenizer.convert_tokens_to_ids("<image>")
        config = transformers.Blip2Config(
            vision_config=vision_config().to_dict(),
            qformer_config=dict(
                vocab_size=99,
                hidden_size=32,
                num_hidden_layers=num_layers,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=64,
                cross_attention_frequency=cross_attention_freq,
                use_qformer_text_input=retrieval,
            ),
            text_config=None if retrieval else text_config(text, tokenizer).to_dict(),
            num_query_tokens=num_query_tokens,
            image_text_hidden_size=16,
            image_token_index=None if retrieval else image_token,
        )
        cls = transformers.Blip2ForImageTextRetrieval if retrieval else transformers.Blip2ForConditionalGeneration
        hf_model = randomize_(cls(config), seed).eval()
        directory = tmp_path / f"blip2-{text or 'itm'}-{num_layers}-{cross_attention_freq}-{num_query_tokens}-{seed}"
        hf_model.save_pretrained(directory)
        if not retrieval:
            tokenizer.save_pretrained(directory)
        return directory, hf_model

    return make


@pytest.fixture(autouse=True)
def cli_logging_stays_in_its_test():
    """`blip2.cli.main` configures logging on the stream a test captures; later tests must not write to it."""
    handlers = logging.getLogger().handlers[:]
    levels = {name: logging.getLogger(name).level for name in ("", "blip2")}
    yield
    logging.getLogger().handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and a shared 2-core machine punishes oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_parts(tmp_path):
    """Factory: standalone directories for a random Blip2VisionModel and a random LLM ("opt", "llama", "t5").

    The LLM tokenizer has no ``<image>`` token and fills the vocabulary exactly (44 tokens), as SmolLM2's does.
    Returns (vision_dir, llm_dir); llm_dir is None for text=None.
    """

    def make(text: str | None = "opt", seed: int = 0):
        vision = randomize_(transformers.Blip2VisionModel(vision_config()), seed)
        vision_dir = tmp_path / f"vision-{seed}"
        vision.save_pretrained(vision_dir)
        if text is None:
            return vision_dir, None
        tokenizer = numbered_tokenizer(bos=text != "t5")
        llm_dir = tmp_path / f"{text}-{seed}"
        randomize_(text_model(text, tokenizer, max_positions=64), seed + 1).save_pretrained(llm_dir)
        tokenizer.save_pretrained(llm_dir)
        return vision_dir, llm_dir

    return make


@pytest.fixture
def randomize():
    """``randomize(module, seed)``: see ``tiny.randomize_``."""
    return randomize_


@pytest.fixture
def pixels():
    """Factory: ``pixels(batch=2, seed=0)`` -> random normalised images [B, 3, 32, 32] for the tiny vision tower."""

    def make(batch: int = 2, seed: int = 0) -> torch.Tensor:
        return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))

    return make


@pytest.fixture
def tiny_model():
    """Factory: ``tiny_model(family="llama" | "opt" | "t5" | None, seed=0, bos_before_image=False,
    prompt_to_qformer=False, visual_prompt_per_turn=False)`` -> an eval-mode pipeline whose every part is random
    (None: a stage-1 model)."""
    return tiny_pipeline


def noise_image(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def image_files(tmp_path):
    """Three small random PNG files (different sizes) -> their paths."""
    paths = []
    for seed, size in enumerate([(40, 30), (32, 32), (50, 64)]):
        path = tmp_path / f"image{seed}.png"
        noise_image(seed, size).save(path)
        paths.append(path)
    return paths
