"""Training and evaluation datasets over the records of ``blip2.data.records`` and the shards of
``blip2.data.shards``: ``open_dataset`` opens any supported file, folder or shard pattern for captions or VQA.

An item's "image" is the image through ``transform`` (PIL -> pixels), or its cached frozen features when the
transform is a ``FeatureCache``; an unreadable image is a ``BadImage`` (``blip2.data.bad_images``).
"""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from blip2.data.bad_images import BadImage, Transform, load_or_bad
from blip2.data.records import (
    CAPTION,
    CHAT,
    VQA,
    CaptionRecord,
    ChatRecord,
    VQARecord,
    check_task,
    detect_kind,
    read_records,
    repeat_question_types,
    resolve_folder,
)
from blip2.data.shards import ShardDataset, expand_shards
from blip2.errors import InputError

logger = logging.getLogger(__name__)

def _record_image(record: CaptionRecord | VQARecord, transform: Transform | None) -> Any:
    """The record's image through ``transform``, or its cached frozen features when ``transform`` is a feature cache
    (``blip2.data.feature_cache.FeatureCache``: it looks features up by the record's image id)."""
    if hasattr(transform, "features_for"):
        return transform.features_for(record)
    return load_or_bad(record.image, transform)


class CaptionDataset(Dataset):
    """Map-style image-caption dataset. Items: {"image", "text", "image_id"}.

    ``transform`` may be a ``FeatureCache``: then "image" holds the image's cached frozen features [N, D].

    ``train``: each epoch draws ``captions_per_image`` distinct captions of every image (all of them when it
    has fewer; deterministic in seed, epoch and image; call ``set_epoch`` like ``DistributedSampler.set_epoch``),
    so an epoch holds ``images x captions_per_image`` items; images without captions are dropped. One per image
    (the default) keeps an image from meeting itself as an ITC negative; more weighs captions up in a mix.
    Otherwise (evaluation) one item per image with its first caption ("" when there is none).
    """

    def __init__(
        self, records: list[CaptionRecord], transform: Transform | None = None, train: bool = False, seed: int = 0,
        captions_per_image: int = 1,
    ):
        if captions_per_image < 1:
            raise InputError(f"captions_per_image must be >= 1, got {captions_per_image}")
        self.records = [r for r in records if r.captions] if train else list(records)
        if train and len(self.records) < len(records):
            logger.info("dropped %d images without captions from training", len(records) - len(self.records))
        self.transform = transform
        self.train = train
        self.seed = seed
        self.per_image = captions_per_image if train else 1
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records) * self.per_image

    def __getitem__(self, index: int) -> dict[str, Any] | BadImage:
        position, slot = divmod(index, self.per_image)
        record = self.records[position]
        image = _record_image(record, self.transform)
        if isinstance(image, BadImage):
            return image
        return {"image": image, "text": self._caption(position, slot, record), "image_id": record.image_id}

    def _caption(self, position: int, slot: int, record: CaptionRecord) -> str:
        if not record.captions:
            return ""
        if not self.train:
            return record.captions[0]
        order = random.Random(f"{self.seed}/{self.epoch}/{position}").sample(record.captions, len(record.captions))
        return order[slot % len(order)]


class _RecordDataset(Dataset):
    """Map-style dataset of one item per record (its image loaded by ``_record_image``); nothing varies per epoch."""

    def __init__(self, records: list, transform: Transform | None = None):
        self.records = list(records)
        self.transform = transform

    def set_epoch(self, epoch: int) -> None:
        """Present so every dataset here takes ``set_epoch``."""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | BadImage:
        record = self.records[index]
        image = _record_image(record, self.transform)
        return image if isinstance(image, BadImage) else {"image": image, **self.fields(record)}

    def fields(self, record) -> dict[str, Any]:
        raise NotImplementedError


class ChatDataset(_RecordDataset):
    """Conversations about images. Items: {"image", "image_id", "messages"}."""

    def fields(self, record: ChatRecord) -> dict[str, Any]:
        return {"image_id": record.image_id, "messages": [dict(m) for m in record.messages]}


class VQADataset(_RecordDataset):
    """VQA questions. Items: {"image", "question", "answers", "image_id", "question_id"}.

    ``transform`` may be a ``FeatureCache``, as for ``CaptionDataset``.
    """

    def fields(self, record: VQARecord) -> dict[str, Any]:
        return {"question": record.question, "answers": list(record.answers), "image_id": record.image_id,
                "question_id": record.question_id}


def open_dataset(
    path_or_spec: str | Path,
    kind: str | None = None,
    transform: Transform | None = None,
    task: str = CAPTION,
    *,
    train: bool = False,
    image_root: str | Path | None = None,
    annotations: str | Path | None = None,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    captions_per_image: int = 1,
    caption_index: int | None = None,
    question_type_repeats: dict[str, int] | None = None,
) -> CaptionDataset | VQADataset | ShardDataset:
    """Open any supported dataset for ``task`` ("caption" or "vqa").

    ``kind`` defaults to ``detect_kind``; ``transform`` maps a PIL image to the encoder's input
    tensor (None keeps PIL images); ``image_root`` is where relative image paths start (default:
    the file's folder); ``annotations`` is the VQAv2 annotations file for a VQAv2 questions file;
    ``captions_per_image`` is how many of an image's captions a training epoch uses (``CaptionDataset``;
    WebDataset samples hold one caption each); ``caption_index`` keeps only that caption of every image (e.g. the
    paraphrase form retrieval is asked in); ``question_type_repeats`` ({type: n}) repeats every question of a type n
    times (``repeat_question_types``). Use the result with ``collate_skip_bad`` and a ``BadImageCounter``.
    """
    check_task(task)
    spec = resolve_folder(path_or_spec, task)
    kind = kind or detect_kind(spec)
    if caption_index is not None and (task != CAPTION or kind == "webdataset"):
        raise InputError(f"caption_index picks one of several captions per image: a {kind} {task} dataset has none "
                         "to pick from; leave caption_index unset")
    if question_type_repeats and (task != VQA or kind == "webdataset"):
        raise InputError(f"question_type_repeats weighs question types of a VQA dataset; a {kind} {task} dataset "
                         "has no question types to weigh; leave question_type_repeats unset")
    if kind == "webdataset":
        if task == CHAT:
            raise InputError("conversations are read from JSON or JSONL files, not from tar shards")
        return ShardDataset(expand_shards(spec), transform, task, train=train, seed=seed, shuffle_buffer=shuffle_buffer)
    records = read_records(spec, kind, task, image_root=image_root, annotations=annotations)
    if task == CAPTION:
        if caption_index is not None:
            records = [replace(r, captions=r.captions_at(caption_index)) for r in records]
        return CaptionDataset(records, transform, train=train, seed=seed, captions_per_image=captions_per_image)
    if task == CHAT:
        return ChatDataset(records, transform)
    if question_type_repeats:
        records = repeat_question_types(records, question_type_repeats, str(spec))
    return VQADataset(records, transform)
