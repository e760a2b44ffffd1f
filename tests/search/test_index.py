"""``blip2.search.Index`` on a tiny saved model: build, search (text, image, re-rank) against brute force over the
model's own embeddings, duplicates, metadata, resume, add, remove, shards and manifests, model identity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip2.pipeline import load
from blip2.search import Index, SearchIndexError, model_identity

TEXT = "w1 photo of w2 cat"


def image_files(root: Path) -> list[Path]:
    """The distinct images of the ``photos`` fixture in index order (sorted paths; dup.png is 03.png)."""
    return sorted(p for p in root.rglob("*.png") if p.name != "dup.png")


def brute_force(model, files: list[Path], query: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """(image_embeddings @ text).amax(queries), mean over the query's rows; ordered by score, ties by index."""
    embeds = model.image_embeddings([str(f) for f in files]).double()  # [N, Q, E]
    scores = torch.einsum("nqe,me->nqm", embeds, query.double()).amax(dim=1).mean(dim=1)  # [N]
    order = sorted(range(len(files)), key=lambda i: (-scores[i].item(), i))
    return order, scores


def test_build_indexes_each_content_once_and_text_search_is_brute_force(models, photos, tmp_path):
    index, report = Index.build([str(photos)], tmp_path / "index", str(models["a"]), progress=False)
    files = image_files(photos)
    assert (report.files, report.encoded, report.duplicates, report.failed) == (13, 12, 1, {})
    model = load(models["a"])
    order, scores = brute_force(model, files, model.text_embeddings(TEXT))
    hits = index.search(TEXT, k=12)
    assert [Path(h.path) for h in hits] == [files[i] for i in order]
    np.testing.assert_allclose([h.score for h in hits], scores[order].numpy(), atol=1e-6)
    assert [h.rank for h in hits] == list(range(1, 13)) and all(h.itm is None for h in hits)
    by_name = {Path(h.path).name: h for h in hits}
    assert by_name["03.png"].duplicates == [str(photos / "dup.png")]
    assert by_name["01.png"].caption == "w1 caption" and by_name["05.png"].caption is None
    assert (by_name["05.png"].width, by_name["05.png"].height) == (25, 25)
    assert by_name["05.png"].bytes == (photos / "05.png").stat().st_size
    assert len(index.search(TEXT, k=3)) == 3
    info = index.info()
    assert (info["images"], info["files"], info["faiss_index"], info["exact"]) == (12, 13, "Flat", True)
    assert info["identity"] == model_identity(model) and info["model"] == str(models["a"])


def test_image_query_and_rerank_follow_their_definitions(models, photos, tmp_path):
    index, _ = Index.build([str(photos)], tmp_path / "index", str(models["a"]), progress=False)
    files = image_files(photos)
    model = load(models["a"])
    order, _ = brute_force(model, files, model.image_embeddings(str(files[4]))[0])
    assert [Path(h.path) for h in index.search(image=str(files[4]), k=12)] == [files[i] for i in order]
    assert order[0] == 4

    itc_order, itc = brute_force(model, files, model.text_embeddings(TEXT))
    with torch.no_grad():
        features = model.model.image_features(model.pixel_values([str(f) for f in files]))
        itm = model.model.itm_logits(features, *model.tokenize_text([TEXT] * len(files)))[:, 1]  # the "match" logit
    top = itc_order[:5]
    final = {i: (itm[i] + itc[i].float()).item() for i in top}
    expected = sorted(top, key=lambda i: (-final[i], i)) + itc_order[5:]
    hits = index.search(TEXT, k=12, rerank=5)
    assert [Path(h.path) for h in hits] == [files[i] for i in expected]
    for hit in hits[:5]:
        i = files.index(Path(hit.path))
        assert hit.score == pytest.approx(final[i], abs=1e-5) and hit.itm == pytest.approx(itm[i].item(), abs=1e-5)
        assert hit.itc == pytest.approx(itc[i].item(), abs=1e-6)
    assert all(h.itm is None for h in hits[5:]) and [h.rank for h in hits] == list(range(1, 13))
    assert [h.image_id for h in index.search(TEXT, k=3, rerank=5)] == [h.image_id for h in hits[:3]]


