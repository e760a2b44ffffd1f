"""Adding images to an index, a chunk at a time: read, hash, skip what is indexed, decode, encode, commit.

Each chunk of ``batch_size`` new images is encoded, its vectors stored by the backend, then its images and
files committed to the database in one transaction: a build killed at any point keeps every committed chunk,
and a rerun skips the files already indexed (same path, size and modification time) without reading them.
A file whose content (sha256) is already in the index becomes another path of that image (a duplicate) and
is not encoded again. A file that cannot be read or decoded is skipped, counted and reported; the build goes on.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image
from tqdm import tqdm

from blip2.data.images import ImageError, load_image
from blip2.errors import InputError
from blip2.search import model_api
from blip2.search.sources import Failure, Item, items, read_bytes
from blip2.search.store import FileRow, MetadataStore, NewImage


@dataclass
class BuildReport:
    files: int = 0  # files the sources listed
    encoded: int = 0  # new images encoded
    duplicates: int = 0  # files whose content the index already holds (not encoded again)
    unchanged: int = 0  # files already indexed (a resumed build skips them)
    failed: dict[str, str] = field(default_factory=dict)  # path -> cause
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Chunk:
    images: list[NewImage] = field(default_factory=list)
    pictures: list[Image.Image] = field(default_factory=list)
    files: list[FileRow] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    by_hash: dict[str, int] = field(default_factory=dict)


def ingest(store: MetadataStore, backend: Any, model: Any, sources: list[str], batch_size: int = 32,
           progress: bool = True) -> BuildReport:
    """Index every image of ``sources`` not indexed yet; returns what happened."""
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    listed = [items(source) for source in sources]  # every source is checked before anything is written
    total = None if any(count is None for _, count in listed) else sum(count for _, count in listed)
    report, started = BuildReport(), time.perf_counter()
    chunk = _Chunk()
    with tqdm(total=total, unit="image", desc="indexing images", disable=not progress or None) as bar:
        for found, _ in listed:
            for item in found:
                report.files += isinstance(item, Item)
                _take(store, item, chunk, report)
                bar.update(1)
                if len(chunk.images) >= batch_size:
                    _commit(store, backend, model, chunk, batch_size, report)
                    chunk = _Chunk()
        _commit(store, backend, model, chunk, batch_size, report)
    report.seconds = time.perf_counter() - started
    return report


def _take(store: MetadataStore, item: Item | Failure, chunk: _Chunk, report: BuildReport) -> None:
    """Put one listed file into the chunk: skipped, a duplicate, a new image, or a failure."""
    if isinstance(item, Failure):
        chunk.failed[item.path] = item.cause
        return
    if store.file_state(item.path) == (item.bytes, item.mtime_ns):
        report.unchanged += 1
        return
    try:
        data = read_bytes(item.path, item.shard, item.offset, item.bytes)
    except OSError as error:
        chunk.failed[item.path] = f"cannot read ({error.strerror or error})"
        return
    sha = hashlib.sha256(data).hexdigest()
    image_id = chunk.by_hash.get(sha)
    if image_id is None:
        image_id = store.image_for_hash(sha)
    if image_id is not None:
        report.duplicates += 1
    else:
        try:
            picture = load_image(data, name=item.path)
        except ImageError as error:
            chunk.failed[item.path] = error.cause
            return
        image_id = store.slots() + len(chunk.images)
        chunk.images.append(NewImage(image_id, sha, len(data), *picture.size, item.caption))
        chunk.pictures.append(picture)
    chunk.by_hash[sha] = image_id
    chunk.files.append(FileRow(item.path, image_id, item.bytes, item.mtime_ns, item.shard, item.offset))


def _commit(store: MetadataStore, backend: Any, model: Any, chunk: _Chunk, batch_size: int,
            report: BuildReport) -> None:
    """Encode the chunk's new images, store their vectors, then commit the chunk to the database."""
    if chunk.pictures:
        vectors = model_api.image_vectors(model, chunk.pictures, batch_size)  # [b, Q, E]
        backend.append(chunk.images[0].id, vectors)
    if chunk.images or chunk.files or chunk.failed:
        store.commit(chunk.images, chunk.files, chunk.failed)
    report.encoded += len(chunk.images)
    report.failed.update(chunk.failed)
