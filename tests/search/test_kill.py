"""A build killed with SIGKILL (a real subprocess) leaves an index that opens and searches exactly what it
committed; rerunning the build encodes only the rest and ends where an uninterrupted build does (the same
ranking, scores equal to rounding)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np

from blip2.pipeline import load
from blip2.search import Index

IMAGES = 300


def committed(database) -> int:
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def test_sigkill_mid_build_keeps_what_was_committed(models, picture, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(IMAGES):
        picture(1000 + i, (16, 16)).save(folder / f"{i:03d}.png")
    out = tmp_path / "index"
    command = [sys.executable, "-m", "blip2.cli", "index", "build", str(folder), "--out", str(out),
               "--model", str(models["a"]), "--batch-size", "1"]
    build = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    while build.poll() is None and committed(out / "index.db") < 5:
        time.sleep(0.005)
    build.send_signal(signal.SIGKILL)
    assert build.wait() == -signal.SIGKILL

    kept = committed(out / "index.db")
    assert 5 <= kept < IMAGES
    index = Index.open(out)
    info = index.info()
    assert (info["images"], info["faiss_index"].startswith("none"), info["unindexed_images"]) == (kept, True, kept)
    files = sorted(folder.glob("*.png"))[:kept]  # a folder is indexed in path order
    model = load(models["a"])
    stored = index.backend.vectors(np.arange(kept))
    np.testing.assert_allclose(stored, model.image_embeddings([str(f) for f in files]).numpy(), atol=1e-6)
    for probe in (0, kept - 1):
        assert index.search(image=str(files[probe]), k=1)[0].path == str(files[probe])
    assert len(index.search("w1 w2", k=IMAGES)) == kept
    index.close()

    resumed, report = Index.build([str(folder)], out, str(models["a"]), progress=False)
    assert (report.unchanged, report.encoded) == (kept, IMAGES - kept)
    fresh, _ = Index.build([str(folder)], tmp_path / "fresh", str(models["a"]), progress=False)
    for query in ("w1 w2", "cat on the mat"):  # the killed build encoded one image per batch, the others 32: on
        # some CPUs (AVX2) a batch's size changes the last bits of its embeddings, so scores agree to rounding
        hits, expected = resumed.search(query, k=50), fresh.search(query, k=50)
        assert [h.path for h in hits] == [h.path for h in expected]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in expected], rtol=0, atol=1e-6)
    assert (out / "vectors.f32").stat().st_size == (tmp_path / "fresh" / "vectors.f32").stat().st_size
