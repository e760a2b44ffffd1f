"""Building and loading models: every way a model comes into being goes through here.

``build(cfg)`` makes the frozen parts a config names and a fresh (BERT-initialised) Q-Former; ``load_parts(source)``
reads a preset name, a directory saved by this project, a transformers Blip2 directory or a LAVIS ``.pth``. Both
return ``Parts``: the pure network and what turns user input into its tensors (tokenizers, preprocessing), which
``blip2.pipeline`` wraps for users, and the trainer and the converters use directly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from blip2.config import PRESETS, Blip2Config, LLMConfig, VisionConfig, preset
from blip2.data.preprocess import Preprocess
from blip2.data.text import LLMTokenizer
from blip2.errors import InputError
from blip2.models.blip2 import Blip2Model
from blip2.models.language import FrozenLLM
from blip2.models.vision import ImageEncoder
from blip2.weights import hf, lavis
from blip2.weights.bert import init_qformer_from_bert, load_tokenizer
from blip2.weights.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    is_checkpoint,
    load_trainable,
)
from blip2.weights.encoders import (
    build_image_encoder,
    hf_preprocess,
    image_encoder_from_hf,
)
from blip2.weights.llms import build_llm, llm_from_hf


class Parts(NamedTuple):
    """A model and what feeds it: the Q-Former's BERT tokenizer (with [DEC]), the LLM's tokenizer (None for a
    stage-1 model) and the image encoder's preprocessing."""

    model: Blip2Model
    qformer_tokenizer: PreTrainedTokenizerBase
    llm_tokenizer: LLMTokenizer | None
    preprocess: Preprocess


def assemble(
    cfg: Blip2Config,
    vision: tuple[ImageEncoder, Preprocess],
    qformer_tokenizer: PreTrainedTokenizerBase,
    llm: tuple[FrozenLLM, LLMTokenizer] | None = None,
    seed: int = 0,
) -> Parts:
    """Parts from built frozen parts; the trainable ones are drawn from ``seed`` (without touching the global RNG),
    so an untrained model is the same in every process. ``cfg.qformer.encoder_width`` follows the encoder."""
    encoder, preprocess = vision
    cfg = dataclasses.replace(cfg, qformer=dataclasses.replace(cfg.qformer, encoder_width=encoder.out_dim))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2Model(cfg, encoder, qformer_tokenizer.bos_token_id, llm[0] if llm else None)
    return Parts(model, qformer_tokenizer, llm[1] if llm else None, preprocess)


def build(cfg: Blip2Config, init_qformer: bool = True, seed: int = 0) -> Parts:
    """The frozen parts ``cfg`` names and a fresh Q-Former, BERT-initialised from ``cfg.qformer.init_from``
    unless ``init_qformer`` is False."""
    llm = build_llm(cfg.llm) if cfg.llm is not None else None
    parts = assemble(cfg, build_image_encoder(cfg.vision), load_tokenizer(cfg.qformer.tokenizer), llm, seed)
    if init_qformer and cfg.qformer.init_from:
        init_qformer_from_bert(parts.model.qformer, cfg.qformer.init_from)
    return parts


def load_checkpoint(directory: str | Path) -> Parts:
    """A directory saved by this project: its config names the frozen parts; its weights hold what trains."""
    directory = Path(directory)
    parts = build(Blip2Config.load(directory / CONFIG_NAME), init_qformer=False)
    load_trainable(parts.model, directory / WEIGHTS_NAME)
    return parts


def load_hf(path: str | Path) -> Parts:
    """A transformers Blip2 directory. Blip2ForConditionalGeneration (OPT-style or Flan-T5-style text config) gives
    a stage-2 model; Blip2ForImageTextRetrieval a stage-1 model. The vision encoder and LLM are the transformers
    modules themselves (no copy); the Q-Former and heads are copied through ``hf.hf_key_map``."""
    path = Path(path)
    hf_model, retrieval = hf.read_hf(path)
    qformer_tokenizer = hf.qformer_tokenizer_name(path, retrieval)
    tokenizer = load_tokenizer(qformer_tokenizer)
    cfg = hf.config_from_hf(hf_model, path, retrieval, tokenizer, qformer_tokenizer)
    llm = None if retrieval else llm_from_hf(
        hf_model.language_model, AutoTokenizer.from_pretrained(path, local_files_only=True), cfg.llm.tokenizer_specials
    )
    vision = image_encoder_from_hf(hf_model.vision_model, hf_preprocess(cfg.vision, hf_model.vision_model))
    parts = assemble(cfg, vision, tokenizer, llm)
    hf.load_trainable_from_hf(parts.model, hf_model, path)
    return parts


def load_lavis(
    path: str | Path,
    vision: VisionConfig | dict | None = None,
    llm: LLMConfig | dict | None = None,
    qformer_heads: int = lavis.BERT_BASE_HEADS,
    tokenizer: str = "minilm",
) -> Parts:
    """A LAVIS BLIP-2 ``.pth``; the frozen parts come from the named ``vision`` and ``llm`` (see
    ``blip2.weights.lavis.lavis_config``): the official checkpoints take ``vision=VisionConfig(kind="hf", path=<a
    Blip2 directory>)`` (EVA ViT-g) and, for stage 2, ``llm=LLMConfig(kind="hf", path=...)``."""
    path = Path(path)
    state = lavis.read_lavis(path)
    cfg = lavis.lavis_config(state, path, vision, llm, qformer_heads, tokenizer, len(load_tokenizer(tokenizer)))
    parts = build(cfg, init_qformer=False)
    lavis.load_lavis_state(parts.model, state, path)
    return parts


def _is_hf_blip2(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "blip-2"


def load_parts(source: str | Path, **parts) -> Parts:
    """Parts from a preset name, a directory saved here, a transformers Blip2 directory or a LAVIS ``.pth`` (whose
    frozen parts ``parts`` names: ``load_lavis``'s keyword arguments)."""
    if isinstance(source, str) and source in PRESETS:
        return build(preset(source))
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"{source!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing file or directory"
        )
    if path.is_dir() and is_checkpoint(path):
        return load_checkpoint(path)
    if path.is_dir() and _is_hf_blip2(path):
        return load_hf(path)
    if path.is_file() and path.suffix in (".pth", ".pt", ".bin"):
        return load_lavis(path, **parts)
    raise InputError(
        f"{path} is not a model this project can load: expected a directory with {CONFIG_NAME} (saved by "
        "blip2), a transformers Blip2 directory (config.json with model_type 'blip-2'), or a LAVIS .pth file"
    )
