"""``blip2.search.Index``: open, build, add to, remove from and search an image index (the Python API the CLI,
and later the server's ``/v1/search`` and the web app's search tab, call).

An index is a folder: ``index.db`` (SQLite: metadata and settings, see ``store``), and the vectors, either
``vectors.f32`` + ``ann-<n>.faiss`` (the FAISS backend) or a Milvus collection (``milvus.db`` for milvus-lite,
or a server at a URI). The model that built it is recorded by source and identity (``model_api.model_identity``);
searching with another model is refused.
"""

from __future__ import annotations

import datetime
import functools
import io
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
from PIL import Image

from blip2.data.images import load_image
from blip2.search import ann, model_api
from blip2.search.build import BuildReport, ingest
from blip2.search.errors import SearchIndexError, readable
from blip2.search.faiss_backend import FaissBackend
from blip2.search.milvus_backend import MilvusBackend
from blip2.search.reduce import top_images
from blip2.search.rerank import Reranker
from blip2.search.sources import read_bytes
from blip2.search.store import MetadataStore
from blip2.search.vectors import VectorFile

DATABASE, VECTORS, MILVUS_LITE = "index.db", "vectors.f32", "milvus.db"
Backends = Literal["faiss", "milvus"]


@dataclass
class Hit:
    """One retrieved image. ``score`` ranks the results: ITC (the best query's cosine with the text; for an image
    query the mean over its queries of their best match), or ITM + ITC for the re-ranked top K."""

    rank: int
    score: float
    itc: float
    itm: float | None
    image_id: int
    path: str
    caption: str | None
    sha256: str
    bytes: int
    width: int
    height: int
    duplicates: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RemoveReport:
    files: list[str]
    images: list[int]
    unmatched: list[str]


