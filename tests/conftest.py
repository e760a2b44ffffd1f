"""Shared fixtures: tiny random transformers Blip2 parts (vision, Q-Former, OPT / Llama / T5) built in-process."""

from __future__ import annotations

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn

NUM_WORDS = 40  # the tiny tokenizers know "w0" ... "w39"
PAD, EOS, BOS = 0, 1, 2
IMAGE_SIZE = 32


def word_tokenizer(bos: bool = True, image_token: bool = False) -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: <pad>=0, </s>=1, <s>=2, <unk>=3, then w0..w39 (and <image> when asked)."""
    vocab = {"<pad>": PAD, "</s>": EOS, "<s>": BOS, "<unk>": 3} | {f"w{i}": 4 + i for i in range(NUM_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>" if bos else None,
    )
    if image_token:
        tokenizer.add_tokens([transformers.AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    return tokenizer


def text_config(kind: str, vocab_size: int) -> transformers.PretrainedConfig:
    """Tiny OPT / Llama (decoder-only) or Flan-T5-style T5 (encoder-decoder) configs."""
    ids = dict(pad_token_id=PAD, eos_token_id=EOS)
    if kind == "opt":
        return transformers.OPTConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            word_embed_proj_dim=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            bos_token_id=BOS,
            **ids,
        )
    if kind == "llama":
        return transformers.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            bos_token_id=BOS,
            **ids,
        )
    if kind == "t5":
        return transformers.T5Config(
            vocab_size=vocab_size,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            decoder_start_token_id=PAD,
            **ids,
        )
    raise ValueError(f"unknown tiny text model {kind!r}")


def vision_config() -> transformers.Blip2VisionConfig:
    return transformers.Blip2VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Non-degenerate random weights (transformers zero-initialises query tokens and nearly zeroes the ViT):
    normal(0, 0.1) everywhere, norm scales around 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            is_norm = "norm" in type(sub).__name__.lower()
            for pname, p in sub.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=generator) * 0.1
                p.copy_(noise + 1 if is_norm and pname == "weight" else noise)
    return module


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
        tokenizer = word_tokenizer(bos=text != "t5", image_token=True)
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
            text_config=None if retrieval else text_config(text, vocab_size=len(tokenizer)).to_dict(),
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
        tokenizer = word_tokenizer(bos=text != "t5")
        config = text_config(text, vocab_size=len(tokenizer))
        auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
        llm_dir = tmp_path / f"{text}-{seed}"
        randomize_(auto.from_config(config), seed + 1).save_pretrained(llm_dir)
        tokenizer.save_pretrained(llm_dir)
        return vision_dir, llm_dir

    return make


@pytest.fixture
def randomize():
    """``randomize(module, seed)``: see ``randomize_``."""
    return randomize_


@pytest.fixture
def pixels():
    """Factory: ``pixels(batch=2, seed=0)`` -> random normalised images [B, 3, 32, 32] for the tiny vision tower."""

    def make(batch: int = 2, seed: int = 0) -> torch.Tensor:
        return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))

    return make
