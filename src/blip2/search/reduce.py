"""Max-over-queries search: from a backend's best vectors to the k best distinct images, scored exactly.

An image holds Q vectors (one per Q-Former query); its score for a text is the best of them, as ITC scores it.
A query may itself hold m vectors (an image query): the score is then the mean over the m of each one's best
match among the image's Q (late interaction; for m = 1 it is exactly max over queries).

``top_images`` asks the backend for enough vectors (or, for a grouping backend, images) to see ``need`` distinct
live images, widening the request 4x at a time, then re-scores every candidate exactly (float64, all Q vectors)
and orders by score, ties by ascending image id. For an exact backend it widens until no unseen image can reach
the k-th score: every unseen image scores at most the mean of each row's last returned score (plus the float32
rounding bound ``EPS``), so the result equals brute force, ties included.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

EPS = 1e-4  # bound on float32 rounding of a 256-dim inner product of unit vectors (about 256 * 6e-8 = 1.5e-5)
WIDEN = 4


class Backend(Protocol):
    exact: bool  # search returns each row's true top n (float32 rounding aside)
    grouped: bool  # search returns distinct images per row (the best vector of each), not single vectors

    def capacity(self) -> int:
        """The most results a row can hold (vectors, or images for a grouping backend)."""

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [m, E] float32 -> (scores [m, n] float32, image ids [m, n] int64; -1 past the end), best first."""

    def vectors(self, image_ids: np.ndarray) -> np.ndarray:
        """The exact vectors of the images: [len, Q, E] float32."""


def exact_scores(query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """query [m, E], vectors [n, Q, E] -> [n] float64: mean over the m rows of the best of the image's Q."""
    sims = np.einsum("nqe,me->nqm", vectors.astype(np.float64), query.astype(np.float64))  # [n, Q, m]
    return sims.max(axis=1).mean(axis=1)


def ranked(image_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Positions ordered by score (descending), ties by image id (ascending)."""
    return np.lexsort((image_ids, -scores))


def top_images(backend: Backend, query: np.ndarray, k: int, removed: np.ndarray, need: int | None = None,
               first_fetch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best live images for ``query`` [m, E] -> (image ids [<=k] int64, exact scores [<=k] float64).

    removed: [slots] bool, True for images never to return (ids past its end are not committed: skipped too).
    need: distinct candidates an approximate backend re-scores (>= k); an exact backend needs only k.
    first_fetch: the first request's size (default: ``need`` images' worth).
    """
    need = k if backend.exact else max(k, need or k)
    limit = backend.capacity()
    n = first_fetch or (need if backend.grouped else need * 8)
    while True:
        n = min(n, limit)
        scores, ids = backend.search(query, n)  # [m, n]
        valid = ids >= 0
        live = valid & (ids < len(removed))
        live[live] = ~removed[ids[live]]
        candidates = np.unique(ids[live])
        # a short row means every vector was returned (FAISS); a grouping backend may return fewer groups than
        # asked (Milvus groups the vectors it examined), but always the best ones, in order
        exhausted = n >= limit or (backend.exact and not backend.grouped and bool((valid.sum(axis=1) < n).any()))
        if len(candidates) >= need or exhausted:
            exact = exact_scores(query, backend.vectors(candidates))
            order = ranked(candidates, exact)[:k]
            if exhausted or not backend.exact:
                return candidates[order], exact[order]
            last = np.where(valid.any(axis=1), scores[np.arange(len(scores)), valid.sum(axis=1) - 1], np.inf)
            frontier = last.astype(np.float64).mean()  # every unseen image scores at most this (+ EPS)
            if frontier + EPS < exact[order[-1]]:
                return candidates[order], exact[order]
        n *= WIDEN
