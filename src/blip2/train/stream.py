"""This rank's batches, epoch after epoch, from a position that resumes exactly (``BatchStream``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from blip2.errors import InputError


def epoch_batches(num_examples: int, batch_size: int, epoch: int, seed: int, rank: int, world: int,
                  groups: Sequence[int] | None = None) -> list[list[int]]:
    """This rank's index batches for one epoch, as DistributedSampler + drop_last would deal them.

    One seeded permutation of the whole dataset per epoch, padded by wrapping around to a multiple of ``world``,
    dealt round-robin to the ranks, cut into full batches (the partial last one is dropped). ``groups``: the sizes
    of consecutive index ranges (the datasets of a mixture) whose examples never share a batch: each is dealt
    so, and the batches of all of them are then shuffled together.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if groups is None:
        return _deal(torch.randperm(num_examples, generator=generator).tolist(), batch_size, rank, world)
    if sum(groups) != num_examples:
        raise InputError(f"batch groups of {sum(groups)} examples for a dataset of {num_examples}")
    batches, start = [], 0
    for size in groups:
        batches += _deal((torch.randperm(size, generator=generator) + start).tolist(), batch_size, rank, world)
        start += size
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _deal(order: list[int], batch_size: int, rank: int, world: int) -> list[list[int]]:
    order += order[: -len(order) % world]
    mine = order[rank::world]
    return [mine[i: i + batch_size] for i in range(0, len(mine) - batch_size + 1, batch_size)]


EPOCH_END = object()  # what BatchStream.next returns when the epoch has no more batches


class BatchStream:
    """This rank's collated batches, epoch after epoch; its position (epoch, batches taken) resumes exactly.

    Every epoch starts with ``dataset.set_epoch(epoch)`` when the dataset has one. A map-style dataset is read in the
    order of ``epoch_batches``. An IterableDataset must yield this rank's share itself (e.g. webdataset's
    ``split_by_node``); it is re-iterated every epoch, and resuming mid-epoch reads and drops the batches taken.
    The loader never draws from the global generators, so the training randomness does not depend on it.
    """

    def __init__(self, dataset: Dataset, batch_size: int, collate_fn: Callable | None, num_workers: int,
                 seed: int, rank: int, world: int, pin_memory: bool = False, groups: Sequence[int] | None = None):
        self.dataset, self.batch_size, self.collate_fn, self.groups = dataset, batch_size, collate_fn, groups
        self.num_workers, self.seed, self.rank, self.world, self.pin_memory = num_workers, seed, rank, world, pin_memory
        self.iterable = isinstance(dataset, IterableDataset)
        if not self.iterable and not epoch_batches(len(dataset), batch_size, 0, seed, rank, world, groups):
            raise InputError(f"the dataset has {len(dataset)} examples, fewer than one batch per process "
                             f"(batch_size {batch_size} x {world} processes): lower batch_size or add data")
        self.epoch, self.taken = 0, 0
        self._iterator = None

    def seek(self, epoch: int, batches: int) -> None:
        """Continue at batch ``batches`` of ``epoch``."""
        self.epoch, self.taken = epoch, batches
        self._iterator = self._open()

    def next_epoch(self) -> None:
        self.epoch, self.taken = self.epoch + 1, 0
        self._iterator = None

    def next(self) -> Any:
        """The next collated batch (possibly None or empty when the collate dropped every example), or EPOCH_END."""
        if self._iterator is None:
            self._iterator = self._open()
        batch = next(self._iterator, EPOCH_END)
        if batch is not EPOCH_END:
            self.taken += 1
        return batch

    def _open(self):
        options = dict(
            collate_fn=self.collate_fn, num_workers=self.num_workers, pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch),  # workers' seeds
        )
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        if not self.iterable:
            batches = epoch_batches(len(self.dataset), self.batch_size, self.epoch, self.seed, self.rank, self.world,
                                    self.groups)
            return iter(DataLoader(self.dataset, batch_sampler=batches[self.taken:], **options))
        iterator = iter(DataLoader(self.dataset, batch_size=self.batch_size, drop_last=True, **options))
        skipped = sum(1 for _ in itertools.islice(iterator, self.taken))
        self.taken = skipped  # a position past the end of a shorter epoch means: at its end
        return iterator


def batch_size_of(batch: Any) -> int:
    """Examples in a collated batch: the leading size of the first tensor in it (depth-first through mappings, lists
    and tuples); 0 when it holds no tensor at all (None, or a collate that dropped every example and kept only a
    list of what was bad)."""
    size = _first_tensor_rows(batch)
    return 0 if size is None else size


def _first_tensor_rows(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.ndim else 1
    children = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for child in children:
        rows = _first_tensor_rows(child)
        if rows is not None:
            return rows
    return None


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor in a (nested) batch moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple (e.g. a BadImage record)
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
