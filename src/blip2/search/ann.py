"""Which FAISS index holds the vectors, chosen from the collection's size and the memory budget.

- ``Flat`` (``IndexFlatIP``): exact; every query reads every vector (about 8 ms per 100,000 vectors of 256 dims
  on one core here), so for small collections (``FLAT_MAX_VECTORS``) whose vectors fit the budget.
- ``IVF{nlist},PQ{m}x4fs``: inverted lists of 4-bit product-quantised codes scanned with SIMD ("fast scan"),
  m / 2 + 8 bytes per vector, the largest m that fits the budget: every larger collection. Its ranking is rough;
  the candidates are re-scored exactly (``reduce``). (8-bit codebooks train 20-100x slower here: k-means over 4-
  and 8-dim sub-vectors is slow in FAISS on this CPU, 16 s for PQ64 on 12,800 vectors.)
- ``HNSW32``: a graph over the full float32 vectors (4E + 272 bytes per vector), on request only: on 100,000
  synthetic images (3.2M vectors) it built in 976 s against IVF-PQ's 62 s, took 32x the memory, and found
  fewer of the true top 10 at the same latency (0.85 against 0.99 with 40 candidates; docs/search.md).
"""

from __future__ import annotations

import math
import re

import faiss
import numpy as np
from tqdm import tqdm

from blip2.search.errors import SearchIndexError

FLAT_MAX_VECTORS = 131_072  # 4,096 images of 32 queries: about 10 ms per exact query on one core here
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 64
IVF_NPROBE = 32
TRAIN_PER_LIST = 50  # IVF training vectors per list (FAISS wants 39 to 256)
KINDS = ("auto", "flat", "hnsw", "ivfpq")
ADD_CHUNK = 65_536


def parse_bytes(text: str | int | None) -> int:
    """"8G", "512M", "2GB", "1.5g" or a plain number of bytes -> bytes. None: half of this machine's memory."""
    if text is None:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise SearchIndexError(f"--memory-budget {text!r}: give a size such as 4G, 512M or 2GB")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " "))


def estimated_bytes(factory: str, num_vectors: int, dim: int) -> int:
    """Memory the FAISS index takes for ``num_vectors`` vectors (graph links, codes and ids included)."""
    if factory == "Flat":
        return num_vectors * dim * 4
    if factory.startswith("HNSW"):
        return num_vectors * (dim * 4 + HNSW_M * 2 * 4 + 16)
    nlist, m = (int(v) for v in re.fullmatch(r"IVF(\d+),PQ(\d+)x4fs", factory).groups())
    return num_vectors * (m // 2 + 8) + nlist * dim * 4


def ivfpq_factory(num_vectors: int, dim: int, budget: int) -> str:
    """IVF with about sqrt(n) lists (a power of two, at most n / TRAIN_PER_LIST) and the largest PQ that fits."""
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(num_vectors))))
    nlist = int(max(1, min(nlist, 65_536, num_vectors // TRAIN_PER_LIST)))
    sizes = [m for m in (dim // 4, dim // 8, dim // 16, dim // 32) if m >= 2 and m % 2 == 0 and dim % m == 0]
    for m in sizes:
        if estimated_bytes(f"IVF{nlist},PQ{m}x4fs", num_vectors, dim) <= budget:
            return f"IVF{nlist},PQ{m}x4fs"
    smallest = estimated_bytes(f"IVF{nlist},PQ{sizes[-1]}x4fs", num_vectors, dim)
    raise SearchIndexError(f"{num_vectors:,} vectors do not fit a --memory-budget of {readable_bytes(budget)} even as "
                           f"IVF-PQ codes ({readable_bytes(smallest)}): rerun blip2 index build with a larger "
                           "--memory-budget (what is encoded is kept), or use --backend milvus on a Milvus cluster")


def readable_bytes(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def choose_factory(kind: str, num_vectors: int, dim: int, budget: int) -> str:
    """The FAISS factory string for ``kind`` ("auto": Flat when small and it fits the budget, else IVF-PQ)."""
    if kind == "flat" or (kind == "auto" and num_vectors <= FLAT_MAX_VECTORS
                          and estimated_bytes("Flat", num_vectors, dim) <= budget):
        return "Flat"
    if kind == "hnsw":
        needed = estimated_bytes(f"HNSW{HNSW_M}", num_vectors, dim)
        if needed > budget:
            raise SearchIndexError(f"HNSW over {num_vectors:,} vectors needs {readable_bytes(needed)}, more than the "
                                   f"--memory-budget of {readable_bytes(budget)}: raise it, or use --index-type ivfpq")
        return f"HNSW{HNSW_M}"
    return ivfpq_factory(num_vectors, dim, budget)


def family(factory: str) -> str:
    return "flat" if factory == "Flat" else "hnsw" if factory.startswith("HNSW") else "ivfpq"


def build(factory: str, rows: np.ndarray, progress: bool = True) -> faiss.Index:
    """A new FAISS index over ``rows`` [slots, Q, E] (vector id = slot * Q + query): trained if it needs it."""
    slots, num_queries, dim = rows.shape
    flat = rows.reshape(slots * num_queries, dim)  # a view of the memory map
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if family(factory) == "hnsw":
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if not index.is_trained:
        nlist = faiss.extract_index_ivf(index).nlist
        size = min(len(flat), max(nlist, 256) * TRAIN_PER_LIST)
        sample = np.random.default_rng(0).choice(len(flat), size, replace=False)
        index.train(np.ascontiguousarray(flat[np.sort(sample)]))
    add(index, flat, progress)
    return index


def add(index: faiss.Index, flat: np.ndarray, progress: bool = True) -> None:
    """Add vectors [n, E] in chunks (ids continue from ``index.ntotal``), with a progress bar."""
    with tqdm(total=len(flat), unit="vector", desc="indexing vectors", disable=not progress or None) as bar:
        for start in range(0, len(flat), ADD_CHUNK):
            chunk = np.ascontiguousarray(flat[start:start + ADD_CHUNK], dtype=np.float32)
            index.add(chunk)
            bar.update(len(chunk))


def search(index: faiss.Index, queries: np.ndarray, n: int, ef_search: int = HNSW_EF_SEARCH,
           nprobe: int = IVF_NPROBE) -> tuple[np.ndarray, np.ndarray]:
    """(scores [m, n], vector ids [m, n]; -1 past the end). HNSW explores at least max(ef_search, n) nodes; IVF
    probes at least ``nprobe`` lists, more when n needs them (lists holding about 2n vectors)."""
    params = None
    if isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(efSearch=max(ef_search, n))
    elif isinstance(index, faiss.IndexIVF):
        per_list = max(1.0, index.ntotal / index.nlist)
        params = faiss.SearchParametersIVF(nprobe=int(min(index.nlist, max(nprobe, math.ceil(2 * n / per_list)))))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), n, params=params)
