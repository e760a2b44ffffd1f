"""benchmarks/serve.py end to end on tiny models (two real servers, the load, the idle comparison): it runs, the
replies agree on both servers, nothing fails. About a minute, so marked slow."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "serve.py"


@pytest.mark.slow
def test_the_serving_benchmark_runs_on_tiny_models():
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--seconds", "2"], env=env, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert len(re.findall(r"^ratio: \d+\.\d\dx  ", out, re.MULTILINE)) == 3
    assert "errors: 0 (target 0)" in out
    same, both = map(int, re.search(r"replies identical on both servers: (\d+) of the (\d+)", out).groups())
    assert both > 0 and same == both
