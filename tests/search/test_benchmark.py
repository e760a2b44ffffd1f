"""Smoke test of benchmarks/search.py: its synthetic and milvus-lite parts run end to end on small sizes, the
exact index finds exactly the brute-force top 10, and the tables come out."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

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
