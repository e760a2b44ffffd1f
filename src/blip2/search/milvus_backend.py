"""The Milvus backend: the vectors live in a Milvus collection (milvus-lite embedded in a local file, or a Milvus
server or cluster at ``uri``); the metadata stays in the index's SQLite database.

One row per vector: ``id`` = slot * Q + query (primary key), ``image_id`` = slot, ``vector``. Search uses Milvus's
group-by on ``image_id``, so each returned row is one image with its best vector: exactly max over queries.
The exact vectors for re-scoring are read back from the collection. Rows are inserted before the database
commits their images; rows of uncommitted slots (a build killed in between) are deleted by the next writer
and ignored by searches. Removed images keep their rows (filtered out by the search, as in the FAISS backend),
so adding the same content again needs no encoding; a rebuild reclaims the space.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from blip2.search.errors import SearchIndexError

CONNECT_TIMEOUT = 10  # seconds
INDEX_TIMEOUT = 3600  # seconds to wait for Milvus to build an index
QUERY_LIMIT = 16_384  # Milvus returns at most this many rows (or groups) per request
INSERT_ROWS = 4_096
FLAT_MAX_VECTORS = 131_072  # as the FAISS backend: FLAT (exact) below, HNSW above
INDEX_TYPES = {"flat": "FLAT", "hnsw": "HNSW", "ivfpq": "IVF_PQ"}
HNSW_PARAMS = {"M": 32, "efConstruction": 64}
SEARCH_PARAMS = {"FLAT": {}, "HNSW": {"ef": 64}, "IVF_PQ": {"nprobe": 32}}

logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # its RPC errors come back as exceptions; we word them


class MilvusBackend:
    grouped = True

    def __init__(self, uri: str, collection: str, num_queries: int, dim: int, slots: int, create: bool = False):
        from pymilvus import (
            MilvusClient,  # imported here: it takes 1.6 s, which FAISS users need not pay
        )

        self.uri, self.collection, self.num_queries, self.dim, self.slots = uri, collection, num_queries, dim, slots
        try:
            self.client = MilvusClient(uri, timeout=CONNECT_TIMEOUT)
            exists = self.client.has_collection(collection)
        except Exception as error:  # pymilvus raises MilvusException and gRPC errors alike
            raise SearchIndexError(f"cannot reach Milvus at {uri} ({_first_line(error)}): start the server, or check "
                                   "--uri") from error
        if not exists and not create:
            raise SearchIndexError(f"Milvus at {uri} has no collection {collection!r}: the vectors of this index are "
                                   "gone; rebuild it with blip2 index build")
        if not exists:
            self._create()
        self._check_dim()
        if not self.client.list_indexes(collection):  # a writer killed while it switched index types
            self.client.create_index(collection, self._index_params("FLAT"))
        self.client.load_collection(collection)
        self.index_type = self._index_type()

    def _create(self) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("image_id", DataType.INT64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        self.client.create_collection(self.collection, schema=schema, index_params=self._index_params("FLAT"))

    def _index_params(self, index_type: str):
        params = self.client.prepare_index_params()
        params.add_index("vector", index_type=index_type, metric_type="IP",
                         params=HNSW_PARAMS if index_type == "HNSW" else {})
        return params

    def _check_dim(self) -> None:
        fields = {f["name"]: f for f in self.client.describe_collection(self.collection)["fields"]}
        dim = int(fields.get("vector", {}).get("params", {}).get("dim", -1))
        if dim != self.dim or "image_id" not in fields:
            raise SearchIndexError(f"Milvus collection {self.collection!r} at {self.uri} holds {dim}-dim vectors, this "
                                   f"index {self.dim}-dim ones: it belongs to another index; pick another --collection")

    def _index_type(self) -> str:
        return self.client.describe_index(self.collection, "vector").get("index_type", "FLAT")

    @property
    def exact(self) -> bool:
        return self.index_type == "FLAT"

    def capacity(self) -> int:
        return min(self.slots, QUERY_LIMIT)

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Best n images of each query row (group-by image_id: each image's best vector)."""
        results = self.client.search(
            self.collection, data=np.asarray(queries, np.float32).tolist(), anns_field="vector", limit=n,
            group_by_field="image_id", output_fields=["image_id"],
            search_params={"metric_type": "IP", "params": SEARCH_PARAMS.get(self.index_type, {})},
        )  # fmt: skip
        scores = np.full((len(queries), n), -np.inf, np.float32)
        ids = np.full((len(queries), n), -1, np.int64)
        for row, hits in enumerate(results):
            for column, hit in enumerate(hits[:n]):
                scores[row, column], ids[row, column] = hit["distance"], hit["entity"]["image_id"]
        return scores, ids

    def vectors(self, image_ids: np.ndarray) -> np.ndarray:
        """Exact vectors of the images, read back from the collection: [len, Q, E]."""
        out = np.zeros((len(image_ids), self.num_queries, self.dim), np.float32)
        ids = (np.asarray(image_ids, np.int64)[:, None] * self.num_queries + np.arange(self.num_queries)).ravel()
        position = {vector_id: row for row, vector_id in enumerate(ids.tolist())}
        rows = out.reshape(-1, self.dim)  # a view: [len * Q, E]
        for start in range(0, len(ids), QUERY_LIMIT):  # by primary key: fast, unlike a filter on image_id
            for found in self.client.get(self.collection, ids=ids[start:start + QUERY_LIMIT].tolist(),
                                         output_fields=["vector"]):
                rows[position[found["id"]]] = found["vector"]
        return out

    def append(self, first_slot: int, vectors: np.ndarray) -> None:
        """Insert the vectors of new images (slots first_slot ...); the database commits them next."""
        flat = vectors.reshape(-1, self.dim)
        first_id = first_slot * self.num_queries
        for start in range(0, len(flat), INSERT_ROWS):
            rows = [{"id": first_id + i, "image_id": (first_id + i) // self.num_queries, "vector": flat[i].tolist()}
                    for i in range(start, min(start + INSERT_ROWS, len(flat)))]
            self.client.insert(self.collection, rows)
        self.slots = first_slot + len(vectors)

    def drop_uncommitted(self) -> None:
        """Delete rows of slots the database never committed (a build killed between insert and commit)."""
        self.client.delete(self.collection, filter=f"image_id >= {self.slots}")

    def sync(self, kind: str, budget: int, progress: bool = True) -> None:
        """Seal what was inserted; switch the collection's vector index to the kind its size calls for (FLAT when
        small, else HNSW)."""
        if kind == "auto":
            kind = "flat" if self.slots * self.num_queries <= FLAT_MAX_VECTORS else "hnsw"
        from pymilvus import MilvusException

        wanted = INDEX_TYPES[kind]
        self.client.flush(self.collection)  # sealed segments: searching growing ones is ten times slower
        if wanted != self.index_type:
            self.client.release_collection(self.collection)
            self.client.drop_index(self.collection, "vector")
            try:
                self.client.create_index(self.collection, self._index_params(wanted))
            except MilvusException as error:  # pymilvus retried a long call whose first try went on building it
                if "already exists" not in str(error):
                    raise
            self._wait_until_indexed()
            self.client.load_collection(self.collection)
            self.index_type = wanted

    def _wait_until_indexed(self) -> None:
        deadline = time.monotonic() + INDEX_TIMEOUT
        while self.client.describe_index(self.collection, "vector").get("state") != "Finished":
            if time.monotonic() > deadline:
                raise SearchIndexError(f"Milvus did not finish indexing {self.collection!r} in {INDEX_TIMEOUT} s; "
                                       "rerun the command to wait again")
            time.sleep(1)

    def describe(self) -> dict:
        return {"milvus_uri": self.uri, "collection": self.collection, "milvus_index": self.index_type,
                "vectors": int(self.client.get_collection_stats(self.collection)["row_count"]), "exact": self.exact}

    def close(self) -> None:
        self.client.close()


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
