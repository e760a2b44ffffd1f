"""Image search (`blip2 index` / `blip2 search`) against brute force, its anchor (LAVIS scores every pair).

``python benchmarks/search.py [--part shapes,synthetic,milvus] [--images 100000] [--quick]``

- shapes: the shapes test split (``--data``, data/shapes/test: 1,000 images, caption 2 of each as the text queries)
  indexed with the demo's retrieval model; text-to-image R@1/5/10 through the index (exact FAISS, HNSW, IVF-PQ,
  Milvus), with and without ITM re-rank of the top ``--rerank`` (16), against ``blip2 eval retrieval
  --caption-index 2 --k 16`` (the same function, in this process). Exact backends must equal it; approximate
  ones within 0.02.
- synthetic: ``--images`` images x 32 queries x 256 dims of clustered unit vectors (below); recall@10 of
  distinct images against exact max over queries, single-query latency (text encoder excluded; its own latency
  printed apart), build time and memory of the FAISS index ``auto`` picks (IVF-PQ beyond 4,096 images) and of
  HNSW.
- milvus: the same figures for milvus-lite at ``--milvus-images`` (5,000) images (it indexes about 1,000 vectors
  a second here).

Synthetic vectors: 1,000 topics (random unit vectors); image i's centre c_i = unit(topic + 0.7 u_i), its query q's
vector unit(c_i + 0.5 w_iq), text queries unit(a random image's random query vector + 0.8 z), with u, w, z random
unit vectors. Scores then look like the demo model's on the shapes split: the asked image about 0.8, the 10th
best 0.5 (the images of its topic), the median image 0.06; an image's query vectors have cosine 0.8 with each
other. (With all three noises of norm 1 the 10th best scores 0.28 against 0.24 for the 50th: the neighbours are
drowned in 256-dim noise, and no graph or quantiser finds them: HNSW recall@10 0.75 at 20,000 images.)
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, parser, ratio_line, setup, table

from blip2.search import Index
from blip2.search.faiss_backend import FaissBackend
from blip2.search.store import FileRow, MetadataStore, NewImage
from blip2.search.vectors import VectorFile

ROOT = Path(__file__).resolve().parents[1]
Q, E = 32, 256
TOPICS = 1000
CHUNK = 5000  # images generated (and brute-forced) at a time


# ---------------------------------------------------------------------------------------------- synthetic vectors


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def noise(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Random vectors of norm 1 (shape [..., E])."""
    return unit(rng.standard_normal((*shape, E), dtype=np.float32))


def topics() -> np.ndarray:
    return noise(np.random.default_rng(0), TOPICS)


def image_chunk(start: int, count: int) -> np.ndarray:
    """Images start ... start + count - 1: [count, Q, E] (deterministic per chunk)."""
    rng = np.random.default_rng(1 + start)
    centre = unit(topics()[rng.integers(0, TOPICS, count)] + 0.7 * noise(rng, count))  # [c, E]
    return unit(centre[:, None, :] + 0.5 * noise(rng, count, Q))  # [c, Q, E]


