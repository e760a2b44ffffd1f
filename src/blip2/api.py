"""Building and loading models: ``blip2.load(source)`` is the one entry point."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from blip2.config import PRESETS, Blip2Config, preset
from blip2.models.blip2 import Blip2Model
from blip2.models.language import build_llm
from blip2.models.vision import build_image_encoder
from blip2.weights.bert import init_qformer_from_bert, load_tokenizer
from blip2.weights.hf import load_hf
from blip2.weights.lavis import load_lavis
from blip2.weights.checkpoint import CONFIG_NAME, WEIGHTS_NAME, is_checkpoint, load_trainable


def build_model(cfg: Blip2Config, init_qformer: bool = True, seed: int = 0) -> Blip2Model:
    """Build the frozen parts named by ``cfg`` and a fresh (BERT-initialised unless told not to) Q-Former.

    The random initialisation draws from ``seed`` (without touching the global RNG), so an untrained model is
    the same in every process."""
    vision = build_image_encoder(cfg.vision)
    cfg = dataclasses.replace(cfg, qformer=dataclasses.replace(cfg.qformer, encoder_width=vision.out_dim))
    llm = build_llm(cfg.llm) if cfg.llm is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2Model(cfg, vision, load_tokenizer(cfg.qformer.tokenizer), llm)
    if init_qformer and cfg.qformer.init_from:
        init_qformer_from_bert(model.qformer, cfg.qformer.init_from)
    return model


def load_checkpoint(directory: str | Path) -> Blip2Model:
    """A directory saved by ``model.save``: its config names the frozen parts; its weights hold what trains."""
    directory = Path(directory)
    model = build_model(Blip2Config.load(directory / CONFIG_NAME), init_qformer=False)
    load_trainable(model, directory / WEIGHTS_NAME)
    return model


def _is_hf_blip2(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "blip-2"


def load(source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **parts) -> Blip2Model:
    """Load a model from a preset name, a directory saved here, a transformers Blip2 directory or a LAVIS ``.pth``.

    ``dtype`` applies to the frozen encoder and LLM; the Q-Former and heads stay fp32 (as in BLIP-2).
    A LAVIS ``.pth`` holds no frozen parts: name them in ``parts`` (see ``blip2.weights.lavis.load_lavis``).
    """
    if isinstance(source, str) and source in PRESETS:
        model = build_model(preset(source))
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(
                f"{source!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing file or directory"
            )
        if path.is_dir() and is_checkpoint(path):
            model = load_checkpoint(path)
        elif path.is_dir() and _is_hf_blip2(path):
            model = load_hf(path)
        elif path.is_file() and path.suffix in (".pth", ".pt", ".bin"):
            model = load_lavis(path, **parts)
        else:
            raise ValueError(
                f"{path} is not a model this project can load: expected a directory with {CONFIG_NAME} (saved by "
                "blip2), a transformers Blip2 directory (config.json with model_type 'blip-2'), or a LAVIS .pth file"
            )
    model.to(device)
    if dtype is not None:
        for frozen in model.frozen_modules():
            frozen.to(dtype)
    return model.eval()
