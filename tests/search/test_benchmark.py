"""Smoke test of benchmarks/search.py: its synthetic and milvus-lite parts run end to end on small sizes, the
exact index finds exactly the brute-force top 10, and the tables come out."""

from __future__ import annotations

import re
import runpy
import sys
import tempfile
from pathlib import Path

import pytest

from blip2.demo.shapes import ShapesConfig, generate

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "search.py"


def test_search_benchmark_runs_and_the_exact_index_recalls_everything(models, monkeypatch, capsys, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARK.parent))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setattr(sys, "argv", ["search.py", "--quick", "--part", "synthetic,milvus", "--images", "600",
                                      "--milvus-images", "300", "--queries", "5", "--model", str(models["a"]),
                                      "--work", str(tmp_path)])  # fmt: skip
    runpy.run_path(str(BENCHMARK), run_name="__main__")
    out = capsys.readouterr().out
    flat = re.findall(r"^\| Flat \| 8 GiB \| \d+ \| (\d\.\d+) \|", out, re.MULTILINE)
    assert flat == ["1.000"] * 3  # 19,200 vectors: auto picks the exact index
    assert re.search(r"^\| HNSW32 \| 8 GiB \| 40 \| \d\.\d+ \|", out, re.MULTILINE)
    assert re.search(r"^\| FLAT \| 1\.000 \|", out, re.MULTILINE) and re.search(r"^\| HNSW \| \d\.\d+ \|", out, re.MULTILINE)
    assert re.search(r"^ratio: \d+\.\d\dx  single-query latency, Flat over 600 images", out, re.MULTILINE)
    assert "text encoder" in out


def test_a_failing_part_still_removes_the_temporary_scratch_folder(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARK.parent))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp puts the scratch folder
    monkeypatch.setattr(sys, "argv", ["search.py", "--part", "shapes", "--model", str(tmp_path / "no-model"),
                                      "--limit", "2"])  # fmt: skip
    with pytest.raises(FileNotFoundError):  # the model folder
        runpy.run_path(str(BENCHMARK), run_name="__main__")
    assert not list(tmp_path.glob("blip2-search-bench-*"))


def test_the_shapes_part_finds_through_every_backend_what_eval_retrieval_finds(models, monkeypatch, capsys, tmp_path):
    split = generate(tmp_path / "shapes", {"test": 6}, ShapesConfig(image_size=32), progress=False)["test"]
    monkeypatch.syspath_prepend(str(BENCHMARK.parent))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setattr(sys, "argv", ["search.py", "--part", "shapes", "--data", str(split), "--model",
                                      str(models["a"]), "--rerank", "2", "--work", str(tmp_path / "work")])  # fmt: skip
    runpy.run_path(str(BENCHMARK), run_name="__main__")
    out = capsys.readouterr().out
    backend = r"FAISS \w+(?: \(exact\))?|Milvus FLAT \(milvus-lite\)"
    rows = re.findall(rf"^\| ({backend}) \| (ITC|ITM \+ ITC) \|", out, re.MULTILINE)
    assert len(rows) == 8  # four backends, with and without the re-rank
    assert out.count("max |R@K - eval| = 0.000") == 4 and "MISSED" not in out  # 6 images: every backend is exact
