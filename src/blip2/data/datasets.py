"""Training and evaluation datasets over image-text data in the formats people already have.

Formats (``kind``), detected from the file by ``open_dataset``:

- ``jsonl``: the project's manifest, one {"image": path, "captions": [...]} (or "caption": "...") per
  line; for VQA one {"image", "question", "answers"} per line (optional "question_id", "question_type").
- ``csv``: columns ``image`` and ``caption``; several rows may share an image.
- ``json``: a list of the same objects (Karpathy-style COCO splits, VQA-style lists).
- ``coco``: the official COCO caption layout {"images": [...], "annotations": [...]}.
- ``vqav2``: the official VQAv2 questions file, with its annotations file passed as ``annotations``.
- ``webdataset``: tar shards in the img2dataset layout ({key}.jpg + {key}.txt (+ {key}.json)),
  streamed and split across distributed ranks and DataLoader workers.

Relative image paths resolve against ``image_root`` (default: the manifest's folder). URLs are refused.

An image that cannot be read does not crash the run: the dataset yields a ``BadImage`` in its place,
``collate_skip_bad`` drops it from the batch (recording it under "bad_images"), and a
``BadImageCounter`` in the main process counts them and stops the run past ``max_bad_images``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import posixpath
import random
import tarfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from blip2.data.feature_cache import FeatureCache
from blip2.data.images import ImageError, is_url, load_image

logger = logging.getLogger(__name__)

CAPTION, VQA = "caption", "vqa"
TASKS = (CAPTION, VQA)
KINDS = ("jsonl", "csv", "json", "coco", "vqav2", "webdataset")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
VQAV2_IMAGE_TEMPLATE = "COCO_{subtype}_{image_id:012d}.jpg"  # the COCO file naming VQAv2 refers to
MANIFEST_IN_FOLDER = {CAPTION: "captions.jsonl", VQA: "vqa.json"}  # what a shapes-world split folder holds
WARN_FIRST_BAD = 10  # log this many bad images individually, then count silently

Transform = Callable[[Image.Image], Any]


class DatasetFormatError(ValueError):
    """A dataset file is missing, malformed or does not match the requested task."""


@dataclass(frozen=True)
class CaptionRecord:
    image: str
    captions: tuple[str, ...]
    image_id: str

    def captions_at(self, index: int | None) -> tuple[str, ...]:
        """Every caption (``index`` None) or only caption ``index`` (negative counts from the end)."""
        if index is None:
            return self.captions
        if not -len(self.captions) <= index < len(self.captions):
            raise DatasetFormatError(f"image {self.image_id!r} has {len(self.captions)} captions, so "
                                     f"caption_index={index} does not exist; pick a smaller index or None (all)")
        return (self.captions[index],)


@dataclass(frozen=True)
class VQARecord:
    image: str
    question: str
    answers: tuple[str, ...]
    image_id: str
    question_id: str
    question_type: str | None = None  # e.g. "color" (shapes) or "what color is the" (VQAv2); None when unlabelled


class BadImage(NamedTuple):
    """Stands in for an item whose image could not be used; ``collate_skip_bad`` drops and records it."""

    source: str
    reason: str


# --------------------------------------------------------------------------------------- readers


def _image_path(value: Any, base: Path, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DatasetFormatError(f"{where}: 'image' must be a non-empty path string, got {value!r}")
    if is_url(value):
        raise DatasetFormatError(
            f"{where}: image {value!r} is a URL; remote fetching is disabled in blip2. Download the images "
            "first (e.g. with img2dataset into tar shards) and point the dataset at the local files"
        )
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def _caption_list(obj: dict, where: str) -> list[str]:
    value = obj.get("captions", obj.get("caption"))
    if value is None:
        raise DatasetFormatError(
            f"{where}: no 'captions' or 'caption' key (keys: {sorted(obj)}); "
            "for question/answer data open the dataset with task='vqa'"
        )
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise DatasetFormatError(f"{where}: captions must be a string or a list of strings, got {value!r}")
    return texts


def _answer_list(obj: dict, where: str) -> list[str]:
    """'answers' as strings or VQAv2 {"answer": ...} dicts, or a single 'answer'; none is allowed (inference)."""
    if "answers" in obj:
        answers = obj["answers"]
        if not isinstance(answers, list):
            raise DatasetFormatError(f"{where}: 'answers' must be a list, got {answers!r}")
        if any(isinstance(a, dict) and "answer" not in a for a in answers):
            raise DatasetFormatError(f"{where}: an entry of 'answers' is a dict without an 'answer' key")
        return [str(a["answer"]) if isinstance(a, dict) else str(a) for a in answers]
    if "answer" in obj:
        return [str(obj["answer"])]
    return []


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def check_question_type_repeats(repeats: dict) -> None:
    """Raise ValueError unless ``repeats`` maps question-type names to whole numbers >= 1."""
    for kind, times in repeats.items():
        if not isinstance(kind, str):
            raise ValueError(f"question_type_repeats keys are question-type names, got {kind!r}")
        if not isinstance(times, int) or isinstance(times, bool) or times < 1:
            raise ValueError(f"question_type_repeats[{kind!r}] must be a whole number >= 1, got {times!r}")


def repeat_question_types(records: list[VQARecord], repeats: dict[str, int], source: str) -> list[VQARecord]:
    """Each record ``repeats[its question_type]`` times (once when its type is not named): weighs question types
    up in a training epoch. Every named type must occur in ``records`` (``source`` names them in the error)."""
    check_question_type_repeats(repeats)
    present = {r.question_type for r in records}
    missing = sorted(set(repeats) - present)
    if missing:
        found = sorted(t for t in present if t is not None)
        raise DatasetFormatError(f"{source}: no question of type {', '.join(map(repr, missing))} to repeat; "
                                 f"types present: {found or 'none (no question_type field; VQAv2 reads it from annotations=)'}")
    return [r for r in records for _ in range(repeats.get(r.question_type, 1))]


def _records_from_objects(
    objects: Iterable[tuple[str, Any]], base: Path, task: str
) -> list[CaptionRecord] | list[VQARecord]:
    """Records from manifest objects, each given with its location (for error messages).
    For captions, objects that name the same image are merged into one record."""
    if task == VQA:
        records = []
        for number, (where, obj) in enumerate(objects):
            hint = "for caption data open the dataset with task='caption'"
            _require_keys(obj, ("image", "question"), where, hint=hint)
            image = _image_path(obj["image"], base, where)
            image_id = str(obj.get("image_id", obj["image"]))
            records.append(VQARecord(
                image=image,
                question=str(obj["question"]),
                answers=tuple(_answer_list(obj, where)),
                image_id=image_id,
                question_id=str(obj.get("question_id", number)),
                question_type=_optional_str(obj.get("question_type")),
            ))  # fmt: skip
        return records
    grouped: dict[str, tuple[str, list[str]]] = {}  # image path -> (image id, captions); keeps first-seen order
    for where, obj in objects:
        _require_keys(obj, ("image",), where)
        image = _image_path(obj["image"], base, where)
        image_id, texts = grouped.setdefault(image, (str(obj.get("image_id", obj["image"])), []))
        texts.extend(_caption_list(obj, where))
    return [CaptionRecord(image, tuple(texts), image_id) for image, (image_id, texts) in grouped.items()]


def _require_keys(obj: Any, keys: tuple[str, ...], where: str, hint: str = "") -> None:
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [key for key in keys if key not in obj]
    if missing:
        advice = f"; {hint}" if hint else ""
        raise DatasetFormatError(f"{where}: missing key(s) {missing} (keys: {sorted(obj)}){advice}")


def _jsonl_objects(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path} line {number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetFormatError(f"{path} line {number}: not valid JSON ({error})") from error


def _csv_records(path: Path, base: Path, task: str) -> list[CaptionRecord]:
    if task != CAPTION:
        raise DatasetFormatError(
            f"{path}: CSV manifests hold captions (columns image, caption); for VQA use JSON or JSONL"
        )
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"image", "caption"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetFormatError(
                f"{path}: CSV header lacks column(s) {sorted(missing)} (header: {reader.fieldnames})"
            )
        rows = [(f"{path} row {number}", row) for number, row in enumerate(reader, start=2)]
    return _records_from_objects(rows, base, task)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DatasetFormatError(f"{path}: not valid JSON ({error})") from error


def _json_layout(data: Any) -> str | None:
    """Which JSON kind ``data`` is: 'json' (a list of objects), 'coco', 'vqav2', or None."""
    if isinstance(data, list):
        return "json"
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return "coco"
    if isinstance(data, dict) and "questions" in data:
        return "vqav2"
    return None


def _coco_records(data: dict, base: Path, path: Path) -> list[CaptionRecord]:
    """Official COCO captions; images without annotations are kept (captions empty) for evaluation."""
    texts: dict[Any, list[str]] = {}
    for number, annotation in enumerate(data["annotations"]):
        _require_keys(annotation, ("image_id", "caption"), f"{path} annotations[{number}]")
        texts.setdefault(annotation["image_id"], []).append(annotation["caption"])
    records = []
    for number, image in enumerate(data["images"]):
        where = f"{path} images[{number}]"
        _require_keys(image, ("id", "file_name"), where)
        path_on_disk = _image_path(image["file_name"], base, where)
        records.append(CaptionRecord(path_on_disk, tuple(texts.get(image["id"], ())), str(image["id"])))
    return records


def _vqav2_records(questions: dict, base: Path, path: Path, annotations: Path | None) -> list[VQARecord]:
    """Official VQAv2: questions file + (optional, absent for test-dev) annotations file."""
    subtype = questions.get("data_subtype")
    if subtype is None:
        raise DatasetFormatError(f"{path}: no 'data_subtype' (e.g. 'val2014'), needed to name the COCO image files")
    answers: dict[Any, list[str]] = {}
    question_types: dict[Any, str | None] = {}
    if annotations is not None:
        annotation_data = _load_json(_existing(annotations, "VQAv2 annotations file"))
        if not isinstance(annotation_data, dict) or "annotations" not in annotation_data:
            raise DatasetFormatError(f"{annotations}: not a VQAv2 annotations file (no 'annotations' key)")
        for number, annotation in enumerate(annotation_data["annotations"]):
            where = f"{annotations} annotations[{number}]"
            _require_keys(annotation, ("question_id", "answers"), where)
            answers[annotation["question_id"]] = _answer_list(annotation, where)
            question_types[annotation["question_id"]] = _optional_str(annotation.get("question_type"))
    records = []
    for number, question in enumerate(questions["questions"]):
        where = f"{path} questions[{number}]"
        _require_keys(question, ("image_id", "question", "question_id"), where)
        if annotations is not None and question["question_id"] not in answers:
            raise DatasetFormatError(f"{where}: question_id {question['question_id']} has no entry in {annotations}")
        file_name = VQAV2_IMAGE_TEMPLATE.format(subtype=subtype, image_id=int(question["image_id"]))
        records.append(VQARecord(
            image=str(base / file_name),
            question=question["question"],
            answers=tuple(answers.get(question["question_id"], ())),
            image_id=str(question["image_id"]),
            question_id=str(question["question_id"]),
            question_type=question_types.get(question["question_id"]),
        ))  # fmt: skip
    return records


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetFormatError(f"{what} not found: {path}")
    return path


def read_records(
    path: str | Path,
    kind: str,
    task: str = CAPTION,
    image_root: str | Path | None = None,
    annotations: str | Path | None = None,
) -> list[CaptionRecord] | list[VQARecord]:
    """Read a non-streaming dataset file of ``kind`` into records (image paths resolved)."""
    _check_task(task)
    path = _existing(path, "dataset file")
    base = Path(image_root).expanduser() if image_root is not None else path.parent
    if kind == "jsonl":
        return _records_from_objects(_jsonl_objects(path), base, task)
    if kind == "csv":
        return _csv_records(path, base, task)
    if kind not in ("json", "coco", "vqav2"):
        raise DatasetFormatError(f"unknown dataset kind {kind!r}; kinds: {list(KINDS)}")
    data = _load_json(path)
    layout = _json_layout(data)  # kind "json" accepts any of the three layouts
    if layout is None:
        raise DatasetFormatError(f"{path}: JSON is none of: {'; '.join(_LAYOUT_HELP.values())}")
    if kind != "json" and layout != kind:
        raise DatasetFormatError(
            f"{path}: kind {kind!r} expects {_LAYOUT_HELP[kind]}, but the file holds {_LAYOUT_HELP[layout]}"
        )
    if layout == "json":
        return _records_from_objects(((f"{path} entry {i}", obj) for i, obj in enumerate(data)), base, task)
    if layout == "coco":
        if task != CAPTION:
            raise DatasetFormatError(f"{path}: a COCO caption file holds captions; open it with task='caption'")
        return _coco_records(data, base, path)
    if task != VQA:
        raise DatasetFormatError(f"{path}: a VQAv2 questions file holds questions; open it with task='vqa'")
    return _vqav2_records(data, base, path, Path(annotations) if annotations is not None else None)


_LAYOUT_HELP = {
    "json": "a JSON list of objects",
    "coco": 'a COCO caption object {"images": [...], "annotations": [...]}',
    "vqav2": 'a VQAv2 questions object {"questions": [...]}',
}


# --------------------------------------------------------------------------------------- datasets


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise DatasetFormatError(f"task must be one of {TASKS}, got {task!r}")


def _load(source: str | bytes, transform: Transform | None, name: str | None = None) -> Any:
    """The transformed image, or a ``BadImage`` when it cannot be read."""
    try:
        image = load_image(source, name=name)
    except ImageError as error:
        return BadImage(error.source, error.cause)
    return transform(image) if transform is not None else image


def _record_image(record: CaptionRecord | VQARecord, transform: Transform | FeatureCache | None) -> Any:
    """The record's image through ``transform``, or its cached frozen features when ``transform`` is a FeatureCache."""
    if isinstance(transform, FeatureCache):
        if record.image_id not in transform:
            return BadImage(record.image, f"image id {record.image_id!r} is not in the feature cache {transform.path}")
        return transform[record.image_id]
    return _load(record.image, transform)


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
            raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
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


