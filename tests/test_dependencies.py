"""pyproject.toml declares exactly what the package imports (and the few packages transformers and torch need for
what this project asks of them, each with its reason)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# transformers' GGUF loading; torch.utils.tensorboard; pymilvus's embedded Milvus Lite
NEEDED_BY_OTHERS = {"gguf", "accelerate", "tensorboard", "milvus-lite"}


def imported_modules() -> set[str]:
    """Top-level names of every module imported anywhere in src/blip2 (inside functions too)."""
    names = set()
    for file in (ROOT / "src" / "blip2").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"blip2"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [req for group, reqs in project["optional-dependencies"].items() if group != "dev" for req in reqs]
    return {normalise(re.split(r"[<>=!~\[; ]", req)[0]) for req in project["dependencies"] + extras}


def test_declared_dependencies_are_exactly_the_imported_ones():
    distributions = importlib.metadata.packages_distributions()
    needed = {normalise(distributions[module][0]) for module in imported_modules()}
    assert needed - declared() == set(), "imported but not declared"
    assert declared() - needed - NEEDED_BY_OTHERS == set(), "declared but never imported"
