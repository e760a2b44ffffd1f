"""Unreadable images never crash a run: a dataset yields a ``BadImage`` in place of the item, ``collate_skip_bad``
drops it from the batch (listing it under "bad_images"), and a ``BadImageCounter`` in the main process counts
them and stops the run past ``max_bad_images``."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from PIL import Image

from blip2.data.images import ImageError, load_image
from blip2.errors import InputError

logger = logging.getLogger(__name__)

WARN_FIRST_BAD = 10  # log this many bad images individually, then count silently
Transform = Callable[[Image.Image], Any]


class BadImage(NamedTuple):
    """Stands in for an item whose image could not be used; ``collate_skip_bad`` drops and records it."""

    source: str
    reason: str


def load_or_bad(source: str | bytes, transform: Transform | None, name: str | None = None) -> Any:
    """The transformed image, or a ``BadImage`` when it cannot be read."""
    try:
        image = load_image(source, name=name)
    except ImageError as error:
        return BadImage(error.source, error.cause)
    return transform(image) if transform is not None else image


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


class BadImageLimitError(InputError):
    """Too many unreadable images: the data needs fixing before the run can be trusted."""


class BadImageCounter:
    """Counts bad images across batches in the main process and stops the run past a limit.

    ``max_bad_images``: None (no limit), an int (stop when more than that many are bad), or a
    fraction in (0, 1) (stop when more than that fraction of the images seen so far were bad,
    once at least ``min_seen`` images were seen).
    """

    def __init__(self, max_bad_images: int | float | None = None, min_seen: int = 100, keep_last: int = 5):
        if isinstance(max_bad_images, float) and not 0.0 < max_bad_images < 1.0:
            raise InputError(
                f"max_bad_images as a fraction must be in (0, 1), got {max_bad_images}; use an int for a count"
            )
        if isinstance(max_bad_images, int) and max_bad_images < 0:
            raise InputError(f"max_bad_images must be >= 0, got {max_bad_images}")
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
