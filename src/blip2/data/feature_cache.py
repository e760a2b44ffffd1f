"""Frozen-feature cache: run the frozen image encoder once, then train from memory-mapped features.

Layout of a cache folder (written atomically)::

    meta.json          encoder description, feature shape [N, D], dtype, number of images
    index.json         image_id -> [shard, row]
    shard-00000.npy    [rows, N, D] (fp16 by default), opened with mmap
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from blip2.weights.checkpoint import write_atomically

DTYPES = {"float16": np.float16, "float32": np.float32}


def write_feature_cache(
    encode: Callable[[Tensor], Tensor],
    batches: Iterable[tuple[list[str], Tensor]],
    out_dir: str | Path,
    total: int,
    describe: dict,
    dtype: str = "float16",
    shard_size: int = 4096,
) -> Path:
    """Encode ``batches`` of (image_ids, pixel_values [B, 3, H, W]) with ``encode`` -> [B, N, D] and store them.

    ``total`` is the number of images (for the progress bar and shard sizing); ``describe`` identifies the encoder
    and its preprocessing, so a cache is never read with another encoder.
    """
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)

    def write(tmp: Path) -> None:
        index: dict[str, list[int]] = {}
        shard, shard_no, row, shape = None, -1, shard_size, None
        with tqdm(total=total, desc="caching features", unit="img") as bar:
            for image_ids, pixels in batches:
                with torch.no_grad():
                    feats = encode(pixels).float().cpu().numpy()  # [B, N, D]
                shape = feats.shape[1:]
                for image_id, feat in zip(image_ids, feats):
                    if image_id in index:
                        continue
                    if row == shard_size:
                        shard_no, row = shard_no + 1, 0
                        rows = min(shard_size, total - shard_no * shard_size)
                        shard = np.lib.format.open_memmap(
                            tmp / f"shard-{shard_no:05d}.npy", mode="w+", dtype=DTYPES[dtype], shape=(rows, *shape)
                        )
                    shard[row] = feat
                    index[image_id] = [shard_no, row]
                    row += 1
                bar.update(len(image_ids))
        if shard is not None:
            shard.flush()
        if len(index) != total:
            raise ValueError(f"expected {total} distinct images but encoded {len(index)}: the dataset changed while caching")
        (tmp / "index.json").write_text(json.dumps(index))
        meta = {"encoder": describe, "shape": list(shape or []), "dtype": dtype, "count": len(index)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    write_atomically(out_dir, write)
    return out_dir


class FeatureCache:
    """Read-only, memory-mapped access to cached features by image id."""

    def __init__(self, path: str | Path, expect: dict | None = None):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a feature cache (no meta.json): create one with `blip2 cache-features`")
        self.meta = json.loads(meta_file.read_text())
        if expect is not None and self.meta["encoder"] != expect:
            raise ValueError(
                f"the feature cache {self.path} was made with encoder {self.meta['encoder']}, not {expect}: "
                "rebuild it with `blip2 cache-features` for this model"
            )
        self.index: dict[str, list[int]] = json.loads((self.path / "index.json").read_text())
        self.shards = [np.load(f, mmap_mode="r") for f in sorted(self.path.glob("shard-*.npy"))]

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.index

    def __getitem__(self, image_id: str) -> Tensor:
        """[N, D] float32 features of one image."""
        try:
            shard, row = self.index[image_id]
        except KeyError:
            raise KeyError(f"image {image_id!r} is not in the feature cache {self.path}") from None
        return torch.from_numpy(np.asarray(self.shards[shard][row], dtype=np.float32))
