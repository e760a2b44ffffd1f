"""Tiny Blip2 models built in-process for the inference tests: a random Blip2VisionModel, a random Q-Former with the
MiniLM tokenizer, and a random Llama (with a ChatML chat template), OPT or T5 with word-level tokenizers."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2.models.blip2 import Blip2Model
from blip2.models.language import llm_from_hf
from blip2.models.vision import image_encoder_from_hf
from blip2.weights.bert import load_tokenizer

WORDS = "a photo of cat dog the is on mat what color red blue question answer short system user assistant you are".split()
WORDS += [f"w{i}" for i in range(40)]
NUM_QUERIES = 4
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nyou are a cat<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def word_tokenizer(family: str) -> transformers.PreTrainedTokenizerFast:
    """Word-level tokenizers with each family's special tokens; "llama" is a chat model (ChatML, like SmolLM2)."""
    specials, kwargs = {
        "llama": (
            ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"],
            dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>"),
        ),
        "opt": (["<pad>", "</s>", "<unk>"], dict(bos_token="</s>", eos_token="</s>", pad_token="<pad>")),
        "t5": (["<pad>", "</s>", "<unk>"], dict(eos_token="</s>", pad_token="<pad>")),
    }[family]
    vocab = {token: index for index, token in enumerate(specials + WORDS + [":", "?", "."])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **kwargs)
    if family == "llama":
        tokenizer.chat_template = CHATML
    return tokenizer


def text_model(family: str, tokenizer) -> transformers.PreTrainedModel:
    vocab = len(tokenizer)
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id, **ids,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config)
    if family == "opt":
        config = transformers.OPTConfig(
            vocab_size=vocab, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id, **ids,
        )  # fmt: skip
        return transformers.OPTForCausalLM(config)
    config = transformers.T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, decoder_start_token_id=tokenizer.pad_token_id, **ids,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


@functools.cache
def qformer_tokenizer():
    return load_tokenizer("minilm")


@pytest.fixture
def tiny_model(randomize):
    """Factory: ``tiny_model(family="llama" | "opt" | "t5" | None, seed=0, bos_before_image=False,
    prompt_to_qformer=False)`` -> an eval-mode Blip2Model whose every part is random (None: a stage-1 model)."""

    def make(
        family: str | None = "llama", seed: int = 0, bos_before_image: bool = False, prompt_to_qformer: bool = False
    ) -> Blip2Model:
        torch.manual_seed(seed)
        vision = randomize(transformers.Blip2VisionModel(transformers.Blip2VisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
        )), seed)  # fmt: skip
        llm = None
        if family is not None:
            tokenizer = word_tokenizer(family)
            llm = llm_from_hf(randomize(text_model(family, tokenizer), seed + 1), tokenizer)
        cfg = Blip2Config(
            vision=VisionConfig(kind="hf", path="in-memory"),
            qformer=QFormerConfig(
                hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=64,
                num_query_tokens=NUM_QUERIES, embed_dim=16, encoder_width=32, cross_attention_freq=1, init_from=None,
            ),  # fmt: skip
            llm=LLMConfig(kind="hf", path="in-memory", bos_before_image=bos_before_image,
                          prompt_to_qformer=prompt_to_qformer) if family else None,
        )
        model = Blip2Model(cfg, image_encoder_from_hf(vision), qformer_tokenizer(), llm)
        trainable = [model.qformer, model.vision_norm, model.vision_proj, model.text_proj, model.itm_head, model.llm_proj]
        for offset, part in enumerate(p for p in trainable if p is not None):
            randomize(part, seed + 2 + offset)
        return model.eval()

    return make


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

