"""`blip2 index build|add|remove|info` and `blip2 search`: an index of a collection's images, searched by text or
by image (blip2.search.Index)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Literal

from blip2.search import BuildReport, Index
from blip2.search.ann import readable_bytes
from blip2.search.contact_sheet import write_contact_sheet

SHOW_FAILURES = 20


def index_build(
    source: list[str],
    *,
    out: str,
    model: str = "default",
    backend: Annotated[Literal["faiss", "milvus"] | None, "where the vectors go (default: faiss)"] = None,
    uri: Annotated[str | None, "a Milvus server, http://HOST:19530 (default: milvus-lite in --out)"] = None,
    collection: Annotated[str | None, "the Milvus collection (default: a new one named after the model)"] = None,
    index_type: Annotated[Literal["auto", "flat", "hnsw", "ivfpq"] | None, "the FAISS index (default: auto)"] = None,
    memory_budget: Annotated[str | None, "for auto, e.g. 8G (default: half this machine's memory)"] = None,
    batch_size: int = 32,
    json_output: bool = False,
) -> int:
    """Index the images of SOURCE (folders, searched recursively; manifests; WebDataset .tar shards) into the
    folder --out.

    Each image is encoded once into its Q query vectors; images go in chunks of --batch-size, each committed as
    it is done: an interrupted build keeps what it encoded and a rerun skips it. A file whose content is already
    indexed is recorded as a duplicate, not encoded again; an unreadable image is skipped, reported and counted
    (exit status 1). The model is recorded; searching with another one is refused.

    --backend faiss (embedded, the default) keeps the vectors in the index folder under a FAISS index chosen from the size
    and --memory-budget (default: half this machine's memory): exact (flat) for small collections, HNSW, or
    IVF-PQ with exact re-scoring; --index-type forces one (auto by default). Rerunning a build with another
    --memory-budget or --index-type rebuilds the FAISS index from the stored vectors, without encoding again. --backend milvus stores them in Milvus: milvus-lite in
    the index folder, or a server with --uri http://HOST:19530 (--collection names the collection).
    """
    index, report = Index.build(source, out, model, backend=backend, uri=uri, collection=collection,
                                index_type=index_type, memory_budget=memory_budget, batch_size=batch_size)
    with index:
        return _report("index build", _report_dict(index, source, report), json_output)


def index_add(index: str, source: list[str], batch_size: int = 32, json_output: bool = False) -> int:
    """Add the images of SOURCE (folders, manifests, shards, files) to INDEX, with the model that built it.

    Files already indexed (same path, size and modification time) are skipped; a changed file is indexed again.
    """
    with Index.open(index, writable=True) as opened:
        return _report("index add", _report_dict(opened, source, opened.add(source, batch_size=batch_size)), json_output)


def index_remove(index: str, paths: list[str], json_output: bool = False) -> int:
    """Remove files from INDEX: image files, folders (everything indexed under them) or tar shards (their members).

    An image leaves the results when its last file is removed. A path that matches nothing is reported (exit
    status 1).
    """
    with Index.open(index, writable=True) as opened:
        report = opened.remove(paths)
    summary = {"removed_files": len(report.files), "removed_images": len(report.images), "unmatched": report.unmatched}
    if json_output:
        print(json.dumps(summary, indent=2))
    else:
        print(f"removed {len(report.files)} file(s), {len(report.images)} image(s) from {index}")
    for path in report.unmatched:
        print(f"blip2 index remove: {path}: not in the index", file=sys.stderr)
    return 1 if report.unmatched else 0


def index_info(index: str, json_output: bool = False) -> None:
    """Describe INDEX: its model, size, backend, search index and failed files."""
    with Index.open(index) as opened:
        info = opened.info()
    if json_output:
        print(json.dumps(info, indent=2))
        return
    failures = info.pop("failures")
    for key, value in info.items():
        size = key.endswith("_bytes") or key == "memory_budget"
        print(f"{key:>18}: {readable_bytes(int(value)) if size else value}")
    for path, cause in failures.items():
        print(f"{'failed':>18}: {path}: {cause}")


def search(
    index: str,
    query: str | None = None,
    /,
    image: Annotated[str | None, "search by this image instead of a text"] = None,
    k: int = 10,
    rerank: int = 0,
    model: Annotated[str | None, "the model that built the index (default: the recorded one)"] = None,
    candidates: Annotated[int | None, "images an approximate index re-scores exactly (default: 4 x k, >= 40)"] = None,
    json_output: bool = False,
    html: Annotated[str | None, "also write a contact sheet (an HTML file) here"] = None,
) -> None:
    """Search INDEX for the images that best match QUERY (text), or --image PATH (image to image).

    Prints "RANK<TAB>SCORE<TAB>PATH<TAB>CAPTION" per result (or JSON with --json). The score is ITC, the best
    query vector's cosine with the text (max over queries); --rerank K re-scores the top K as ITM + ITC, as
    BLIP-2 does. --html writes a contact sheet (one self-contained file with thumbnails and scores). The model is
    the one that built the index (--model must name the same one). --candidates: how many distinct images an
    approximate index re-scores exactly (default: 4 x k, at least 40).
    """
    with Index.open(index, model) as opened:
        hits = opened.search(query, image=image, k=k, rerank=rerank, candidates=candidates)
        if html:
            label = f"“{query}”" if query is not None else f"images like {image}"
            detail = (f"{len(hits)} results from {index} ({opened.info()['images']} images)"
                      + (f", top {rerank} re-ranked by ITM + ITC" if rerank else ""))
            write_contact_sheet(html, f"blip2 search: {label}", detail, hits, opened.thumbnail)
    if json_output:
        print(json.dumps({"query": query, "image": image, "results": [h.as_dict() for h in hits]}, indent=2))
    else:
        for hit in hits:
            print(f"{hit.rank}\t{hit.score:.4f}\t{hit.path}\t{hit.caption or ''}")
    if html:
        print(f"wrote {html}", file=sys.stderr)


# ---- helpers --------------------------------------------------------------------------------------------------------


def _report_dict(index: Index, sources: list[str], report: BuildReport) -> dict:
    return {"index": str(index.folder), "sources": sources, **report.as_dict(), "images": index.info()["images"],
            "seconds": round(report.seconds, 2)}


def _report(command: str, summary: dict, json_output: bool) -> int:
    """Print what a build or add did; failed files go to stderr, and make the exit status 1."""
    failed = summary["failed"]
    if json_output:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['index']}: {summary['images']} images; this run: {summary['files']} files listed, "
              f"{summary['encoded']} encoded, {summary['unchanged']} already indexed, {summary['duplicates']} "
              f"duplicate(s), {len(failed)} failed ({summary['seconds']} s)")
    for path, cause in list(failed.items())[:SHOW_FAILURES]:
        print(f"blip2 {command}: skipped {path}: {cause}", file=sys.stderr)
    if len(failed) > SHOW_FAILURES:
        print(f"blip2 {command}: ... and {len(failed) - SHOW_FAILURES} more (blip2 index info lists them)",
              file=sys.stderr)
    return 1 if failed else 0
