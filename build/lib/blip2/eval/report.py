"""Write evaluation results as JSON (exact values) and a Markdown table (for reading and pasting)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from blip2.errors import InputError

MARKDOWN_DECIMALS = 4


def _jsonable(value: Any, where: str) -> Any:
    """Plain JSON values: nested mappings and lists kept, numpy/torch scalars unwrapped with .item()."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item, f"{where}/{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    item = getattr(value, "item", None)  # numpy and torch scalars
    if callable(item):
        try:
            return _jsonable(item(), where)
        except (ValueError, RuntimeError):  # more than one element
            pass
    raise TypeError(f"results{where} is a {type(value).__name__}, which a report cannot hold; "
                    f"give numbers, strings, lists or dicts (one-element tensors/arrays are unwrapped)")


def _rows(results: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(metric, value) rows; nested dicts become "parent/child" metric names."""
    rows = []
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_rows(value, f"{name}/"))
        else:
            rows.append((name, value))
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.{MARKDOWN_DECIMALS}f}"
    if isinstance(value, list):
        return json.dumps(value)
    return str(value).replace("|", "\\|")


def markdown_table(results: Mapping[str, Any], title: str) -> str:
    """A "# title" heading and a two-column metric | value table; floats to 4 decimals."""
    lines = [f"# {title}", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {_cell(name)} | {_cell(value)} |" for name, value in _rows(results)]
    return "\n".join(lines) + "\n"


def write_report(results: Mapping[str, Any], out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``out_dir/name.json`` and ``out_dir/name.md``; return their paths (out_dir is created)."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise InputError(f"report name must be a plain file name without directories, got {name!r}")
    plain = _jsonable(results, "")
    if not isinstance(plain, dict):
        raise TypeError(f"results must be a dict of metric -> value, got {type(results).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(plain, indent=2) + "\n")
    md_path.write_text(markdown_table(plain, name))
    return json_path, md_path