def _locked(method: Callable) -> Callable:
    """Run the method under the index's lock: one index may serve several threads (a server's workers)."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return run


class Index:
    """An open index. ``model`` (a loaded model, a model source, or None: the recorded one, loaded when a query
    needs it) must be the model that built the index. Its methods may be called from several threads (they take
    turns)."""

    def __init__(self, folder: Path, store: MetadataStore, backend: FaissBackend | MilvusBackend, model: Any = None):
        self.folder, self.store, self.backend = folder, store, backend
        self.settings = store.meta()
        self.num_queries, self.dim = int(self.settings["num_queries"]), int(self.settings["dim"])
        self._model = None
        self._reranker: Reranker | None = None
        self._lock = threading.RLock()
        self.removed = store.removed_mask(store.slots())
        if model is not None:
            self.use_model(model)

    # ---- opening and creating --------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | Path, model: Any = None, *, writable: bool = False) -> Index:
        """Open an existing index (``writable`` to add or remove; it then tidies what a killed writer left)."""
        folder = Path(folder)
        store = MetadataStore.open(folder / DATABASE)
        with readable(folder):
            return cls(folder, store, _open_backend(folder, store, writable), model)

    @classmethod
    def build(cls, sources: list[str], folder: str | Path, model: Any, *, backend: Backends | None = None,
              uri: str | None = None, collection: str | None = None, index_type: str | None = None,
              memory_budget: str | int | None = None, batch_size: int = 32,
              progress: bool = True) -> tuple[Index, BuildReport]:
        """Index ``sources`` into ``folder``, creating the index or resuming it (files already indexed are
        skipped); then (re)build the backend's search index. -> (the open index, what happened).

        backend: "faiss" (the default for a new index) or "milvus" (``uri``: a server; default milvus-lite in the
        folder). index_type: "auto" (the default for a new index), "flat", "hnsw" or "ivfpq"; memory_budget: bytes
        or "8G" (default: half this machine's memory). Given when resuming, they replace the recorded ones.
        """
        folder = Path(folder)
        if index_type not in (None, *ann.KINDS):
            raise SearchIndexError(f"--index-type {index_type!r}: choose one of {', '.join(ann.KINDS)}")
        if (folder / DATABASE).exists():
            index = cls.open(folder, model, writable=True)
            if backend not in (None, index.settings["backend"]):
                raise SearchIndexError(f"{folder} is a {index.settings['backend']} index, not {backend}: leave "
                                       f"--backend out to resume it, or build into a new --out folder")
            changes = {"index_type": index_type, "memory_budget": memory_budget and str(ann.parse_bytes(memory_budget))}
            index.store.set_meta({key: value for key, value in changes.items() if value})
            index.settings = index.store.meta()
        else:
            index = cls._create(folder, model, backend or "faiss", uri, collection, index_type or "auto",
                                ann.parse_bytes(memory_budget))
        return index, index.add(sources, batch_size=batch_size, progress=progress)

    @classmethod
    def _create(cls, folder: Path, model: Any, backend: str, uri: str | None, collection: str | None,
                index_type: str, budget: int) -> Index:
        if folder.exists() and not folder.is_dir():
            raise SearchIndexError(f"--out {folder} is a file; give a folder for the index")
        if backend == "faiss" and (uri or collection):
            raise SearchIndexError("--uri and --collection belong to --backend milvus")
        source, model = _resolve_model(model)
        num_queries, dim = model_api.embedding_shape(model)
        identity = model_api.model_identity(model)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"model": source, "identity": identity, "num_queries": str(num_queries), "dim": str(dim),
                "backend": backend, "index_type": index_type, "memory_budget": str(budget),
                "created": datetime.datetime.now().isoformat(timespec="seconds")}  # fmt: skip
        if backend == "milvus":
            meta["uri"] = uri or str((folder / MILVUS_LITE).resolve())
            meta["collection"] = collection or f"blip2_{identity[:12]}_{int(time.time() * 1000)}"
            MilvusBackend(meta["uri"], meta["collection"], num_queries, dim, 0, create=True).close()
        store = MetadataStore.create(folder / DATABASE, meta)
        return cls(folder, store, _open_backend(folder, store, writable=True), model)

    # ---- the model ------------------------------------------------------------------------------------

    @property
    def model(self) -> Any:
        """The model that built the index (loaded from its recorded source on first use)."""
        if self._model is None:
            if self.settings["model"].startswith("<"):
                raise SearchIndexError(f"{self.folder} was built with an in-memory model: pass that model to "
                                       "Index.open(folder, model)")
            self.use_model(self.settings["model"])
        return self._model

    @_locked
    def use_model(self, model: Any) -> None:
        """Attach a model (or a source to load); refused unless it is the model that built the index."""
        source, model = _resolve_model(model)
        num_queries, dim = model_api.embedding_shape(model)
        if model_api.model_identity(model) != self.settings["identity"]:
            shapes = (f" (it makes {num_queries} x {dim}-dim embeddings, the index holds {self.num_queries} x "
                      f"{self.dim})" if (num_queries, dim) != (self.num_queries, self.dim) else "")
            raise SearchIndexError(
                f"{self.folder} was built with another model ({self.settings['model']}, identity "
                f"{self.settings['identity'][:12]}), not {source}{shapes}: search it with --model "
                f"{self.settings['model']}, or build a new index with this model")
        self._model, self._reranker = model, None

    # ---- writing ---------------------------------------------------------------------------------------

    @_locked
    def add(self, sources: list[str], batch_size: int = 32, progress: bool = True) -> BuildReport:
        """Index the images of ``sources`` that are not indexed yet (see ``build.ingest``); then bring the
        backend's search index up to date."""
        with readable(self.folder):
            report = ingest(self.store, self.backend, self.model, sources, batch_size, progress)
            self.backend.sync(self.settings["index_type"], int(self.settings["memory_budget"]), progress)
            self.settings = self.store.meta()
            self.removed = self.store.removed_mask(self.store.slots())
        return report

    @_locked
    def remove(self, paths: list[str]) -> RemoveReport:
        """Remove files (a path, a folder: all under it, a tar shard: its members). An image leaves the results
        when its last file goes; its vectors stay (searches skip them), so adding it again costs no encoding."""
        targets = [str(Path(p).expanduser().resolve()) for p in paths]
        with readable(self.folder):
            files, images, unmatched = self.store.remove(targets)
            self.removed = self.store.removed_mask(self.store.slots())
        return RemoveReport(files, images, [paths[targets.index(t)] for t in unmatched])

    # ---- searching ------------------------------------------------------------------------------------

    @_locked
    def search(self, text: str | None = None, *, image: Any = None, k: int = 10, rerank: int = 0,
               candidates: int | None = None) -> list[Hit]:
        """The k best images for a text (text to image) or an image (image to image: a path or PIL image).

        rerank: re-score the ITC top ``rerank`` as ITM + ITC (BLIP-2's re-rank; text queries only).
        candidates: how many distinct images an approximate index re-scores exactly (default 4k, at least 40).
        """
        if (text is None) == (image is None):
            raise SearchIndexError("give a text query or an image query (--image PATH), one of the two")
        if k < 1 or rerank < 0:
            raise SearchIndexError(f"k must be >= 1 and rerank >= 0, got k={k}, rerank={rerank}")
        if rerank and image is not None:
            raise SearchIndexError("--rerank scores image-text pairs with ITM; it applies to text queries only")
        if text is not None and not text.strip():
            raise SearchIndexError("the query is empty: give some text")
        self._check_not_empty()
        if text is not None:
            try:
                query = model_api.text_vectors(self.model, [text])  # [1, E]
            except ValueError as error:
                raise SearchIndexError(str(error).replace("text 0 is", "the query is", 1)) from error
        else:
            query = model_api.image_vectors(self.model, [load_image(image)], 1)[0]  # [Q, E]
        hits = self.search_vectors(query, k=max(k, rerank), candidates=candidates)
        if rerank:
            hits = self._rerank(text, hits, rerank)
        return hits[:k]

    @_locked
    def search_vectors(self, query: np.ndarray, k: int = 10, candidates: int | None = None) -> list[Hit]:
        """The k best images for query vectors [m, E] (or [E]); no model needed."""
        query = np.asarray(query, np.float32).reshape(-1, np.shape(query)[-1])
        if query.shape[1] != self.dim:
            raise SearchIndexError(f"the query vectors have {query.shape[1]} dims; this index holds {self.dim}-dim "
                                   f"vectors (model {self.settings['model']})")
        self._check_not_empty()
        with readable(self.folder):
            need = candidates or max(4 * k, 40)
            ids, scores = top_images(self.backend, query, k, self.removed, need=need)
            return self._hits(ids, scores)

    def _hits(self, ids: np.ndarray, scores: np.ndarray) -> list[Hit]:
        rows = self.store.describe(ids.tolist())
        hits = []
        for position, image_id in enumerate(ids.tolist()):
            row = rows[image_id]
            hits.append(Hit(
                rank=position + 1, score=float(scores[position]), itc=float(scores[position]), itm=None, image_id=image_id,
                path=row["path"], caption=row["caption"], sha256=row["sha256"], bytes=row["bytes"],
                width=row["width"], height=row["height"], duplicates=row["duplicates"],
            ))  # fmt: skip
        return hits

    def _rerank(self, text: str, hits: list[Hit], top: int) -> list[Hit]:
        """Order the first ``top`` hits by ITM + ITC (ties by image id); the rest follow in ITC order."""
        if self._reranker is None:
            self._reranker = Reranker(self.model, self.read_image)
        head = hits[:top]
        ids = np.array([h.image_id for h in head], np.int64)
        itc = np.array([h.itc for h in head])
        final, itm = self._reranker.scores(text, ids, itc)
        order = np.lexsort((ids, -final))
        reranked = [hits[i] for i in order]
        for position, (hit, i) in enumerate(zip(reranked, order)):
            hit.rank, hit.score, hit.itm = position + 1, float(final[i]), float(itm[i])
        for position, hit in enumerate(hits[top:], start=len(reranked) + 1):
            hit.rank = position
        return reranked + hits[top:]

    def _check_not_empty(self) -> None:
        if not (~self.removed).any():
            raise SearchIndexError(f"{self.folder} holds no images: add some with blip2 index add {self.folder} SOURCE")

    @_locked
    def read_image(self, image_id: int) -> Image.Image:
        """The image's pixels, read from its (first) file."""
        row = self.store.describe([image_id])[image_id]
        shard, offset = row["location"]
        if shard is None:
            return load_image(row["path"])
        return load_image(read_bytes(row["path"], shard, offset, row["bytes"]), name=row["path"])

    def thumbnail(self, image_id: int, size: int = 192) -> bytes:
        """A JPEG thumbnail (longest side ``size``) of the image."""
        picture = self.read_image(image_id)
        picture.thumbnail((size, size))
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=85)
        return out.getvalue()

    # ---- describing and closing ------------------------------------------------------------------------

    @_locked
    def info(self) -> dict[str, Any]:
        with readable(self.folder):
            settings = {key: value for key, value in self.store.meta().items() if not key.startswith("ann_")}
            return {"index": str(self.folder), **settings, **self.store.counts(), **self.backend.describe(),
                    "failures": self.store.failures()}

    def close(self) -> None:
        self.backend.close()
        self.store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_backend(folder: Path, store: MetadataStore, writable: bool) -> FaissBackend | MilvusBackend:
    meta = store.meta()
    num_queries, dim, slots = int(meta["num_queries"]), int(meta["dim"]), store.slots()
    if meta["backend"] == "milvus":
        backend = MilvusBackend(meta["uri"], meta["collection"], num_queries, dim, slots)
        if writable:
            backend.drop_uncommitted()
        return backend
    vectors = VectorFile(folder / VECTORS, num_queries, dim, slots, writable=writable)
    return FaissBackend(folder, store, vectors)


def _resolve_model(model: Any) -> tuple[str, Any]:
    """(a source string to record, the loaded model) for a model or a source."""
    if isinstance(model, (str, Path)):
        path = Path(model).expanduser()
        source = str(path.resolve()) if path.exists() else str(model)
        return source, model_api.load_model(str(model))
    return getattr(model, "source", None) or "<in-memory model>", model
