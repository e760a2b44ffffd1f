"""WebDataset tar shards (the img2dataset layout: {key}.jpg + {key}.txt (+ {key}.json)), streamed and split
across distributed ranks and DataLoader workers."""

from __future__ import annotations

import json
import os
import posixpath
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from braceexpand import braceexpand
from torch.utils.data import IterableDataset, get_worker_info

from blip2.data.bad_images import BadImage, Transform, load_or_bad
from blip2.data.images import is_url
from blip2.data.records import CAPTION, IMAGE_EXTENSIONS, VQA, DatasetFormatError, answer_list, check_task
from blip2.distributed import rank_and_world

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
        check_task(task)
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
        rank, world = rank_and_world()
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
        image = load_or_bad(sample.files[extension], self.transform, name=f"{label}.{extension}")
        if isinstance(image, BadImage):
            return image
        image_id = posixpath.basename(sample.key)
        if self.task == CAPTION:
            return {"image": image, "text": text, "image_id": image_id}
        return {
            "image": image,
            "question": meta["question"],
            "answers": answer_list(meta, label),
            "image_id": image_id,
            "question_id": str(meta.get("question_id", image_id)),
        }
