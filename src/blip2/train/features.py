"""`blip2 cache-features`: run the frozen image encoder once over datasets and store the features."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader

from blip2.data.datasets import BadImageCounter, CaptionDataset, CaptionRecord, collate_skip_bad, open_dataset
from blip2.data.feature_cache import encoder_identity, write_feature_cache


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
    model,
    sources: list[str],
    out_dir: str | Path,
    image_root: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    dtype: str = "float16",
    max_bad_images: int | float | None = 0.01,
) -> Path:
    """Encode every distinct image of ``sources`` with ``model``'s frozen encoder (eval preprocessing, no augmentation)."""
    pre = model.vision.preprocess
    images = unique_images(sources, pre.eval_transform(), image_root)
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skip_bad)
    counter = BadImageCounter(max_bad_images)
    out = write_feature_cache(
        model.image_features, counter.track(loader), out_dir, encoder_identity(model.cfg.vision, pre), dtype=dtype,
        total=len(images) if hasattr(images, "__len__") else None,
    )
    if counter.bad:
        print(counter.summary())
    return out
