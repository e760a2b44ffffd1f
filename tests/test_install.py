"""The package works installed (not from the source checkout): `pip install .` puts the demo's recipes in it, and its
commands run from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install --no-deps .`` into a folder of its own (the dependencies come from this environment)."""
    target, source = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("source")
    for part in ("src", "pyproject.toml", "README.md"):  # a copy: building writes build/ beside the sources
        (shutil.copytree if (ROOT / part).is_dir() else shutil.copy)(ROOT / part, source / part)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (target / "blip2" / "demo" / "recipes" / "shapes_stage1.yaml").is_file()
    return target


def blip2(installed: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "blip2.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_installed_package_trains_a_packaged_recipe_from_another_folder(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert "--train-images" in blip2(installed, "demo", "--help", cwd=elsewhere).stdout
    blip2(installed, "shapes", "--out", "shapes", "--train", "8", "--val", "0", "--test", "0", "--compositional", "0",
          cwd=elsewhere)
    done = blip2(installed, "train", "shapes_stage1", "--set", "data.captions=[shapes/train]", "data.feature_cache=null",
                 "train.steps=1", "train.batch_size=4", "train.out_dir=run", cwd=elsewhere)
    assert (elsewhere / "run" / "final" / "model.safetensors").is_file(), done.stdout
    import blip2 as here  # the import under test is the installed copy, not this checkout
    assert str(installed) not in here.__file__


@pytest.mark.slow
def test_installed_package_runs_a_tiny_demo_from_another_folder(installed, tmp_path):
    blip2(installed, "demo", "--train-images", "16", "--test-images", "6", "--compositional-images", "4",
          "--stage1-steps", "2", "--retrieval-steps", "2", "--stage2-steps", "2", "--eval-limit", "2", cwd=tmp_path)
    assert (tmp_path / "reports" / "demo" / "metrics.json").is_file()