class VQADataset(Dataset):
    """Map-style VQA dataset. Items: {"image", "question", "answers", "image_id", "question_id"}.

    ``transform`` may be a ``FeatureCache``, as for ``CaptionDataset``.
    """

    def __init__(self, records: list[VQARecord], transform: Transform | None = None):
        self.records = list(records)
        self.transform = transform

    def set_epoch(self, epoch: int) -> None:
        """Nothing varies per epoch; present so every dataset here takes ``set_epoch``."""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | BadImage:
        record = self.records[index]
        image = _record_image(record, self.transform)
        if isinstance(image, BadImage):
            return image
        return {
            "image": image,
            "question": record.question,
            "answers": list(record.answers),
            "image_id": record.image_id,
            "question_id": record.question_id,
        }


# ------------------------------------------------------------------------------ webdataset shards


def expand_shards(spec: str | Path) -> list[str]:
    """Shard paths from a brace pattern ("shards-{000000..000009}.tar"), one .tar, or a folder of .tar files;
    every shard must exist."""
    text = str(spec)
    if is_url(text):
        raise DatasetFormatError(
            f"{text}: remote shards are not supported (remote fetching is disabled); copy them locally"
        )
    folder = Path(text).expanduser()
    if folder.is_dir():
        shards = sorted(str(path) for path in folder.glob("*.tar"))
    else:
        shards = [str(Path(path).expanduser()) for path in braceexpand(text)]
    if not shards:
        raise DatasetFormatError(f"no .tar shards in folder {folder}")
    missing = [shard for shard in shards if not Path(shard).is_file()]
    if missing:
        raise DatasetFormatError(f"{len(missing)} of {len(shards)} shards not found, e.g. {missing[:3]}")
    return shards


