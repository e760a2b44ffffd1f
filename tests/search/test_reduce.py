"""Max-over-queries search on synthetic vectors: the exact backend ranks as brute force does (ties by image id,
removed images skipped, unindexed slots searched too), approximate backends re-score exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip2.search.faiss_backend import FaissBackend
from blip2.search.reduce import exact_scores, top_images
from blip2.search.store import MetadataStore
from blip2.search.vectors import VectorFile

Q, E = 4, 16


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def collection(n: int = 300, seed: int = 0) -> np.ndarray:
    """[n, Q, E] unit vectors around 20 topics; images 7, 100 and 250 are image 30 with its queries permuted."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((20, E))
    base = topics[rng.integers(0, 20, n)][:, None, :] + 0.7 * rng.standard_normal((n, Q, E))
    vectors = unit(base)
    for copy, permutation in ((7, [1, 0, 3, 2]), (100, [3, 2, 1, 0]), (250, [2, 3, 0, 1])):
        vectors[copy] = vectors[30][permutation]
    return vectors


def backend_over(folder, vectors: np.ndarray, kind: str = "flat", indexed: int | None = None) -> FaissBackend:
    """A FAISS backend holding ``vectors``; only the first ``indexed`` images in its FAISS index (the rest unindexed)."""
    store = MetadataStore.create(folder / "index.db", {"num_queries": str(Q), "dim": str(E)})
    backend = FaissBackend(folder, store, VectorFile(folder / "vectors.f32", Q, E, 0, writable=True))
    indexed = len(vectors) if indexed is None else indexed
    backend.append(0, vectors[:indexed])
    backend.sync(kind, 2**30, progress=False)
    if indexed < len(vectors):
        backend.append(indexed, vectors[indexed:])
    return backend


def brute_force(vectors: np.ndarray, query: np.ndarray, removed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(image_embeds @ text).amax(queries) (mean over the query's rows), ordered by score then image id."""
    sims = torch.einsum("nqe,me->nqm", torch.from_numpy(vectors).double(), torch.from_numpy(query).double())
    scores = sims.amax(dim=1).mean(dim=1).numpy()
    ids = np.flatnonzero(~removed)
    order = np.lexsort((ids, -scores[ids]))[:k]
    return ids[order], scores[ids][order]


def queries(vectors: np.ndarray, count: int, seed: int = 1) -> list[np.ndarray]:
    """Text-like queries [1, E]: some exactly a vector of image 30 (its copies then tie at the top), some noisy."""
    rng = np.random.default_rng(seed)
    found = [vectors[30, 2][None], vectors[30, 0][None]]
    while len(found) < count:
        image, query = rng.integers(0, len(vectors)), rng.integers(0, Q)
        found.append(unit(vectors[image, query] + 0.5 * rng.standard_normal(E))[None])
    return found


@pytest.mark.parametrize("first_fetch", [None, 1])
def test_exact_backend_ranks_as_brute_force_ties_by_image_id(tmp_path, first_fetch):
    vectors = collection()
    backend = backend_over(tmp_path, vectors)
    assert backend.exact and backend.factory == "Flat"
    removed = np.zeros(len(vectors), bool)
    removed[[5, 31, 299]] = True
    for query in queries(vectors, 30):
        for k in (1, 3, 10, 40):
            ids, scores = top_images(backend, query, k, removed, first_fetch=first_fetch)
            expected_ids, expected_scores = brute_force(vectors, query, removed, k)
            np.testing.assert_array_equal(ids, expected_ids)
            np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-12)
    ids, scores = top_images(backend, vectors[30, 2][None], 4, removed, first_fetch=first_fetch)
    assert ids[:4].tolist() == [7, 30, 100, 250] and len(set(scores.tolist())) == 1  # an exact four-way tie


@pytest.mark.parametrize("first_fetch", [None, 1])
def test_image_queries_score_the_mean_of_each_query_vectors_best_match(tmp_path, first_fetch):
    """An image that is never among any row's best vectors can still have the best mean: only the bound on
    unseen images (the mean of the rows' last scores) makes the result exact."""
    vectors = collection()
    backend = backend_over(tmp_path, vectors)
    removed = np.zeros(len(vectors), bool)
    for image in (0, 30, 123, 200, 250):
        ids, scores = top_images(backend, vectors[image], 12, removed, first_fetch=first_fetch)
        expected_ids, expected_scores = brute_force(vectors, vectors[image], removed, 12)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_allclose(scores, expected_scores, atol=1e-12)
        assert scores[0] == pytest.approx(1.0)  # an image is its own best match


def test_slots_not_yet_in_the_faiss_index_are_searched_exactly(tmp_path):
    vectors = collection(seed=3)
    backend = backend_over(tmp_path, vectors, indexed=120)
    assert backend.covered == 120 and backend.rows.slots == 300
    removed = np.zeros(len(vectors), bool)
    for query in queries(vectors, 10):
        ids, _ = top_images(backend, query, 10, removed)
        np.testing.assert_array_equal(ids, brute_force(vectors, query, removed, 10)[0])
    assert exact_scores(vectors[:1, 0], vectors[:1]).shape == (1,)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_backends_find_the_exact_top_images_and_rescore_them(tmp_path, kind):
    vectors = collection(n=2000, seed=4)
    backend = backend_over(tmp_path, vectors, kind=kind)
    assert not backend.exact and backend.factory.startswith("HNSW" if kind == "hnsw" else "IVF")
    removed = np.zeros(len(vectors), bool)
    found = []
    for query in queries(vectors, 20):
        ids, scores = top_images(backend, query, 10, removed, need=40)
        expected_ids, _ = brute_force(vectors, query, removed, 10)
        found.append(len(set(ids.tolist()) & set(expected_ids.tolist())) / 10)
        np.testing.assert_allclose(scores, exact_scores(query, vectors[ids]), atol=0)  # exact scores, best first
        assert np.all(np.diff(scores) <= 0)
    assert np.mean(found) >= 0.9


def test_the_bound_finds_an_image_that_no_row_ranks_high(tmp_path):
    """Query rows e0..e3. Forty images each match one row at 0.95 (and nothing else: mean 0.24); image 45
    matches every row at 0.5 (mean 0.5) but is never among a row's best forty vectors. Only the bound on
    unseen images keeps widening the request until it is seen."""
    basis = np.eye(E, dtype=np.float32)
    vectors = np.tile(basis[15], (60, Q, 1))  # background: orthogonal to every row
    for image in range(40):
        vectors[image, 0] = 0.95 * basis[image % 4] + np.sqrt(1 - 0.95**2) * basis[5 + image % 8]
    vectors[45] = np.full(4, 0.5, np.float32) @ basis[:4]  # all four of its vectors: 0.5 with every row
    backend = backend_over(tmp_path, unit(vectors))
    query = basis[:4]
    ids, scores = top_images(backend, query, 1, np.zeros(60, bool), first_fetch=4)
    assert ids.tolist() == [45] and scores[0] == pytest.approx(0.5)
    ids, _ = top_images(backend, query, 3, np.zeros(60, bool), first_fetch=4)
    assert ids.tolist() == [45, 0, 1]  # then the 0.24 tie, broken by image id
