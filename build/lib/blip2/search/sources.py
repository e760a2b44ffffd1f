"""What to index: the images of a folder (recursively), of a manifest (JSONL / CSV / JSON, captions kept), of
WebDataset tar shards (members read in place by offset), or single image files.

A folder holding ``captions.jsonl`` (a shapes-world split, a manifest beside its images) is read as that manifest;
one holding ``.tar`` files as shards; any other folder as a tree of image files (a ``NAME.txt`` beside
``NAME.jpg`` is its caption).
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from blip2.data.records import IMAGE_EXTENSIONS, detect_kind, read_records
from blip2.data.shards import expand_shards
from blip2.search.errors import SearchIndexError

MANIFEST_NAME = "captions.jsonl"


@dataclass(frozen=True)
class Item:
    """One image to index: ``path`` names it (absolute; ``SHARD:MEMBER`` inside a tar), ``shard``/``offset`` say
    where a tar member's bytes are."""

    path: str
    bytes: int
    mtime_ns: int
    caption: str | None = None
    shard: str | None = None
    offset: int | None = None


@dataclass(frozen=True)
class Failure:
    """Something in a source that cannot be indexed (an unreadable shard), reported like a bad image."""

    path: str
    cause: str


def read_bytes(path: str, shard: str | None, offset: int | None, size: int | None = None) -> bytes:
    """An item's file content: the file, or ``size`` bytes at ``offset`` in its tar shard."""
    if shard is None:
        return Path(path).read_bytes()
    with open(shard, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def items(source: str) -> tuple[Iterator[Item | Failure], int | None]:
    """Every image under ``source`` (a folder, a manifest, shards or an image file) and how many there are (None
    for shards: they are listed as they are read). A source that does not exist or holds nothing raises here."""
    path = Path(source).expanduser()
    text = str(source)
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        return _listed(_manifest_items(path / MANIFEST_NAME))
    if path.is_dir() and any(path.glob("*.tar")):
        return _shard_items(expand_shards(path)), None
    if path.is_dir():
        return _listed(_folder_items(path))
    if text.endswith(".tar") or ("{" in text and ".." in text):
        return _shard_items(expand_shards(text)), None
    if path.suffix.lower() in (".jsonl", ".csv", ".json") and path.is_file():
        return _listed(_manifest_items(path))
    if path.is_file() or path.suffix.lower()[1:] in IMAGE_EXTENSIONS:
        found = _file_item(path.resolve(), None) if path.is_file() else Failure(str(path.absolute()), "file not found")
        return iter([found]), 1
    raise SearchIndexError(f"{source}: no such file or folder (give a folder of images, a manifest, .tar shards "
                           "or image files)")


def _listed(found: list[Item | Failure]) -> tuple[Iterator[Item | Failure], int]:
    return iter(found), len(found)


def _file_item(path: Path, caption: str | None) -> Item | Failure:
    try:
        stat = path.stat()
    except OSError as error:
        return Failure(str(path), f"cannot read ({error.strerror or error})")
    return Item(str(path), stat.st_size, stat.st_mtime_ns, caption)


def _folder_items(folder: Path) -> list[Item | Failure]:
    files = sorted(p for p in folder.resolve().rglob("*") if p.is_file() and p.suffix.lower()[1:] in IMAGE_EXTENSIONS)
    if not files:
        raise SearchIndexError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    return [_file_item(file, _sidecar_caption(file)) for file in files]


def _sidecar_caption(file: Path) -> str | None:
    sidecar = file.with_suffix(".txt")
    return (sidecar.read_text(encoding="utf-8", errors="replace").strip() or None) if sidecar.is_file() else None


def _manifest_items(manifest: Path) -> list[Item | Failure]:
    records = read_records(manifest, detect_kind(manifest))
    if not records:
        raise SearchIndexError(f"{manifest}: the manifest lists no images")
    return [_file_item(Path(r.image).resolve(), r.captions[0] if r.captions else None) for r in records]


def _shard_items(shards: list[str]) -> Iterator[Item | Failure]:
    """Tar members with an image extension; ``KEY.txt`` beside ``KEY.jpg`` is its caption (the WebDataset key: the
    member's name up to the first dot of its file name). A damaged shard yields its intact members, then a Failure."""
    for shard in (str(Path(s).resolve()) for s in shards):
        members, failure = {}, None
        try:
            with tarfile.open(shard, mode="r:") as tar:
                for member in tar:
                    if member.isfile():
                        members[member.name] = member
        except (tarfile.TarError, OSError) as error:
            failure = Failure(shard, f"unreadable tar shard ({error}); its remaining members were skipped")
        size = Path(shard).stat().st_size
        captions = {_key(name): m for name, m in members.items() if name.lower().endswith(".txt")}
        for name, member in members.items():
            hidden = name.rpartition("/")[2].startswith(".")
            if hidden or name.rpartition(".")[2].lower() not in IMAGE_EXTENSIONS or member.offset_data + member.size > size:
                continue
            text = captions.get(_key(name))
            caption = read_bytes(shard, shard, text.offset_data, text.size).decode("utf-8", "replace").strip() if text else None
            yield Item(f"{shard}:{name}", member.size, int(member.mtime * 1e9), caption or None, shard, member.offset_data)
        if failure is not None:
            yield failure


def _key(name: str) -> str:
    folder, _, base = name.rpartition("/")
    return f"{folder}/{base.split('.', 1)[0]}"