def text_queries(num_images: int, count: int) -> np.ndarray:
    """[count, E]: each near one query vector of a random image."""
    rng = np.random.default_rng(12345)
    images, slots = rng.integers(0, num_images, count), rng.integers(0, Q, count)
    vectors = np.zeros((count, E), np.float32)
    for start in np.unique(images // CHUNK * CHUNK):  # each chunk generated once
        chunk = image_chunk(start, min(CHUNK, num_images - start))
        rows = np.flatnonzero(images // CHUNK * CHUNK == start)
        vectors[rows] = chunk[images[rows] - start, slots[rows]]
    return unit(vectors + 0.8 * noise(rng, count))


def brute_force_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact max-over-queries top k images of each query, by brute force over all vectors [N, Q, E] (float32,
    a chunk of images at a time): [n, k] image ids."""
    best_ids = np.zeros((len(queries), 0), np.int64)
    best_scores = np.zeros((len(queries), 0), np.float32)
    for start in range(0, len(vectors), CHUNK):
        chunk = np.asarray(vectors[start:start + CHUNK])  # [c, Q, E]
        scores = (chunk.reshape(-1, E) @ queries.T).reshape(len(chunk), Q, -1).max(axis=1).T  # [n, c]
        ids = np.broadcast_to(np.arange(start, start + len(chunk)), scores.shape)
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_ids = np.concatenate([best_ids, ids], axis=1)
        top = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(merged_scores, top, 1), np.take_along_axis(merged_ids, top, 1)
    return best_ids


def synthetic_index(folder: Path, num_images: int) -> tuple[float, float]:
    """An index folder holding the synthetic vectors (no model: identity "synthetic"), its FAISS index not built
    yet. -> (seconds to write the vectors, seconds for the database)."""
    folder.mkdir(parents=True)
    store = MetadataStore.create(folder / "index.db", {
        "model": "<synthetic>", "identity": "synthetic", "num_queries": str(Q), "dim": str(E), "backend": "faiss",
        "index_type": "auto", "memory_budget": str(2**34), "created": "benchmark"})  # fmt: skip
    vectors = VectorFile(folder / "vectors.f32", Q, E, 0, writable=True)
    write = database = 0.0
    for start in range(0, num_images, CHUNK):
        count = min(CHUNK, num_images - start)
        chunk = image_chunk(start, count)
        began = time.perf_counter()
        vectors.append(chunk)
        write += time.perf_counter() - began
        began = time.perf_counter()
        ids = range(start, start + count)
        store.commit([NewImage(i, f"{i:064x}", 0, 1, 1, None) for i in ids],
                     [FileRow(f"/synthetic/{i:08d}.jpg", i, 0, 0) for i in ids], {})
        database += time.perf_counter() - began
    store.close()
    return write, database


def open_faiss(folder: Path) -> tuple[MetadataStore, FaissBackend, float]:
    """(database, backend, resident MiB that loading its FAISS index took)."""
    gc.collect()
    before = psutil.Process().memory_info().rss
    store = MetadataStore.open(folder / "index.db")
    backend = FaissBackend(folder, store, VectorFile(folder / "vectors.f32", Q, E, store.slots()))
    return store, backend, (psutil.Process().memory_info().rss - before) / 2**20


def build_faiss(folder: Path, kind: str, budget: int) -> tuple[Index, float, float, float]:
    """Open the index in ``folder``, building its FAISS index of ``kind`` under ``budget`` unless an earlier run
    (``--work``) left one. -> (open index, build seconds (recorded by the run that built it), resident MiB the
    build added (0 when reused), resident MiB of the loaded index)."""
    store, backend, _ = open_faiss(folder)
    built = 0.0
    if backend.index is None:
        before = psutil.Process().memory_info().rss
        store.set_meta({"index_type": kind, "memory_budget": str(budget)})
        began = time.perf_counter()
        backend.sync(kind, budget, progress=False)
        store.set_meta({"benchmark_build_seconds": str(time.perf_counter() - began)})
        built = (psutil.Process().memory_info().rss - before) / 2**20
        backend.close()
        store.close()
        del backend
    store, backend, loaded = open_faiss(folder)
    return Index(folder, store, backend), float(store.meta()["benchmark_build_seconds"]), built, loaded


def latency(search, queries: np.ndarray) -> tuple[float, float, list[np.ndarray]]:
    """(p50 ms, p99 ms, results) of one search per query."""
    search(queries[0])  # warm-up
    times, results = [], []
    for query in queries:
        began = time.perf_counter()
        results.append(search(query))
        times.append(time.perf_counter() - began)
    milliseconds = np.array(times) * 1000
    return float(np.percentile(milliseconds, 50)), float(np.percentile(milliseconds, 99)), results


def recall(found: list[np.ndarray], exact: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / len(e) for f, e in zip(found, exact)]))


def synthetic(num_images: int, num_queries: int, work: Path) -> None:
    print(f"\n### synthetic: {num_images:,} images x {Q} queries x {E} dims ({num_images * Q:,} vectors)\n")
    base = work / f"synthetic-{num_images}"
    if not (base / "index.db").exists():
        write, database = synthetic_index(base, num_images)
        print(f"vector file written in {write:.1f} s ({num_images * Q * E * 4 / 2**30:.2f} GiB), database rows in "
              f"{database:.1f} s")
    queries = text_queries(num_images, num_queries)
    vectors = VectorFile(base / "vectors.f32", Q, E, num_images).rows()  # memory-mapped [N, Q, E]
    exact = brute_force_top(vectors, queries, 10)
    brute, _, _ = latency(lambda q: brute_force_top(vectors, q[None], 10), queries[:10])
    print(f"brute force, one query (numpy over the memory-mapped vectors, {CHUNK} images at a time): {brute:.0f} ms")
    rows = []
    for kind, budget in (("auto", 8 * 2**30), ("hnsw", 8 * 2**30)):
        folder = base if kind == "hnsw" else work / f"synthetic-{num_images}-{kind}"
        if not folder.exists():  # the same vectors and rows, another FAISS index
            folder.mkdir()
            shutil.copy(base / "index.db", folder / "index.db")
            (folder / "vectors.f32").symlink_to(base / "vectors.f32")
            store = MetadataStore.open(folder / "index.db")
            store.set_meta({"ann_file": ""})
            store.close()
        index, seconds, resident, loaded = build_faiss(folder, kind, budget)
        size = (folder / index.store.meta()["ann_file"]).stat().st_size
        for candidates in (20, 40, 100):
            p50, p99, hits = latency(lambda q, index=index, c=candidates: index.search_vectors(q, k=10, candidates=c),
                                     queries)
            found = [np.array([h.image_id for h in result]) for result in hits]
            rows.append([index.backend.factory, f"{budget / 2**30:.0f} GiB", candidates,
                         f"{recall(found, exact):.3f}", f"{p50:.2f}", f"{p99:.2f}", f"{seconds:.0f}",
                         f"{seconds / (num_images * Q) * 1e6:.1f}", f"{size / 2**20:.0f}", f"{resident:.0f}",
                         f"{loaded:.0f}", f"{size / (num_images * Q):.0f}"])
            if kind == "auto" and candidates == 40:
                ratio_line(f"single-query latency, {index.backend.factory} over {num_images:,} images", brute / p50,
                           None, "brute force p50 / index p50, higher is better")
        index.close()
        gc.collect()
    table(["FAISS index", "budget", "candidates", "recall@10", "p50 ms", "p99 ms", "build s", "build µs/vector",
           "index file MiB", "build RSS MiB", "loaded RSS MiB", "bytes/vector"], rows)


def text_encoder_latency(model_source: str, count: int = 50) -> None:
    """The text side of a search, apart from the index: one caption through the Q-Former's text encoder."""
    from blip2.search import model_api

    model = model_api.load_model(model_source)
    texts = [f"there is a large red circle on the left {i}" for i in range(count)]
    p50, p99, _ = latency(lambda t: model_api.text_vectors(model, [t]), np.array(texts, dtype=object))
    print(f"text encoder ({model_source}): p50 {p50:.1f} ms, p99 {p99:.1f} ms per query")


# ---------------------------------------------------------------------------------------------- milvus-lite


def milvus(num_images: int, num_queries: int, work: Path) -> None:
    from blip2.search.milvus_backend import MilvusBackend

    print(f"\n### milvus-lite: {num_images:,} images x {Q} queries x {E} dims\n")
    queries = text_queries(num_images, num_queries)
    vectors = np.concatenate([image_chunk(start, min(CHUNK, num_images - start)) for start in range(0, num_images, CHUNK)])
    exact = brute_force_top(vectors, queries, 10)
    rows = []
    for kind in ("flat", "hnsw"):
        folder = work / f"milvus-{kind}"
        shutil.rmtree(folder, ignore_errors=True)  # milvus-lite builds from scratch each run
        folder.mkdir()
        store = MetadataStore.create(folder / "index.db", {
            "model": "<synthetic>", "identity": "synthetic", "num_queries": str(Q), "dim": str(E),
            "backend": "milvus", "index_type": kind, "memory_budget": str(2**34), "created": "benchmark",
            "uri": str(folder / "milvus.db"), "collection": "synthetic"})  # fmt: skip
        backend = MilvusBackend(str(folder / "milvus.db"), "synthetic", Q, E, 0, create=True)
        began = time.perf_counter()
        for start in range(0, num_images, CHUNK):
            count = min(CHUNK, num_images - start)
            backend.append(start, vectors[start:start + count])
            ids = range(start, start + count)
            store.commit([NewImage(i, f"{i:064x}", 0, 1, 1, None) for i in ids],
                         [FileRow(f"/synthetic/{i:08d}.jpg", i, 0, 0) for i in ids], {})
        insert = time.perf_counter() - began
        began = time.perf_counter()
        backend.sync(kind, 2**34, progress=False)
        indexing = time.perf_counter() - began
        index = Index(folder, store, backend)
        p50, p99, hits = latency(lambda q, index=index: index.search_vectors(q, k=10), queries)
        found = [np.array([h.image_id for h in result]) for result in hits]
        rows.append([backend.index_type, f"{recall(found, exact):.3f}", f"{p50:.1f}", f"{p99:.1f}", f"{insert:.0f}",
                     f"{indexing:.0f}", f"{(insert + indexing) / (num_images * Q) * 1e6:.1f}"])
        index.close()
    table(["Milvus index", "recall@10", "p50 ms", "p99 ms", "insert s", "index s", "µs/vector"], rows)


# ---------------------------------------------------------------------------------------------- shapes


def t2i_recall(index: Index, texts: list[str], owners: list[int], image_of_path: dict[str, int], rerank: int,
               ks=(1, 5, 10)) -> dict[str, float]:
    """Text-to-image R@K through the index, ties counted against the query (as ``recall_at_k``)."""
    hits_at = {k: 0 for k in ks}
    results = {}
    for text in dict.fromkeys(texts):  # identical strings are asked once, as evaluation scores them
        results[text] = [(image_of_path[h.path], h.score) for h in index.search(text, k=max(ks), rerank=rerank)]
    for text, owner in zip(texts, owners):
        ranked = results[text]
        own = [score for image, score in ranked if image == owner]
        if own:
            rank = sum(1 for image, score in ranked if image != owner and score >= own[0])
            for k in ks:
                hits_at[k] += rank < k
    return {f"t2i_r{k}": hits_at[k] / len(texts) for k in ks}


def shapes(model_source: str, data: Path, rerank: int, limit: int | None, work: Path) -> None:
    from blip2.data.datasets import read_records
    from blip2.eval.evaluate import evaluate
    from blip2.search import model_api

    print(f"\n### shapes test split: {model_source}, caption 2 of each image, re-rank top {rerank}\n")
    model = model_api.load_model(model_source)
    records = read_records(data / "captions.jsonl", "jsonl")[:limit]
    texts = [r.captions[2] for r in records]
    owners = list(range(len(records)))
    image_of_path = {str(Path(r.image).resolve()): i for i, r in enumerate(records)}
    began = time.perf_counter()
    reference = evaluate("retrieval", model, data, k=rerank, caption_index=2, limit=limit, progress=False)
    print(f"blip2 eval retrieval --caption-index 2 --k {rerank}: {time.perf_counter() - began:.0f} s")
    expected = {"itc": reference["itc"], "itc_itm": reference["itc_itm"]}
    manifest = work / "captions.jsonl"  # the first `limit` images (all by default), paths absolute
    manifest.write_text("".join(json.dumps({"image": r.image, "captions": list(r.captions)}) + "\n" for r in records))
    began = time.perf_counter()
    flat, report = Index.build([str(manifest)], work / "shapes-faiss", model, progress=False)
    print(f"index build: {report.encoded} images encoded in {time.perf_counter() - began:.0f} s")
    rows, worst = [], {}
    variants = [("FAISS Flat (exact)", lambda: flat)]
    for kind in ("hnsw", "ivfpq"):
        variants.append((f"FAISS {kind}", lambda kind=kind: Index.build(
            [str(manifest)], work / "shapes-faiss", model, index_type=kind, progress=False)[0]))
    variants.append(("Milvus FLAT (milvus-lite)", lambda: Index.build(
        [str(manifest)], work / "shapes-milvus", model, backend="milvus", progress=False)[0]))
    for name, opened in variants:
        index = opened()
        exact = index.backend.exact
        for reranked, key in ((0, "itc"), (rerank, "itc_itm")):
            began = time.perf_counter()
            got = t2i_recall(index, texts, owners, image_of_path, reranked)
            seconds = (time.perf_counter() - began) / len(set(texts))
            gaps = [abs(got[k] - expected[key][k]) for k in got]
            worst[(exact, key)] = max(worst.get((exact, key), 0.0), *gaps)
            rows.append([name, "ITM + ITC" if reranked else "ITC", *(f"{got[k]:.3f}" for k in got),
                         *(f"{expected[key][k]:.3f}" for k in got), f"{max(gaps):.3f}", f"{seconds * 1000:.0f}"])
    table(["index", "score", "R@1", "R@5", "R@10", "eval R@1", "eval R@5", "eval R@10", "max |diff|",
           "ms/query"], rows)
    for (exact, key), gap in sorted(worst.items()):
        bound = 0.0 if exact else 0.02
        print(f"{'exact' if exact else 'approximate'} backends, {key}: max |R@K - eval| = {gap:.3f} "
              f"(bar: {'equal' if exact else '<= 0.02'}: {'met' if gap <= bound + 1e-6 else 'MISSED'})")


def main() -> None:
    options = parser(__doc__.splitlines()[0])
    options.add_argument("--part", default="shapes,synthetic,milvus", help="comma-separated: shapes,synthetic,milvus")
    options.add_argument("--images", type=int, default=100_000, help="synthetic collection size")
    options.add_argument("--milvus-images", type=int, default=5_000)
    options.add_argument("--queries", type=int, default=200, help="synthetic queries timed")
    options.add_argument("--model", default=str(ROOT / "runs" / "demo" / "retrieval" / "final"))
    options.add_argument("--data", default=str(ROOT / "data" / "shapes" / "test"), help="shapes: the split searched")
    options.add_argument("--rerank", type=int, default=16)
    options.add_argument("--limit", type=int, default=None, help="shapes: only the first N test images")
    options.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = options.parse_args()
    setup(args, 1)
    if args.quick:  # small sizes (smaller ones given on the command line win)
        args.images, args.milvus_images = min(args.images, 3000), min(args.milvus_images, 1000)
        args.queries, args.limit = min(args.queries, 20), min(args.limit or 40, 40)
    print(f"uptime: {os.getloadavg()}")
    work = Path(args.work or tempfile.mkdtemp(prefix="blip2-search-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    parts = args.part.split(",")
    try:
        if "synthetic" in parts:
            synthetic(args.images, args.queries, work)
            text_encoder_latency(args.model)
        if "milvus" in parts:
            milvus(args.milvus_images, args.queries, work)
        if "shapes" in parts:
            shapes(args.model, Path(args.data), args.rerank, args.limit, work)
    finally:  # a temporary scratch folder goes even when a part fails
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(machine_line())


if __name__ == "__main__":
    main()
