"""Image search over a collection: ``Index`` builds, updates and searches an index of BLIP-2 image embeddings
(one vector per Q-Former query, scored by the maximum over queries), with FAISS embedded or Milvus.

    from blip2.search import Index
    index, report = Index.build(["photos/"], "photos.index", "runs/demo/retrieval/final")
    hits = index.search("a red circle on the left", k=10, rerank=16)
"""

from blip2.search.build import BuildReport
from blip2.search.errors import SearchIndexError
from blip2.search.index import Hit, Index, RemoveReport
from blip2.search.model_api import model_identity

__all__ = ["BuildReport", "Hit", "Index", "RemoveReport", "SearchIndexError", "model_identity"]
