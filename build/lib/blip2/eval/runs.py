"""Running a model over a dataset: batches of images (or cached features), generation from features.

Shared by the evaluation runners (``eval/run_*.py``) and CapFilt (``eval/capfilt.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from blip2.data.bad_images import BadImageCounter, collate_skip_bad
from blip2.data.datasets import CaptionDataset, VQADataset, open_dataset
from blip2.data.feature_cache import FeatureCache, encoder_identity
from blip2.data.records import DatasetFormatError
from blip2.errors import InputError
from blip2.infer.decoding import GenerationOptions
from blip2.infer.generation import generate_from_features
from blip2.infer.qformer_generation import qformer_generate
from blip2.models.blip2 import Blip2Model

if TYPE_CHECKING:
    from blip2.pipeline import Blip2Pipeline

FeaturesArg = FeatureCache | str | Path | None


@contextlib.contextmanager
def eval_mode(model: Blip2Model) -> Iterator[None]:
    """Dropout off while evaluating; the model's train/eval state is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def resolve_features(pipe: "Blip2Pipeline", features: FeaturesArg) -> FeatureCache | None:
    """A feature cache folder (checked against the model's encoder and preprocessing) or an open cache, or None."""
    if features is None or isinstance(features, FeatureCache):
        return features
    return FeatureCache(features, expect=encoder_identity(pipe.cfg.vision, pipe.preprocess, pipe.model.vision))


def open_eval_dataset(
    pipe: "Blip2Pipeline", data: str | Path, task: str, cache: FeatureCache | None,
    image_root: str | Path | None = None, annotations: str | Path | None = None,
) -> CaptionDataset | VQADataset:
    """``data`` opened for ``task`` with the encoder's eval preprocessing (or the cached features) as transform."""
    transform = cache if cache is not None else pipe.preprocess.eval_transform()
    dataset = open_dataset(data, transform=transform, task=task, image_root=image_root, annotations=annotations)
    if not isinstance(dataset, (CaptionDataset, VQADataset)):
        raise DatasetFormatError(
            f"{data}: evaluation needs a dataset with a known length (a manifest, COCO/VQAv2 JSON or a shapes split "
            "folder), not streamed tar shards"
        )
    return dataset


def batches(dataset, limit: int | None, batch_size: int, desc: str, progress: bool, counter: BadImageCounter):
    """The first ``limit`` items (all: None) in collated batches, bad images dropped and counted by ``counter``."""
    if limit is not None and limit < 1:
        raise InputError(f"limit must be a positive number of items (or None for all), got {limit}")
    items = Subset(dataset, range(min(limit, len(dataset)))) if limit is not None else dataset
    loader = DataLoader(items, batch_size=batch_size, collate_fn=collate_skip_bad)
    return counter.track(tqdm(loader, desc=desc, unit="batch", disable=not progress))


def batch_features(model: Blip2Model, batch: dict[str, Any], cached: bool) -> Tensor:
    """Frozen features [B, N, D] on the model's device for a collated batch: its pixels [B, 3, H, W] run through
    the encoder (each distinct image id once), or its cached features [B, N, D] as they are."""
    images = batch["image"]
    if cached:
        return images.to(model.device)
    first_row: dict[str, int] = {}  # image id -> the first batch row that holds it
    for row, image_id in enumerate(batch["image_id"]):
        first_row.setdefault(image_id, row)
    slot = {image_id: index for index, image_id in enumerate(first_row)}
    features = model.image_features(images[list(first_row.values())].to(model.device))  # [U, N, D]
    return features[torch.tensor([slot[image_id] for image_id in batch["image_id"]], device=features.device)]  # [B, N, D]


def texts_from_features(
    pipe: "Blip2Pipeline", features: Tensor, prompts: Sequence[str] | None, options: GenerationOptions
) -> list[str]:
    """One generated text per row of ``features`` [B, N, D]: through the LLM after a prompt per row (None: no
    prompt; the text is what follows the prompt), or, for a stage-1 model, from the Q-Former's captioning head."""
    if pipe.model.llm is None:
        if prompts is not None and any(prompts):
            raise InputError("a stage-1 model captions with its Q-Former, which takes no prompt: drop the prompt "
                             "or use a stage-2 model")
        return qformer_generate(pipe, features, options)
    return generate_from_features(pipe, features, list(prompts) if prompts is not None else [""] * len(features), options)


def official_id(value: str) -> int | str:
    """COCO/VQAv2 result files use integer ids: "391895" -> 391895; other ids stay strings."""
    return int(value) if value.isdigit() else value
