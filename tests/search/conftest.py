"""Tiny saved stage-1 models (loadable by ``blip2.load(DIR)``, so the real CLI can use them) and small image
collections for the search tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from blip2.config import Blip2Config, QFormerConfig, VisionConfig
from blip2.factory import build
from blip2.weights.checkpoint import save_checkpoint

NUM_QUERIES = 4


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """normal(0, 0.1) weights, norm scales around 1 (transformers' init nearly zeroes the tiny ViT)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            is_norm = "norm" in type(sub).__name__.lower()
            for name, p in sub.named_parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1 + (1 if is_norm and name == "weight" else 0))
    return module


def save_tiny_model(folder: Path, seed: int = 0, embed_dim: int = 16) -> Path:
    """A random stage-1 model (tiny ViT, 2-layer Q-Former with the MiniLM tokenizer) saved by blip2 -> its folder."""
    vision = _randomize(transformers.Blip2VisionModel(transformers.Blip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
    )), seed)  # fmt: skip
    vision_dir = folder / f"vision-{seed}"
    vision.save_pretrained(vision_dir)
    cfg = Blip2Config(
        vision=VisionConfig(kind="hf", path=str(vision_dir)),
        qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                              max_position_embeddings=64, num_query_tokens=NUM_QUERIES, embed_dim=embed_dim,
                              cross_attention_freq=1, init_from=None),
        llm=None,
    )
    model = build(cfg, init_qformer=False).model
    for offset, part in enumerate([model.qformer, model.vision_norm, model.vision_proj, model.text_proj, model.itm_head]):
        _randomize(part, seed + 10 + offset)
    return save_checkpoint(model, folder / f"model-{seed}-{embed_dim}")


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Three tiny saved models: "a", "b" (same shapes, other weights) and "narrow" (8-dim embeddings)."""
    folder = tmp_path_factory.mktemp("models")
    return {"a": save_tiny_model(folder, 0), "b": save_tiny_model(folder, 1), "narrow": save_tiny_model(folder, 2, 8)}


def make_picture(seed: int, size: tuple[int, int] = (24, 20)) -> Image.Image:
    """A random image: coloured blocks, so that images differ in more than noise."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.NEAREST)


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def photos(tmp_path) -> Path:
    """A folder of 12 distinct images (two in a subfolder, three with a caption beside them), one exact duplicate
    (dup.png = 03.png) and a text file."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i in range(12):
        path = root / ("sub" if i >= 10 else "") / f"{i:02d}.png"
        make_picture(i, (20 + i, 30 - i)).save(path)
        if i < 3:
            path.with_suffix(".txt").write_text(f"w{i} caption")
    (root / "dup.png").write_bytes((root / "03.png").read_bytes())
    (root / "notes.md").write_text("not an image")
    return root


@pytest.fixture
def picture():
    """``picture(seed, size=(24, 20))`` -> a random image of coloured blocks."""
    return make_picture


@pytest.fixture
def shard():
    """``shard(path, seeds)`` -> a WebDataset tar at ``path``: KEY.png (``picture(100 + seed)``) + KEY.txt ("wSEED")."""
    return write_shard


def write_shard(path: Path, seeds: list[int]) -> Path:
    with tarfile.open(path, "w") as tar:
        for seed in seeds:
            for name, data in ((f"{seed:06d}.png", png_bytes(make_picture(100 + seed))), (f"{seed:06d}.txt", f"w{seed}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path
