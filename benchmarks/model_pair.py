"""The model pair that the captioning and chat benchmarks compare: ours, and its transformers export.

Ours is assembled in memory from a random ``Blip2VisionModel`` (transformers' Blip2 holds no other vision
tower), the demo's Q-Former (recipes/shapes_stage2.yaml, MiniLM-initialised as stage 1 starts it) and
SmolLM2-135M-Instruct; ``model.export_hf`` writes it as a ``Blip2ForConditionalGeneration`` directory, which
transformers loads back. Both sides then hold the same weights. ``quick`` swaps in a tiny random Llama
(SmolLM2's tokenizer and chat template kept) and a tiny vision tower, for the smoke test.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import demo
import torch
import transformers
from PIL import Image

from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2.data.text import LLMTokenizer
from blip2.demo.shapes import ShapesConfig, make_scene, render
from blip2.factory import assemble
from blip2.models.language import FrozenLLM
from blip2.pipeline import Blip2Pipeline
from blip2.weights.bert import init_qformer_from_bert, load_tokenizer
from blip2.weights.encoders import image_encoder_from_hf
from blip2.weights.gguf import smollm2_dir
from blip2.weights.llms import build_llm, llm_from_hf

# a ViT-S/16-wide tower cut to 4 layers (2.9 GFLOP per 224 px image): the image costs something, as it does in
# BLIP-2, without dominating a CPU run (BLIP-2's EVA ViT-g costs ~500 GFLOP)
VISION = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6, image_size=224,
              patch_size=16)  # fmt: skip
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8)  # fmt: skip
TINY_QFORMER = QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, num_query_tokens=4,
                             init_from=None)  # fmt: skip
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)  # fmt: skip


def _llm(quick: bool) -> tuple[FrozenLLM, LLMTokenizer]:
    if not quick:
        return build_llm(LLMConfig(kind="smollm2"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir(), local_files_only=True)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TINY_LLAMA,
    )  # fmt: skip
    return llm_from_hf(transformers.LlamaForCausalLM(config), tokenizer)


def ours(quick: bool, seed: int = 0) -> Blip2Pipeline:
    """Our model: random vision tower, the demo's Q-Former (MiniLM init; tiny and random when ``quick``), an LLM."""
    torch.manual_seed(seed)
    vision = transformers.Blip2VisionModel(transformers.Blip2VisionConfig(**(TINY_VISION if quick else VISION)))
    qformer = TINY_QFORMER if quick else dataclasses.replace(demo.recipe(2).model.qformer, init_from="minilm")
    llm = _llm(quick)
    cfg = Blip2Config(
        vision=VisionConfig(kind="hf", path="in-memory"),
        qformer=dataclasses.replace(qformer, encoder_width=vision.config.hidden_size),
        llm=LLMConfig(kind="hf", path="in-memory"),
    )
    parts = assemble(cfg, image_encoder_from_hf(vision), load_tokenizer(cfg.qformer.tokenizer), llm)
    if cfg.qformer.init_from:
        init_qformer_from_bert(parts.model.qformer, cfg.qformer.init_from)
    parts.model.eval()
    return Blip2Pipeline.from_parts(parts)


def pair(workdir: Path, quick: bool) -> tuple[Blip2Pipeline, transformers.Blip2ForConditionalGeneration]:
    """(ours, transformers' model loaded from ``ours.export_hf``): the same weights on both sides."""
    model = ours(quick)
    directory = model.export_hf(Path(workdir) / "blip2-hf")
    hf_model = transformers.Blip2ForConditionalGeneration.from_pretrained(directory, local_files_only=True)
    return model, hf_model.eval()


def scene_images(count: int, size: int = 224) -> list[Image.Image]:
    """Shapes-world pictures (coloured shapes on a background), all different."""
    cfg = ShapesConfig(image_size=size)
    return [render(make_scene("val", index, cfg), cfg) for index in range(count)]
