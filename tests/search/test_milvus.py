"""The Milvus backend on milvus-lite (embedded, offline): the same commands with --backend milvus give the same
results as the exact FAISS index; per-image grouping is Milvus's group-by; uncommitted rows are dropped."""

from __future__ import annotations

import json

import numpy as np
import pytest

from blip2.cli import main
from blip2.search import Index, SearchIndexError
from blip2.search.reduce import exact_scores

pytest.importorskip("pymilvus")
TEXT = "w1 photo of w2 cat"


def test_milvus_index_searches_as_the_exact_faiss_index(models, photos, tmp_path, capsys):
    argv = ["index", "build", str(photos), "--model", str(models["a"]), "--batch-size", "4"]
    assert main([*argv, "--out", str(tmp_path / "faiss")]) == 0
    assert main([*argv, "--out", str(tmp_path / "milvus"), "--backend", "milvus"]) == 0
    capsys.readouterr()
    faiss_index, milvus_index = Index.open(tmp_path / "faiss"), Index.open(tmp_path / "milvus")
    info = milvus_index.info()
    assert (info["backend"], info["milvus_index"], info["vectors"], info["images"]) == ("milvus", "FLAT", 48, 12)
    assert info["milvus_uri"] == str(tmp_path / "milvus" / "milvus.db")
    for query in ({"text": TEXT}, {"text": "cat", "rerank": 4}, {"image": str(photos / "02.png")}):
        expected = [(h.path, h.score, h.itm) for h in faiss_index.search(**query, k=12)]
        assert [(h.path, h.score, h.itm) for h in milvus_index.search(**query, k=12)] == expected  # the same vectors

    assert main(["index", "remove", str(tmp_path / "milvus"), str(photos / "sub")]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "milvus"), TEXT, "--k", "20", "--json"]) == 0
    paths = [r["path"] for r in json.loads(capsys.readouterr().out)["results"]]
    assert len(paths) == 10 and not any("/sub/" in p for p in paths)
    assert main(["index", "add", str(tmp_path / "milvus"), str(photos)]) == 0  # back without encoding
    assert Index.open(tmp_path / "milvus").info()["vectors"] == 48 and "0 encoded" in capsys.readouterr().out
    assert len(Index.open(tmp_path / "milvus").search(TEXT, k=20)) == 12


def test_group_by_returns_each_image_once_with_its_best_vector(models, photos, tmp_path):
    index, _ = Index.build([str(photos)], tmp_path / "milvus", str(models["a"]), backend="milvus", progress=False)
    backend = index.backend
    assert backend.grouped and backend.exact
    vectors = backend.vectors(np.arange(12))  # [12, Q, E], read back from the collection
    np.testing.assert_allclose(vectors, Index.build([str(photos)], tmp_path / "faiss", str(models["a"]),
                                                    progress=False)[0].backend.vectors(np.arange(12)), atol=0)
    query = vectors[5, 1:2] * 0.5 + vectors[8, 0:1] * 0.5
    scores, ids = backend.search(query, 6)  # [1, 6]: six distinct images, best first
    best = exact_scores(query, vectors)
    assert len(set(ids[0].tolist())) == 6
    assert ids[0].tolist() == sorted(range(12), key=lambda i: -best[i])[:6]
    np.testing.assert_allclose(scores[0], np.sort(best)[::-1][:6], atol=1e-5)


def test_uncommitted_rows_are_dropped_and_other_index_types_work(models, photos, picture, tmp_path):
    out = tmp_path / "milvus"
    index, _ = Index.build([str(photos)], out, str(models["a"]), backend="milvus", progress=False)
    stray = index.backend.vectors(np.array([3]))  # rows for slot 12, inserted but never committed (a killed build)
    index.backend.append(12, stray)
    assert index.backend.vectors(np.array([12])).any()
    assert 12 not in [h.image_id for h in index.search(image=str(photos / "03.png"), k=20)]
    index.close()
    reopened = Index.open(out, writable=True)
    assert not reopened.backend.vectors(np.array([12])).any() and reopened.info()["vectors"] == 48
    reopened.close()

    index, _ = Index.build([str(photos)], out, str(models["a"]), backend="milvus", index_type="hnsw", progress=False)
    assert index.info()["milvus_index"] == "HNSW" and not index.backend.exact
    exact = Index.build([str(photos)], tmp_path / "faiss", str(models["a"]), progress=False)[0]
    assert [h.path for h in index.search(TEXT, k=5)] == [h.path for h in exact.search(TEXT, k=5)]

    with pytest.raises(SearchIndexError, match="is a milvus index, not faiss: leave --backend out to resume it"):
        Index.build([str(photos)], out, str(models["a"]), backend="faiss", progress=False)
    assert Index.build([str(photos)], out, str(models["a"]), progress=False)[1].unchanged == 13  # resumed
    with pytest.raises(SearchIndexError, match="cannot reach Milvus at http://127.0.0.1:9"):
        Index.build([str(photos)], tmp_path / "server", str(models["a"]), backend="milvus", uri="http://127.0.0.1:9")


def test_exact_milvus_search_is_brute_force_when_group_by_returns_fewer_groups(tmp_path):
    """Images of 32 near-identical vectors: Milvus's group-by examines the best vectors, which few images fill,
    and returns fewer groups than asked; the search widens until the bound proves the top k."""
    from blip2.search.milvus_backend import MilvusBackend
    from blip2.search.reduce import top_images

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((300, 16))
    vectors = centres[:, None, :] + 0.01 * rng.standard_normal((300, 32, 16))
    vectors = (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)).astype(np.float32)  # [300, 32, 16]
    backend = MilvusBackend(str(tmp_path / "milvus.db"), "tight", 32, 16, 0, create=True)
    backend.append(0, vectors)
    backend.sync("flat", 2**30)
    query = vectors[7, 3:4]
    _, ids = backend.search(query, 10)
    assert (ids[0] >= 0).sum() < 10  # what makes this test bite
    removed = np.zeros(300, bool)
    removed[[11, 12]] = True
    brute = np.einsum("nqe,me->nqm", vectors.astype(np.float64), query.astype(np.float64)).max(axis=1).mean(axis=1)
    for k in (1, 10, 25):
        found, scores = top_images(backend, query, k, removed)
        alive = np.flatnonzero(~removed)
        expected = alive[np.lexsort((alive, -brute[alive]))][:k]
        np.testing.assert_array_equal(found, expected)
        np.testing.assert_allclose(scores, brute[expected], atol=1e-12)
