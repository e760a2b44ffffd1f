"""The exact vectors: one append-only float32 file of [Q, E] rows, row ``i`` for image slot ``i``.

Every backend re-scores its candidates from exact vectors; the FAISS backend keeps them here (its ANN index is
derived from this file and can always be rebuilt from it). Rows are appended and fsynced *before* the database
commits their images, so every committed slot has its row; bytes past the committed rows (a build killed
between the two) are ignored, and cut off by the next writer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from blip2.search.errors import SearchIndexError


class VectorFile:
    def __init__(self, path: Path, num_queries: int, dim: int, slots: int, writable: bool = False):
        self.path, self.num_queries, self.dim = path, num_queries, dim
        self.row_bytes = num_queries * dim * 4
        size = path.stat().st_size if path.exists() else 0
        if size < slots * self.row_bytes:
            raise SearchIndexError(f"{path} holds {size // self.row_bytes} image rows but the index database commits "
                                   f"{slots}: the index is damaged; rebuild it with blip2 index build")
        if writable and size > slots * self.row_bytes:
            with path.open("r+b") as handle:  # rows written by a build killed before it committed them
                handle.truncate(slots * self.row_bytes)
        self.slots = slots
        self._map: np.ndarray | None = None

    def rows(self) -> np.ndarray:
        """All committed rows, memory-mapped: [slots, Q, E] float32 (read-only)."""
        if self._map is None or len(self._map) != self.slots:
            if self.slots == 0:
                self._map = np.zeros((0, self.num_queries, self.dim), np.float32)
            else:
                self._map = np.memmap(self.path, np.float32, "r", shape=(self.slots, self.num_queries, self.dim))
        return self._map

    def read(self, slots: np.ndarray) -> np.ndarray:
        """Rows of the given slots: [n, Q, E] float32."""
        return np.asarray(self.rows()[np.asarray(slots, dtype=np.int64)])

    def append(self, vectors: np.ndarray) -> None:
        """Append rows [b, Q, E] after the committed ones and make them durable (the caller then commits them)."""
        if vectors.shape[1:] != (self.num_queries, self.dim):
            raise SearchIndexError(f"vectors of shape {vectors.shape[1:]} do not fit this index's "
                                   f"({self.num_queries}, {self.dim}) rows")
        with self.path.open("ab") as handle:
            handle.truncate(self.slots * self.row_bytes)  # append mode writes at the (new) end
            handle.write(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        self.slots += len(vectors)
