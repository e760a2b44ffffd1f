"""The embedded backend: exact vectors in a ``VectorFile``, a FAISS index over them (``ann``) saved beside them.

The FAISS index covers the first ``covered`` image slots; slots committed after it was saved (a build killed
before its indexing step, an add killed before saving) are searched exactly from the vector file until the
next build or add indexes them. A missing or unreadable FAISS file is therefore never fatal: search stays
correct (exact, slower) and the next writer rebuilds it. Removed images stay in the FAISS index and are
filtered out by the search (``reduce``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import faiss
import numpy as np

from blip2.search import ann
from blip2.search.store import MetadataStore
from blip2.search.vectors import VectorFile

logger = logging.getLogger(__name__)


class FaissBackend:
    grouped = False

    def __init__(self, folder: Path, store: MetadataStore, vectors: VectorFile):
        self.folder, self.store, self.rows = folder, store, vectors
        self.num_queries, self.dim = vectors.num_queries, vectors.dim
        self.index: faiss.Index | None = None
        self.factory: str | None = None
        self.covered = 0
        self.ef_search, self.nprobe = ann.HNSW_EF_SEARCH, ann.IVF_NPROBE
        self._load(store.meta())

    def _load(self, meta: dict[str, str]) -> None:
        name = meta.get("ann_file")
        if not name:
            return
        path = self.folder / name
        covered = int(meta["ann_covered"])
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            logger.warning("%s is unreadable (%s); searching the vectors exactly until blip2 index add or build "
                           "rebuilds it", path, str(error).splitlines()[0])
            return
        if index.ntotal != covered * self.num_queries or index.d != self.dim or covered > self.rows.slots:
            logger.warning("%s does not match the index database (%d vectors of %d dims for %d images); searching "
                           "exactly until it is rebuilt", path, index.ntotal, index.d, covered)
            return
        self.index, self.factory, self.covered = index, meta["ann_factory"], covered

    @property
    def exact(self) -> bool:
        return self.index is None or self.factory == "Flat"

    def capacity(self) -> int:
        return self.rows.slots * self.num_queries

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Best n vectors of each query row [m, E] among the FAISS index and the unindexed slots -> image ids."""
        parts = []
        if self.index is not None and self.covered:
            scores, ids = ann.search(self.index, queries, n, self.ef_search, self.nprobe)  # [m, n]
            parts.append((scores, np.where(ids >= 0, ids // self.num_queries, -1)))
        if self.rows.slots > self.covered:
            parts.append(self._search_tail(queries, n))
        scores = np.concatenate([p[0] for p in parts], axis=1)
        ids = np.concatenate([p[1] for p in parts], axis=1)
        scores = np.where(ids >= 0, scores, -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
        scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        return scores.astype(np.float32), ids

    def _search_tail(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over the slots the FAISS index does not cover yet."""
        tail = self.rows.rows()[self.covered:].reshape(-1, self.dim)  # [t * Q, E]
        sims = np.asarray(queries, np.float32) @ tail.T  # [m, t * Q]
        take = min(n, sims.shape[1])
        top = np.argpartition(-sims, take - 1, axis=1)[:, :take]  # [m, take]
        ids = self.covered + top // self.num_queries
        return np.take_along_axis(sims, top, 1), ids

    def vectors(self, image_ids: np.ndarray) -> np.ndarray:
        return self.rows.read(image_ids)

    def append(self, first_slot: int, vectors: np.ndarray) -> None:
        """Store the rows of new images (slots first_slot ...); the database commits them next."""
        assert first_slot == self.rows.slots, (first_slot, self.rows.slots)
        self.rows.append(vectors)

    def sync(self, kind: str, budget: int, progress: bool = True) -> None:
        """Index every committed slot: extend the FAISS index, or build a new one when there is none or the
        collection's size (or ``kind``, or the budget) calls for another kind of index; then save it."""
        slots = self.rows.slots
        if slots == 0:
            return
        target = ann.choose_factory(kind, slots * self.num_queries, self.dim, budget)
        if self.index is None or ann.family(target) != ann.family(self.factory):
            self.index, self.factory = ann.build(target, self.rows.rows(), progress), target
        elif self.covered < slots:
            ann.add(self.index, self.rows.rows()[self.covered:].reshape(-1, self.dim), progress)
        else:
            return
        self.covered = slots
        self._save()

    def _save(self) -> None:
        """Write the FAISS index as ann-<covered>.faiss atomically, point the database at it, drop older ones."""
        name = f"ann-{self.covered}.faiss"
        temporary = self.folder / f".{name}.tmp"
        faiss.write_index(self.index, str(temporary))
        with temporary.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, self.folder / name)
        self.store.set_meta({"ann_file": name, "ann_factory": self.factory, "ann_covered": str(self.covered)})
        for old in self.folder.glob("ann-*.faiss"):
            if old.name != name:
                old.unlink()

    def describe(self) -> dict:
        return {
            "faiss_index": self.factory or "none (exact search over the vector file)",
            "indexed_images": self.covered,
            "unindexed_images": self.rows.slots - self.covered,
            "index_bytes": (self.folder / f"ann-{self.covered}.faiss").stat().st_size if self.index is not None else 0,
            "vector_file_bytes": self.rows.slots * self.rows.row_bytes,
            "exact": self.exact,
        }

    def close(self) -> None:
        self.index = None