def test_rerun_resumes_add_and_remove_keep_the_index_current(models, photos, picture, tmp_path):
    out = tmp_path / "index"
    Index.build([str(photos)], out, str(models["a"]), progress=False)[0].close()
    index, report = Index.build([str(photos)], out, str(models["a"]), progress=False)
    assert (report.encoded, report.unchanged) == (0, 13)

    more = tmp_path / "more"
    more.mkdir()
    picture(50).save(more / "new.png")
    (more / "copy.png").write_bytes((photos / "07.png").read_bytes())
    report = index.add([str(more)], progress=False)
    assert (report.encoded, report.duplicates) == (1, 1) and index.info()["images"] == 13
    assert any(Path(h.path) == more / "new.png" for h in index.search(TEXT, k=13))

    removed = index.remove([str(photos / "03.png")])  # dup.png still holds that image
    assert (len(removed.files), removed.images, removed.unmatched) == (1, [], [])
    paths = {h.path for h in index.search(TEXT, k=20)}
    assert str(photos / "dup.png") in paths and str(photos / "03.png") not in paths and len(paths) == 13
    removed = index.remove([str(photos / "dup.png"), str(photos / "sub"), str(tmp_path / "nothing.png")])
    assert len(removed.files) == 3 and len(removed.images) == 3 and removed.unmatched == [str(tmp_path / "nothing.png")]
    hits = index.search(TEXT, k=20)
    assert len(hits) == 10 and not any("sub" in h.path or h.path.endswith(("03.png", "dup.png")) for h in hits)

    report = index.add([str(photos / "03.png")], progress=False)  # the same content again: revived, not encoded
    assert (report.encoded, report.duplicates) == (0, 1) and len(index.search(TEXT, k=20)) == 11

    picture(99).save(photos / "05.png")  # changed content at an indexed path: indexed again, the old image leaves
    os.utime(photos / "05.png", ns=(1, 1))
    report = index.add([str(photos)], progress=False)
    assert (report.encoded, report.duplicates) == (1, 3)  # 05.png's new content; dup.png, sub/10, sub/11 revived
    assert (index.info()["images"], index.info()["slots"]) == (13, 14)
    assert str(photos / "05.png") in {h.path for h in index.search(image=str(photos / "05.png"), k=1)}


def test_shards_and_manifests_are_sources_too(models, picture, shard, tmp_path):
    shard = shard(tmp_path / "shard-000.tar", [1, 2, 3])
    index, report = Index.build([str(shard)], tmp_path / "index", str(models["a"]), progress=False)
    assert report.encoded == 3
    hit = {Path(h.path).name: h for h in index.search("w2", k=3)}[f"{shard.name}:000002.png"]
    assert hit.caption == "w2"
    assert np.array_equal(np.asarray(index.read_image(hit.image_id)), np.asarray(picture(102)))

    (tmp_path / "images").mkdir()
    for i in range(3):
        picture(200 + i).save(tmp_path / "images" / f"{i}.png")
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"images/{i}.png", "captions": [f"w{i} first", "second"]}) + "\n"
                                for i in range(3)))
    report = index.add([str(manifest)], progress=False)
    assert report.encoded == 3
    assert {h.caption for h in index.search("w1", k=6)} >= {"w0 first", "w1 first", "w2 first"}


def test_the_model_identity_guards_the_index(models, photos, tmp_path):
    a = load(models["a"])
    assert model_identity(a) == model_identity(load(models["a"])) != model_identity(load(models["b"]))
    index, _ = Index.build([str(photos)], tmp_path / "index", a, progress=False)  # an in-memory model
    assert index.search(TEXT, k=1)
    with pytest.raises(SearchIndexError, match="another model .* search it with --model"):
        Index.open(tmp_path / "index", str(models["b"]))
    with pytest.raises(SearchIndexError, match="in-memory model"):
        Index.open(tmp_path / "index").search(TEXT)
    assert Index.open(tmp_path / "index", a).search(TEXT, k=2)[0].path == index.search(TEXT, k=1)[0].path
    with pytest.raises(SearchIndexError, match="query vectors have 8 dims; this index holds 16-dim"):
        index.search_vectors(np.ones(8, np.float32))
    assert isinstance(index.read_image(0), Image.Image)


def test_one_index_serves_several_threads(models, photos, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    index, _ = Index.build([str(photos)], tmp_path / "index", str(models["a"]), progress=False)
    queries = [TEXT, "cat", "w3 w4", "dog on the mat"] * 3
    expected = [[h.path for h in index.search(q, k=5)] for q in queries]
    with ThreadPoolExecutor(4) as pool:
        found = list(pool.map(lambda q: [h.path for h in index.search(q, k=5)], queries))
    assert found == expected
