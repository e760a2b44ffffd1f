"""The offline demo's configuration as its recipes say it today (the benchmarks follow them when they change)."""

from __future__ import annotations

import functools

import torch

from blip2.config import VisionConfig
from blip2.demo.run import RECIPES
from blip2.train.recipe import Recipe
from blip2.weights.encoders import build_image_encoder

RECIPE_FILES = {1: "shapes_stage1.yaml", 2: "shapes_stage2.yaml"}


def recipe(stage: int, overrides: list[str] | None = None) -> Recipe:
    """The demo's shapes_stage{stage}.yaml with ``overrides`` ("train.batch_size=8", ...); stage 2 without its
    stage-1 ``init`` unless an override names one (no stage-1 run is at hand)."""
    return Recipe.load(RECIPES / RECIPE_FILES[stage], (["init=null"] if stage == 2 else []) + (overrides or []))


@functools.cache
def image_tokens() -> tuple[int, int]:
    """(tokens, width) of the default encoder's features for one image at its own input size."""
    encoder, preprocess = build_image_encoder(VisionConfig())
    with torch.no_grad():
        features = encoder(torch.zeros(1, 3, *preprocess.size))  # [1, N, D]
    return features.shape[1], features.shape[2]
