"""`blip2 index build|add|remove|info` and `blip2 search` through the real CLI (``blip2.cli.main``): the happy path
agrees with the Python API, and every kind of bad input is one clear line (no traceback, no damaged index)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from blip2.cli import main
from blip2.search import Index

TEXT = "w1 photo of w2 cat"


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout, stderr (without transformers' weight-loading progress bars)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.replace("\r", "\n").splitlines(keepends=True)
    return code, out, "".join(line for line in lines if line.strip() and "Loading weights" not in line)


@pytest.fixture
def built(models, photos, tmp_path, capsys) -> Path:
    out = tmp_path / "index"
    code, stdout, _ = run(["index", "build", photos, "--out", out, "--model", models["a"], "--batch-size", 4], capsys)
    assert code == 0 and "12 images; this run: 13 files listed, 12 encoded, 0 already indexed, 1 duplicate(s), 0 failed" in stdout
    return out


def test_build_search_info_remove_add(built, models, photos, tmp_path, capsys):
    code, out, _ = run(["search", built, TEXT], capsys)
    lines = [line.split("\t") for line in out.splitlines()]
    expected = Index.open(built).search(TEXT, k=10)
    assert code == 0 and [(int(r), p) for r, _, p, _ in lines] == [(h.rank, h.path) for h in expected]
    assert [float(s) for _, s, _, _ in lines] == pytest.approx([h.score for h in expected], abs=1e-4)

    code, out, _ = run(["search", built, TEXT, "--k", 3, "--rerank", 5, "--json"], capsys)
    results = json.loads(out)["results"]
    reranked = Index.open(built).search(TEXT, k=3, rerank=5)
    assert [r["path"] for r in results] == [h.path for h in reranked] and all(r["itm"] is not None for r in results)
    assert results[0]["score"] == pytest.approx(results[0]["itm"] + results[0]["itc"], abs=1e-5)

    sheet = tmp_path / "sheet.html"
    code, out, err = run(["search", built, "--image", photos / "04.png", "--html", sheet, "--k", 5], capsys)
    page = sheet.read_text()
    assert code == 0 and f"wrote {sheet}" in err and page.count("data:image/jpeg;base64,") == 5
    assert "images like" in page and "04.png" in page and out.splitlines()[0].split("\t")[2] == str(photos / "04.png")

    code, out, _ = run(["index", "info", built, "--json"], capsys)
    info = json.loads(out)
    assert (info["images"], info["files"], info["faiss_index"], info["model"]) == (12, 13, "Flat", str(models["a"]))
    code, out, _ = run(["index", "info", built], capsys)
    assert re.search(r"images: 12\n", out) and "faiss_index: Flat" in out

    code, out, err = run(["index", "remove", built, photos / "03.png", photos / "sub", tmp_path / "nope.png"], capsys)
    assert code == 1 and "removed 3 file(s), 2 image(s)" in out and f"{tmp_path / 'nope.png'}: not in the index" in err
    code, out, _ = run(["index", "add", built, photos, "--json"], capsys)
    summary = json.loads(out)
    assert code == 0 and (summary["encoded"], summary["duplicates"], summary["unchanged"], summary["images"]) == (0, 3, 10, 12)


def test_unreadable_images_are_skipped_counted_and_reported(models, photos, tmp_path, capsys):
    (photos / "broken.png").write_bytes((photos / "00.png").read_bytes()[:60])
    (photos / "text.jpg").write_text("not a jpeg")
    out_dir = tmp_path / "index"
    code, out, err = run(["index", "build", photos, "--out", out_dir, "--model", models["a"]], capsys)
    assert code == 1 and "12 encoded" in out and "2 failed" in out
    assert f"skipped {photos / 'broken.png'}: corrupt or truncated image data" in err
    assert f"skipped {photos / 'text.jpg'}: not a readable image" in err and "Traceback" not in err
    code, out, _ = run(["index", "info", out_dir], capsys)
    assert "failed_files: 2" in out and "broken.png: corrupt" in out
    assert len(Index.open(out_dir).search(TEXT, k=20)) == 12


def break_database(index: Path) -> None:
    (index / "index.db").write_bytes(b"this is not a database" * 100)
    for side in index.glob("index.db-*"):
        side.unlink()


def truncate_vectors(index: Path) -> None:
    vectors = index / "vectors.f32"
    vectors.write_bytes(vectors.read_bytes()[:100])


def remove_everything(index: Path) -> None:
    Index.open(index, writable=True).remove([str(p) for p in Path(Index.open(index).info()["index"]).parent.glob("photos")])


BAD_INPUT = [  # (what, how to break it, argv after the index, the expected message)
    ("no index", None, ["search", "{tmp}/none", TEXT], "{tmp}/none does not exist: build one with blip2 index build"),
    ("not an index", None, ["search", "{tmp}", TEXT], "{tmp} holds no index (no index.db)"),
    ("empty index", remove_everything, ["search", "{index}", TEXT], "holds no images: add some with blip2 index add"),
    ("corrupt database", break_database, ["search", "{index}", TEXT], "is not a readable index database"),
    ("corrupt database (info)", break_database, ["index", "info", "{index}"], "is not a readable index database"),
    ("truncated vectors", truncate_vectors, ["search", "{index}", TEXT],
     "vectors.f32 holds 0 image rows but the index database commits 12: the index is damaged"),
    ("another model", None, ["search", "{index}", TEXT, "--model", "{b}"], "was built with another model ({a}, identity"),
    ("dimension mismatch", None, ["search", "{index}", TEXT, "--model", "{narrow}"],
     "(it makes 4 x 8-dim embeddings, the index holds 4 x 16)"),
    ("resume with another model", None, ["index", "build", "{photos}", "--out", "{index}", "--model", "{b}"],
     "was built with another model"),
    ("query too long", None, ["search", "{index}", "w1 " * 80],
     "the query is 162 Q-Former tokens ([CLS] and [SEP] included), more than its 64 positions: shorten it"),
    ("empty query", None, ["search", "{index}", "  "], "the query is empty"),
    ("no query", None, ["search", "{index}"], "give a text query or an image query (--image PATH), one of the two"),
    ("two queries", None, ["search", "{index}", TEXT, "--image", "{photos}/00.png"], "one of the two"),
    ("rerank an image query", None, ["search", "{index}", "--image", "{photos}/00.png", "--rerank", "3"],
     "--rerank scores image-text pairs with ITM; it applies to text queries only"),
    ("missing query image", None, ["search", "{index}", "--image", "{tmp}/gone.png"], "{tmp}/gone.png: file not found"),
    ("missing source", None, ["index", "build", "{tmp}/nothing", "--out", "{tmp}/new", "--model", "{a}"],
     "{tmp}/nothing: no such file or folder"),
    ("empty folder", None, ["index", "build", "{tmp}/models", "--out", "{tmp}/new", "--model", "{a}"], "no image files"),
    ("bad budget", None, ["index", "build", "{photos}", "--out", "{tmp}/new", "--model", "{a}", "--memory-budget", "lots"],
     "--memory-budget 'lots': give a size such as 4G"),
    ("budget too small", None, ["index", "build", "{photos}", "--out", "{tmp}/new", "--model", "{a}", "--memory-budget",
                                "10", "--index-type", "ivfpq"], "48 vectors do not fit a --memory-budget of 10 bytes even as IVF-PQ codes"),
    ("uri without milvus", None, ["index", "build", "{photos}", "--out", "{tmp}/new", "--model", "{a}", "--uri", "x"],
     "--uri and --collection belong to --backend milvus"),
    ("add to no index", None, ["index", "add", "{tmp}/none", "{photos}"], "{tmp}/none does not exist"),
]


@pytest.mark.parametrize("what, damage, argv, message", BAD_INPUT, ids=[case[0] for case in BAD_INPUT])
def test_bad_input_is_one_clear_line(built, models, photos, tmp_path, capsys, what, damage, argv, message):
    (tmp_path / "models").mkdir(exist_ok=True)
    if damage is not None:
        damage(built)
    names = {"tmp": tmp_path, "index": built, "photos": photos, **{k: str(v) for k, v in models.items()}}
    code, _, err = run([part.format(**names) for part in argv], capsys)
    command = " ".join(argv[:2]) if argv[0] == "index" else argv[0]
    assert code == 2 and err.startswith(f"blip2 {command}: error: ") and len(err.strip().splitlines()) == 1, err
    assert message.format(**names) in err, err


def test_a_damaged_faiss_file_costs_speed_not_results(built, capsys):
    expected = [h.path for h in Index.open(built).search(TEXT, k=12)]
    (ann,) = built.glob("ann-*.faiss")
    ann.write_bytes(b"garbage")
    code, out, err = run(["search", built, TEXT, "--k", 12], capsys)
    assert code == 0 and [line.split("\t")[2] for line in out.splitlines()] == expected
    assert "blip2.search.faiss_backend: " in err and "is unreadable" in err and "searching the vectors exactly" in err
    code, out, _ = run(["index", "add", built, built / "missing.png"], capsys)  # any writer rebuilds the FAISS index
    assert code == 1 and Index.open(built).info()["indexed_images"] == 12
