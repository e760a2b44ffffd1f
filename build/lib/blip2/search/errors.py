"""The one error type of the search package: a problem with an index or a query that the user can fix."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from blip2.errors import InputError


class SearchIndexError(InputError):
    """A missing, empty, damaged or mismatched index, or a query it cannot answer; the message says what to do."""


@contextmanager
def readable(folder: str | Path) -> Iterator[None]:
    """Turn a damaged SQLite database met mid-operation into one clear ``SearchIndexError``."""
    try:
        yield
    except sqlite3.DatabaseError as error:
        raise SearchIndexError(f"{folder}: the index database is damaged ({error}); rebuild the index with "
                               "blip2 index build into a new --out folder") from error
