"""Tiny random parts built in-process, shared by every test: word-level tokenizers, 2-layer LLMs of each family,
a Blip2 vision tower, and full tiny pipelines (importable: pytest puts tests/ on the path)."""

from __future__ import annotations

import functools

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from torch import nn

from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2.factory import assemble
from blip2.pipeline import Blip2Pipeline
from blip2.weights.bert import load_tokenizer
from blip2.weights.encoders import image_encoder_from_hf
from blip2.weights.llms import llm_from_hf

IMAGE_SIZE = 32
NUM_QUERIES = 4
TINY_QFORMER = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, num_query_tokens=4, embed_dim=16,
                    cross_attention_freq=1, init_from=None, tokenizer="minilm", max_text_len=24)
WORDS = "a photo of cat dog the is on mat what color red blue question answer short system user assistant you are".split()
NUMBERED = [f"w{i}" for i in range(40)]
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nyou are a cat<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# each family's special tokens (first in the vocabulary, in this order) and their roles
FAMILY_SPECIALS = {
    "llama": (["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"],
              dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>")),  # a ChatML model (SmolLM2)
    "opt": (["<pad>", "</s>", "<unk>"], dict(bos_token="</s>", eos_token="</s>", pad_token="<pad>")),
    "t5": (["<pad>", "</s>", "<unk>"], dict(eos_token="</s>", pad_token="<pad>")),
}


def word_tokenizer(specials: list[str], words: list[str], post: str | None = None, chat_template: str | None = None,
                   **named) -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: ``specials`` then ``words`` (ids in that order), the special-token roles
    in ``named`` (bos_token=..., eos_token=...), ``post`` a template of what it adds itself (e.g. "<s> $A"), and an
    optional chat template. Decoding joins words with spaces."""
    vocab = {token: index for index, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if post is not None:
        added = [token for token in post.split() if token.startswith("<")]
        backend.post_processor = processors.TemplateProcessing(single=post, special_tokens=[(t, vocab[t]) for t in added])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **named)
    tokenizer.chat_template = chat_template
    return tokenizer


def real_like_tokenizer(family: str) -> transformers.PreTrainedTokenizerFast:
    """Over WORDS, the special tokens each family's real tokenizer has, and the ones it adds itself: OPT's GPT-2
    tokenizer prepends </s> (its BOS); Llama's prepends <s> and has no pad token; T5's appends </s> and has no BOS."""
    specials, named, post = {
        "opt": (["<pad>", "</s>", "<unk>"], dict(bos_token="</s>", eos_token="</s>", pad_token="<pad>"), "</s> $A"),
        "llama": (["<unk>", "<s>", "</s>"], dict(bos_token="<s>", eos_token="</s>"), "<s> $A"),
        "t5": (["<pad>", "</s>", "<unk>"], dict(eos_token="</s>", pad_token="<pad>"), "$A </s>"),
    }[family]
    return word_tokenizer(specials, WORDS, post=post, **named)


def family_tokenizer(family: str) -> transformers.PreTrainedTokenizerFast:
    """Each family's special tokens over WORDS, w0..w39 and punctuation; "llama" is a ChatML chat model."""
    specials, named = FAMILY_SPECIALS[family]
    return word_tokenizer(specials, WORDS + NUMBERED + [":", "?", "."], chat_template=CHATML if family == "llama" else None,
                          **named)


def text_model(family: str, tokenizer, max_positions: int = 256, **overrides) -> transformers.PreTrainedModel:
    """A 2-layer, width-32 random LM of ``family`` ("llama", "opt", "t5") sized to ``tokenizer``."""
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if family == "llama":
        config = transformers.LlamaConfig(**{
            "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": max_positions,
            "tie_word_embeddings": False, "bos_token_id": tokenizer.bos_token_id, **ids, **overrides})
        return transformers.LlamaForCausalLM(config)
    if family == "opt":
        config = transformers.OPTConfig(**{
            "vocab_size": len(tokenizer), "hidden_size": 32, "word_embed_proj_dim": 32, "ffn_dim": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": max_positions,
            "bos_token_id": tokenizer.bos_token_id, **ids, **overrides})
        return transformers.OPTForCausalLM(config)
    config = transformers.T5Config(**{
        "vocab_size": len(tokenizer), "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
        "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
        "decoder_start_token_id": tokenizer.pad_token_id, **ids, **overrides})
    return transformers.T5ForConditionalGeneration(config)


def vision_config() -> transformers.Blip2VisionConfig:
    return transformers.Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=8)


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


@functools.cache
def qformer_tokenizer():
    return load_tokenizer("minilm")


def tiny_pipeline(family: str | None = "llama", seed: int = 0, bos_before_image: bool = False,
                  prompt_to_qformer: bool = False, visual_prompt_per_turn: bool = False) -> Blip2Pipeline:
    """An eval-mode pipeline whose every part is random: a Blip2VisionModel, a Q-Former with the MiniLM tokenizer
    and a Llama (ChatML chat template), OPT or T5 LLM (``family`` None: a stage-1 model)."""
    torch.manual_seed(seed)
    vision = randomize_(transformers.Blip2VisionModel(vision_config()), seed)
    llm = None
    if family is not None:
        tokenizer = family_tokenizer(family)
        llm = llm_from_hf(randomize_(text_model(family, tokenizer), seed + 1), tokenizer)
    cfg = Blip2Config(
        vision=VisionConfig(kind="hf", path="in-memory"),
        qformer=QFormerConfig(
            hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=64,
            num_query_tokens=NUM_QUERIES, embed_dim=16, encoder_width=32, cross_attention_freq=1, init_from=None,
        ),  # fmt: skip
        llm=LLMConfig(kind="hf", path="in-memory", bos_before_image=bos_before_image,
                      prompt_to_qformer=prompt_to_qformer or visual_prompt_per_turn,
                      visual_prompt_per_turn=visual_prompt_per_turn) if family else None,
    )
    parts = assemble(cfg, image_encoder_from_hf(vision), qformer_tokenizer(), llm)
    model = parts.model
    trainable = [model.qformer, model.vision_norm, model.vision_proj, model.text_proj, model.itm_head, model.llm_proj]
    for offset, part in enumerate(p for p in trainable if p is not None):
        randomize_(part, seed + 2 + offset)
    model.eval()
    return Blip2Pipeline.from_parts(parts)


def tiny_recipe(tmp_path, vision_dir, llm_dir, stage: int, root, **train) -> dict:
    """A recipe (as its YAML mapping) training ``stage`` on tiny saved parts and the shapes split folder ``root``."""
    llm = {"kind": "hf", "path": str(llm_dir), "max_text_len": 32} if stage == 2 else None
    return {
        "stage": stage,
        "model": {"vision": {"kind": "hf", "path": str(vision_dir)}, "qformer": TINY_QFORMER, "llm": llm},
        "data": {"captions": [str(root / "train")], "vqa": [str(root / "train")] if stage == 2 else [],
                 "feature_cache": str(root / "features")},
        "train": {"steps": 2, "batch_size": 8, "lr": 1e-3, "log_every": 1, "out_dir": str(tmp_path / f"run{stage}"), **train},
    }
