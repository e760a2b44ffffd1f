"""Which FAISS index holds the vectors, chosen from the collection's size and the memory budget.

- ``Flat`` (``IndexFlatIP``): exact; every query reads every vector (about 8 ms per 100,000 vectors of 256 dims
  on one core here), so only for small collections (``FLAT_MAX_VECTORS``).
- ``HNSW32``: a graph over the full float32 vectors; fast and accurate, about 4E + 272 bytes per vector.
- ``IVF{nlist},PQ{m}``: inverted lists of product-quantised codes, m + 8 bytes per vector, for collections whose
  vectors do not fit the budget. Its ranking is rough: the candidates are re-scored exactly (``reduce``).
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
    nlist, m, bits = re.fullmatch(r"IVF(\d+),PQ(\d+)(?:x(\d+))?", factory).groups()
    return num_vectors * (int(m) * int(bits or 8) // 8 + 8) + int(nlist) * dim * 4


def ivfpq_factory(num_vectors: int, dim: int, budget: int) -> str:
    """IVF with about 4 sqrt(n) lists (a power of two, at most n / TRAIN_PER_LIST) and the largest PQ that fits."""
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(num_vectors))))
    nlist = int(max(1, min(nlist, 65_536, num_vectors // TRAIN_PER_LIST)))
    bits = "" if num_vectors >= 256 * TRAIN_PER_LIST else "x4"  # 8-bit codebooks need 256 centroids' worth
    for m in (dim // 4, dim // 8, dim // 16, dim // 32):
        if m >= 1 and dim % m == 0 and estimated_bytes(f"IVF{nlist},PQ{m}{bits}", num_vectors, dim) <= budget:
            return f"IVF{nlist},PQ{m}{bits}"
    smallest = estimated_bytes(f"IVF{nlist},PQ{max(1, dim // 32)}{bits}", num_vectors, dim)
    raise SearchIndexError(f"{num_vectors:,} vectors do not fit a --memory-budget of {readable_bytes(budget)} even as "
                           f"IVF-PQ codes ({readable_bytes(smallest)}): rerun blip2 index build with a larger "
                           "--memory-budget (what is encoded is kept), or use --backend milvus on a Milvus cluster")


def readable_bytes(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def choose_factory(kind: str, num_vectors: int, dim: int, budget: int) -> str:
    """The FAISS factory string for ``kind`` ("auto" decides from the size and the budget)."""
    if kind == "flat" or (kind == "auto" and num_vectors <= FLAT_MAX_VECTORS
                          and estimated_bytes("Flat", num_vectors, dim) <= budget):
        return "Flat"
    if kind == "hnsw" or (kind == "auto" and estimated_bytes(f"HNSW{HNSW_M}", num_vectors, dim) <= budget):
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