def _rank_and_world() -> tuple[int, int]:
    """This process's distributed rank and world size (torch.distributed, else torchrun's env vars)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class _RawSample(NamedTuple):
    shard: str
    key: str
    files: dict[str, bytes]  # extension -> bytes, e.g. {"jpg": ..., "txt": ...}


_TAR_END_MARKER = 1024  # two zero 512-byte blocks


def _ends_with_archive_marker(shard: str) -> bool:
    """Whether an uncompressed tar ends in the zero blocks that close a complete archive. (tarfile
    itself reads a file cut at a member boundary as a shorter, valid archive.)"""
    with open(shard, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() < _TAR_END_MARKER:
            return False
        handle.seek(-_TAR_END_MARKER, os.SEEK_END)
        return not any(handle.read())


def _tar_samples(shard: str) -> Iterator[_RawSample | BadImage]:
    """Group a tar's consecutive members by key (path up to the first '.' of the file name), streaming.
    A truncated shard yields its complete samples, then a ``BadImage`` for the shard."""
    try:
        complete = not shard.endswith(".tar") or _ends_with_archive_marker(shard)
    except OSError as error:
        yield BadImage(shard, f"unreadable tar shard ({error})")
        return
    if complete:
        yield from _tar_members(shard)
        return
    held = None  # one sample behind: the last one may have lost members
    for sample in _tar_members(shard):
        if held is not None:
            yield held
        held = sample
    if isinstance(held, BadImage):
        yield held  # the reader already reported the damage
    else:
        yield BadImage(shard, "truncated tar shard (no end-of-archive marker); its last sample was dropped")


def _tar_members(shard: str) -> Iterator[_RawSample | BadImage]:
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            key, files = None, {}
            for member in tar:
                base = posixpath.basename(member.name)
                if not member.isfile() or base.startswith(".") or "." not in base:
                    continue
                stem, extension = base.split(".", 1)
                member_key = posixpath.join(posixpath.dirname(member.name), stem)
                if member_key != key:
                    if files:
                        yield _RawSample(shard, key, files)
                    key, files = member_key, {}
                files[extension.lower()] = tar.extractfile(member).read()
            if files:
                yield _RawSample(shard, key, files)
    except (tarfile.TarError, OSError, EOFError) as error:
        yield BadImage(shard, f"unreadable tar shard ({error}); the rest of this shard was skipped")


def _buffer_shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Approximate shuffle of a stream through a buffer of ``size`` items."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


class ShardDataset(IterableDataset):
    """Streams img2dataset-style tar shards: {key}.jpg (or .png/.webp...) + {key}.txt (+ {key}.json).

    Shards are split by distributed rank, then by DataLoader worker, so every sample is read once
    per epoch across the job. ``train`` shuffles the shard order (same on every rank, per
    ``set_epoch``) and samples through a buffer of ``shuffle_buffer`` undecoded samples.
    VQA shards carry {"question", "answers"} in the .json.
    """

    def __init__(
        self,
        shards: list[str],
        transform: Transform | None = None,
        task: str = CAPTION,
        train: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 1000,
    ):
        _check_task(task)
        self.shards = list(shards)
        self.transform = transform
        self.task = task
        self.train = train
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_shards(self) -> tuple[list[str], str]:
        shards = list(self.shards)
        if self.train:
            random.Random(f"{self.seed}/{self.epoch}").shuffle(shards)
        rank, world = _rank_and_world()
        if world > len(shards):
            raise DatasetFormatError(
                f"{len(shards)} shards cannot be split across {world} ranks; write at least {world} shards"
            )
        shards = shards[rank::world]
        worker = get_worker_info()
        if worker is not None:
            shards = shards[worker.id :: worker.num_workers]
        return shards, f"{rank}/{worker.id if worker else 0}"

    def __iter__(self) -> Iterator[dict[str, Any] | BadImage]:
        shards, who = self._my_shards()
        raw = (sample for shard in shards for sample in _tar_samples(shard))
        if self.train and self.shuffle_buffer > 1:
            raw = _buffer_shuffled(raw, self.shuffle_buffer, random.Random(f"{self.seed}/{self.epoch}/{who}"))
        for sample in raw:
            yield sample if isinstance(sample, BadImage) else self._item(sample)

    def _item(self, sample: _RawSample) -> dict[str, Any] | BadImage:
        label = f"{sample.shard}:{sample.key}"
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in sample.files), None)
        if extension is None:
            return BadImage(label, f"no image member (looked for .{', .'.join(IMAGE_EXTENSIONS)})")
        try:
            meta = json.loads(sample.files["json"]) if "json" in sample.files else {}
            text = sample.files["txt"].decode("utf-8").strip() if "txt" in sample.files else meta.get("caption")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return BadImage(label, f"unreadable .json/.txt member ({error})")
        if self.task == CAPTION and not text:
            return BadImage(label, "no caption (.txt member or 'caption' in the .json member)")
        if self.task == VQA and not meta.get("question"):
            return BadImage(label, "no 'question' in the .json member")
        image = _load(sample.files[extension], self.transform, name=f"{label}.{extension}")
        if isinstance(image, BadImage):
            return image
        image_id = posixpath.basename(sample.key)
        if self.task == CAPTION:
            return {"image": image, "text": text, "image_id": image_id}
        return {
            "image": image,
            "question": meta["question"],
            "answers": _answer_list(meta, label),
            "image_id": image_id,
            "question_id": str(meta.get("question_id", image_id)),
        }


# ----------------------------------------------------------------------------------- the factory


def detect_kind(path_or_spec: str | Path) -> str:
    """The dataset kind of a file or shard spec, from its name alone."""
    text = str(path_or_spec)
    path = Path(text).expanduser()
    if text.endswith(".tar") or ("{" in text and ".." in text) or (path.is_dir() and any(path.glob("*.tar"))):
        return "webdataset"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".csv", ".json"):
        return suffix[1:]  # for .json the layout (list, COCO, VQAv2) is read from the content
    raise DatasetFormatError(
        f"cannot tell the dataset kind of {text!r}: expected .jsonl, .csv, .json, .tar, a shard pattern "
        f"like 'shards-{{000000..000009}}.tar', or a folder; or pass kind= one of {list(KINDS)}"
    )


def _resolve_folder(path_or_spec: str | Path, task: str) -> str | Path:
    """A folder with a manifest for ``task`` (e.g. a shapes-world split) stands for that manifest."""
    folder = Path(str(path_or_spec)).expanduser()
    if not folder.is_dir():
        return path_or_spec
    manifest = folder / MANIFEST_IN_FOLDER[task]
    if manifest.is_file():
        return manifest
    if any(folder.glob("*.tar")):
        return folder
    raise DatasetFormatError(f"folder {folder} holds neither {MANIFEST_IN_FOLDER[task]} nor .tar shards")


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
    _check_task(task)
    spec = _resolve_folder(path_or_spec, task)
    kind = kind or detect_kind(spec)
    if caption_index is not None and (task != CAPTION or kind == "webdataset"):
        raise ValueError(f"caption_index picks one of several captions per image: a {kind} {task} dataset has none "
                         "to pick from; leave caption_index unset")
    if question_type_repeats and (task != VQA or kind == "webdataset"):
        raise ValueError(f"question_type_repeats weighs question types of a VQA dataset; a {kind} {task} dataset "
                         "has no question types to weigh; leave question_type_repeats unset")
    if kind == "webdataset":
        return ShardDataset(expand_shards(spec), transform, task, train=train, seed=seed, shuffle_buffer=shuffle_buffer)
    records = read_records(spec, kind, task, image_root=image_root, annotations=annotations)
    if task == CAPTION:
        if caption_index is not None:
            records = [replace(r, captions=r.captions_at(caption_index)) for r in records]
        return CaptionDataset(records, transform, train=train, seed=seed, captions_per_image=captions_per_image)
    if question_type_repeats:
        records = repeat_question_types(records, question_type_repeats, str(spec))
    return VQADataset(records, transform)


# ------------------------------------------------------------------------ skipping bad images


def collate_skip_bad(batch: list[dict[str, Any] | BadImage | None]) -> dict[str, Any]:
    """Collate items, dropping ``BadImage`` (and None) entries and listing them under "bad_images".

    Tensors are stacked (e.g. "image" -> [B, 3, H, W]); everything else becomes a list. A batch of
    only bad items holds just "bad_images".
    """
    bad = [
        item if isinstance(item, BadImage) else BadImage("<unknown>", "dataset returned None")
        for item in batch
        if not isinstance(item, dict)
    ]
    good = [item for item in batch if isinstance(item, dict)]
    collated: dict[str, Any] = {"bad_images": bad}
    for key in good[0] if good else ():
        values = [item[key] for item in good]
        collated[key] = torch.stack(values) if all(isinstance(v, torch.Tensor) for v in values) else values
    return collated


def batch_size(batch: dict[str, Any]) -> int:
    """Number of usable items in a batch from ``collate_skip_bad``."""
    return len(batch.get("image_id", ()))


class BadImageLimitError(RuntimeError):
    """Too many unreadable images: the data needs fixing before the run can be trusted."""


class BadImageCounter:
    """Counts bad images across batches in the main process and stops the run past a limit.

    ``max_bad_images``: None (no limit), an int (stop when more than that many are bad), or a
    fraction in (0, 1) (stop when more than that fraction of the images seen so far were bad,
    once at least ``min_seen`` images were seen).
    """

    def __init__(self, max_bad_images: int | float | None = None, min_seen: int = 100, keep_last: int = 5):
        if isinstance(max_bad_images, float) and not 0.0 < max_bad_images < 1.0:
            raise ValueError(
                f"max_bad_images as a fraction must be in (0, 1), got {max_bad_images}; use an int for a count"
            )
        if isinstance(max_bad_images, int) and max_bad_images < 0:
            raise ValueError(f"max_bad_images must be >= 0, got {max_bad_images}")
        self.max_bad_images = max_bad_images
        self.min_seen = min_seen
        self.bad = 0
        self.seen = 0
        self.last: deque[BadImage] = deque(maxlen=keep_last)
        self._lock = threading.Lock()

    def update(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Count a collated batch's bad images; raise ``BadImageLimitError`` past the limit."""
        bad = batch.get("bad_images", [])
        with self._lock:
            for item in bad:
                self.bad += 1
                if self.bad <= WARN_FIRST_BAD:
                    logger.warning("skipped bad image %s: %s", item.source, item.reason)
                    if self.bad == WARN_FIRST_BAD:
                        logger.warning("further bad images are counted without a message each")
            self.seen += len(bad) + batch_size(batch)
            self.last.extend(bad)
            over = self._over_limit()
        if over:
            raise BadImageLimitError(self._limit_message())
        return batch

    def track(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Count every batch and yield those with at least one usable item."""
        for batch in batches:
            self.update(batch)
            if batch_size(batch):
                yield batch

    def _over_limit(self) -> bool:
        limit = self.max_bad_images
        if limit is None:
            return False
        if isinstance(limit, float):
            return self.seen >= self.min_seen and self.bad > limit * self.seen
        return self.bad > limit

    def _last_files(self) -> str:
        return "; ".join(f"{item.source} ({item.reason})" for item in self.last)

    def _limit_message(self) -> str:
        return (
            f"{self.bad} of {self.seen} images were unreadable, above max_bad_images={self.max_bad_images}. "
            f"Last bad files: {self._last_files()}. Fix or remove them from the dataset, or raise max_bad_images."
        )

    def summary(self) -> str:
        if not self.bad:
            return f"no bad images among {self.seen}"
        share = self.bad / max(self.seen, 1)
        return f"skipped {self.bad} of {self.seen} images ({share:.2%}) as unreadable; last: {self._last_files()}"
