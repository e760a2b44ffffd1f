"""WebDataset tar shards (the img2dataset layout: {key}.jpg + {key}.txt (+ {key}.json)), read with ``webdataset``
and split across distributed ranks and DataLoader workers.

The pipeline, built per epoch by ``ShardDataset.__iter__``::

    shard list (shuffled by seed/epoch in training: the same order on every rank)
    -> this rank's shards -> this DataLoader worker's shards (wds.split_by_worker)
    -> samples of each shard (webdataset's tar reader; a damaged shard ends in one BadImage)
    -> shuffle buffer (training) -> items (images decoded by ``load_or_bad``)
"""

from __future__ import annotations

import json
import os
import random
import tarfile
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import IO, Any

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from blip2.data.bad_images import BadImage, Transform, load_or_bad
from blip2.data.images import is_url
from blip2.data.records import (
    CAPTION,
    IMAGE_EXTENSIONS,
    VQA,
    DatasetFormatError,
    answer_list,
    check_task,
)
from blip2.distributed import rank_and_world


def expand_shards(spec: str | Path) -> list[str]:
    """Shard paths from a pattern (webdataset's expansion: "shards-{000000..000009}.tar", "::" between patterns),
    one .tar, or a folder of .tar files; every shard must exist."""
    text = str(spec)
    if is_url(text):
        raise DatasetFormatError(
            f"{text}: remote shards are not supported (remote fetching is disabled); copy them locally"
        )
    folder = Path(text).expanduser()
    if folder.is_dir():
        shards = sorted(str(path) for path in folder.glob("*.tar"))
    else:
        try:
            shards = [str(Path(path).expanduser()) for path in expand_urls(text)]
        except (AssertionError, KeyError):  # webdataset fills ${NAME} from $WDS_NAME, asserting that it is set
            raise DatasetFormatError(
                f"{text}: webdataset reads ${{NAME}} in a shard pattern from the environment variable WDS_NAME, "
                "which is not set; set it or spell the path out"
            ) from None
    if not shards:
        raise DatasetFormatError(f"no .tar shards in folder {folder}")
    missing = [shard for shard in shards if not Path(shard).is_file()]
    if missing:
        raise DatasetFormatError(f"{len(missing)} of {len(shards)} shards not found, e.g. {missing[:3]}")
    return shards


_TAR_END_MARKER = 1024  # two zero 512-byte blocks
_DAMAGE = (tarfile.TarError, OSError, EOFError, ValueError)  # ValueError: webdataset's duplicate member names


def _ends_with_archive_marker(stream: IO[bytes]) -> bool:
    """Whether an uncompressed tar ends in the zero blocks that close a complete archive. (tarfile, and so
    webdataset, reads a file cut at a member boundary as a shorter, valid archive.)"""
    if stream.seek(0, os.SEEK_END) < _TAR_END_MARKER:
        return False
    stream.seek(-_TAR_END_MARKER, os.SEEK_END)
    return not any(stream.read())


def _shard_samples(shard: str) -> Iterator[dict[str, Any] | BadImage]:
    """webdataset's samples of one local shard ({"__key__", "__url__", "jpg": bytes, "txt": bytes, ...}), streamed.

    The shard is opened here, not by webdataset's URL opener (which would also run "pipe:" commands and read "-"
    from stdin). A damaged shard (a read error, or no end-of-archive marker) yields the samples known complete,
    then one ``BadImage`` for the shard.
    """
    errors: list[Exception] = []
    member = ""  # the member being read: webdataset passes each name to rename_files before reading its data

    def stop(error: Exception) -> bool:  # webdataset's handler protocol: False stops reading this shard
        if not isinstance(error, _DAMAGE):
            raise error
        errors.append(error)
        return False

    def note(name: str) -> str:
        nonlocal member
        member = name
        return name

    try:
        stream = open(shard, "rb")
    except OSError as error:
        yield BadImage(shard, f"unreadable tar shard ({error})")
        return
    with stream:
        files = tar_file_expander([{"url": shard, "stream": stream}], handler=stop, rename_files=note)
        held = None  # one sample behind: the last one may have lost members
        for sample in group_by_keys(files, handler=stop):
            if held is not None:
                yield held
            held = sample
        complete = not errors and (not shard.endswith(".tar") or _ends_with_archive_marker(stream))
    if held is not None and (complete or base_plus_ext(member)[0] != held["__key__"]):
        yield held  # a complete shard, or the damage hit the next sample's first member
    if errors:
        cause = str(errors[0].args[0]).split(" @ ")[0] if errors[0].args else repr(errors[0])  # less wds's context
        yield BadImage(shard, f"unreadable tar shard ({cause}); the rest of this shard was skipped")
    elif not complete:
        yield BadImage(shard, "truncated tar shard (no end-of-archive marker); its last sample was dropped")


def _read_shards(sources: Iterable[dict[str, str]]) -> Iterator[dict[str, Any] | BadImage]:
    for source in sources:
        yield from _shard_samples(source["url"])


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

    def __iter__(self) -> Iterator[dict[str, Any] | BadImage]:
        rank, world = rank_and_world()
        if world > len(self.shards):
            raise DatasetFormatError(
                f"{len(self.shards)} shards cannot be split across {world} ranks; write at least {world} shards"
            )
        worker = get_worker_info()
        epoch_seed = f"{self.seed}/{self.epoch}"
        buffer = self.shuffle_buffer if self.train and self.shuffle_buffer > 1 else None
        rng = random.Random(f"{epoch_seed}/{rank}/{worker.id if worker else 0}")
        return iter(
            wds.DataPipeline(
                wds.SimpleShardList(self.shards, seed=epoch_seed if self.train else None),
                lambda sources: islice(sources, rank, None, world),  # this rank's shards
                wds.split_by_worker,
                _read_shards,
                wds.shuffle(buffer, initial=buffer, rng=rng) if buffer else None,  # None: no stage
                self._items,
            )
        )

    def _items(self, samples: Iterable[dict[str, Any] | BadImage]) -> Iterator[dict[str, Any] | BadImage]:
        for sample in samples:
            yield sample if isinstance(sample, BadImage) else self._item(sample)

    def _item(self, sample: dict[str, Any]) -> dict[str, Any] | BadImage:
        label = f"{sample['__url__']}:{sample['__key__']}"
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if extension is None:
            return BadImage(label, f"no image member (looked for .{', .'.join(IMAGE_EXTENSIONS)})")
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
            text = sample["txt"].decode("utf-8").strip() if "txt" in sample else meta.get("caption")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return BadImage(label, f"unreadable .json/.txt member ({error})")
        if self.task == CAPTION and not text:
            return BadImage(label, "no caption (.txt member or 'caption' in the .json member)")
        if self.task == VQA and not meta.get("question"):
            return BadImage(label, "no 'question' in the .json member")
        image = load_or_bad(sample[extension], self.transform, name=f"{label}.{extension}")
        if isinstance(image, BadImage):
            return image
        image_id = sample["__key__"].rsplit("/", 1)[-1]
        if self.task == CAPTION:
            return {"image": image, "text": text, "image_id": image_id}
        return {
            "image": image,
            "question": meta["question"],
            "answers": answer_list(meta, label),
            "image_id": image_id,
            "question_id": str(meta.get("question_id", image_id)),
        }
