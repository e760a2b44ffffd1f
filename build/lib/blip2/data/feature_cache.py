"""Frozen-feature cache: run the frozen image encoder once over datasets, then train from memory-mapped features.

Layout of a cache folder (written atomically)::

    meta.json          encoder description, feature shape [N, D], dtype, number of images
    index.json         image_id -> [shard, row]
    shard-00000.npy    [rows, N, D] (fp16 by default), opened with mmap
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from blip2.data.bad_images import BadImage, BadImageCounter, collate_skip_bad
from blip2.data.datasets import CaptionDataset, open_dataset
from blip2.data.preprocess import Preprocess
from blip2.data.records import CaptionRecord
from blip2.errors import InputError
from blip2.io import write_atomically

DTYPES = {"float16": np.float16, "float32": np.float32}


def weights_digest(module: nn.Module) -> str:
    """sha256 over a module's state (names, shapes, dtypes, bytes): different weights at the same path differ."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encoder_identity(vision_cfg, preprocess: Preprocess, encoder: nn.Module) -> dict:
    """What makes cached features valid: the encoder's config, its weights and its preprocessing."""
    return {"vision": dataclasses.asdict(vision_cfg), "weights_sha256": weights_digest(encoder),
            **preprocess.identity()}


def write_feature_cache(
    encode: Callable[[Tensor], Tensor],
    batches: Iterable[dict],
    out_dir: str | Path,
    identity: dict,
    dtype: str = "float16",
    shard_size: int = 4096,
    total: int | None = None,
) -> Path:
    """Encode collated ``batches`` ({"image": [B, 3, H, W], "image_id": [...]}) with ``encode`` -> [B, N, D] and store them.

    Images already stored (the same id twice) are skipped. ``identity`` describes the encoder and its preprocessing,
    so a cache is never read with another encoder. ``total`` only sizes the progress bar.
    """
    if dtype not in DTYPES:
        raise InputError(f"cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")

    def write(tmp: Path) -> None:
        index: dict[str, list[int]] = {}  # image id -> [shard, row]
        pending: list[np.ndarray] = []  # rows of the shard being filled
        shards, shape = 0, ()

        def flush() -> None:
            nonlocal shards
            if pending:
                np.save(tmp / f"shard-{shards:05d}.npy", np.stack(pending))  # [rows, N, D]
                pending.clear()
                shards += 1

        with tqdm(total=total, desc="caching features", unit="img") as bar:
            for batch in batches:
                keep = [k for k, image_id in enumerate(batch.get("image_id", [])) if image_id not in index]
                bar.update(len(batch.get("image_id", [])) + len(batch.get("bad_images", [])))
                if not keep:
                    continue
                with torch.no_grad():
                    feats = encode(batch["image"][keep]).float().cpu().numpy().astype(DTYPES[dtype])  # [B, N, D]
                shape = feats.shape[1:]
                for k, feat in zip(keep, feats):
                    index[batch["image_id"][k]] = [shards, len(pending)]
                    pending.append(feat)
                    if len(pending) == shard_size:
                        flush()
        flush()
        (tmp / "index.json").write_text(json.dumps(index))
        meta = {"encoder": identity, "shape": list(shape), "dtype": dtype, "count": len(index)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    write_atomically(Path(out_dir), write)
    return Path(out_dir)


class FeatureCache:
    """Read-only, memory-mapped access to cached features by image id."""

    def __init__(self, path: str | Path, expect: dict | None = None):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a feature cache (no meta.json): create one with `blip2 cache-features`")
        self.meta = json.loads(meta_file.read_text())
        if expect is not None and self.meta["encoder"] != expect:
            raise InputError(
                f"the feature cache {self.path} was made with encoder {self.meta['encoder']}, not {expect}: "
                "rebuild it with `blip2 cache-features` for this model"
            )
        self.index: dict[str, list[int]] = json.loads((self.path / "index.json").read_text())
        self.shards = [np.load(f, mmap_mode="r") for f in sorted(self.path.glob("shard-*.npy"))]

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.index

    def features_for(self, record) -> Tensor | BadImage:
        """A dataset record's features [N, D], or a ``BadImage`` when the cache does not hold its image."""
        if record.image_id not in self:
            return BadImage(record.image, f"image id {record.image_id!r} is not in the feature cache {self.path}")
        return self[record.image_id]

    def __getitem__(self, image_id: str) -> Tensor:
        """[N, D] float32 features of one image."""
        try:
            shard, row = self.index[image_id]
        except KeyError:
            raise KeyError(f"image {image_id!r} is not in the feature cache {self.path}") from None
        return torch.from_numpy(np.array(self.shards[shard][row], dtype=np.float32))  # a writable copy


def unique_images(sources: list[str], transform, image_root: str | None = None, task: str = "caption"):
    """One item per distinct image id over ``sources`` (caption or VQA files, shapes split folders, shards)."""
    records: dict[str, CaptionRecord] = {}
    for source in sources:
        dataset = open_dataset(source, transform=transform, task=task, image_root=image_root)
        if not hasattr(dataset, "records"):  # streaming shards: iterate them as they are (duplicates are skipped)
            return dataset
        for record in dataset.records:
            records.setdefault(record.image_id, CaptionRecord(record.image, (), record.image_id))
    return CaptionDataset(list(records.values()), transform)


def cache_features(
    encode: Callable[[Tensor], Tensor],
    identity: dict,
    preprocess: Preprocess,
    sources: list[str],
    out_dir: str | Path,
    image_root: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    dtype: str = "float16",
    max_bad_images: int | float | None = 0.01,
) -> Path:
    """Encode every distinct image of ``sources`` with ``encode`` (eval preprocessing, no augmentation) into a cache
    at ``out_dir`` described by ``identity`` (``encoder_identity``). Data with no readable image is refused."""
    images = unique_images(sources, preprocess.eval_transform(), image_root)
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skip_bad)
    counter = BadImageCounter(max_bad_images)
    batches = _some_images(counter.track(loader), sources, counter)
    out = write_feature_cache(encode, batches, out_dir, identity, dtype=dtype,
                              total=len(images) if hasattr(images, "__len__") else None)
    if counter.bad:
        print(counter.summary())
    return out


def _some_images(batches: Iterable[dict], sources: list[str], counter: BadImageCounter) -> Iterable[dict]:
    """``batches``, refusing (before anything is written) data in which no image could be read."""
    any_image = False
    for batch in batches:
        any_image = True
        yield batch
    if not any_image:
        found = counter.summary() if counter.bad else "they hold no image"
        raise InputError(f"nothing to cache in {', '.join(sources)}: {found}")
