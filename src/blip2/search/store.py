"""The index's metadata in SQLite: what each image is (content hash, size, caption), which files hold it, which
files failed, and the index's settings (model identity, dimensions, backend).

An image's ``id`` is also its slot in the vector store: its Q vectors are ``id * Q ... id * Q + Q - 1``. One image
per distinct content (sha256); several files (duplicates) may point at it. An image whose last file is removed is
marked ``removed`` and never returned; its slot is kept (adding the same content again revives it, unencoded).
Every change is one transaction, so the database is always in a committed state.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blip2.search.errors import SearchIndexError

FORMAT = "blip2-search-1"
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE images (
    id INTEGER PRIMARY KEY,              -- the image's vector slot
    sha256 TEXT NOT NULL UNIQUE,
    bytes INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    caption TEXT,
    removed INTEGER NOT NULL DEFAULT 0   -- 1 when no file holds it any more
);
CREATE TABLE files (
    path TEXT PRIMARY KEY,               -- absolute path, or SHARD:MEMBER for a tar member
    image_id INTEGER NOT NULL REFERENCES images(id),
    bytes INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    shard TEXT,                          -- the tar file, for a tar member
    offset INTEGER                       -- where the member's bytes start in it
);
CREATE INDEX files_by_image ON files(image_id);
CREATE TABLE failures (path TEXT PRIMARY KEY, cause TEXT NOT NULL);
"""


@dataclass(frozen=True)
class NewImage:
    id: int
    sha256: str
    bytes: int
    width: int
    height: int
    caption: str | None


@dataclass(frozen=True)
class FileRow:
    path: str
    image_id: int
    bytes: int
    mtime_ns: int
    shard: str | None = None
    offset: int | None = None


class MetadataStore:
    """One index's SQLite database (``index.db``)."""

    def __init__(self, path: Path, connection: sqlite3.Connection):
        self.path = path
        self.db = connection

    @classmethod
    def create(cls, path: Path, meta: dict[str, str]) -> MetadataStore:
        db = sqlite3.connect(path, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        with db:
            db.executescript(SCHEMA)
            db.executemany("INSERT INTO meta VALUES (?, ?)", {"format": FORMAT, **meta}.items())
        return cls(path, db)

    @classmethod
    def open(cls, path: Path) -> MetadataStore:
        """Open an existing database; a missing, foreign or damaged one raises ``SearchIndexError``."""
        folder = path.parent
        if not path.is_file():
            what = "does not exist" if not folder.exists() else "holds no index (no index.db)"
            raise SearchIndexError(f"{folder} {what}: build one with blip2 index build SOURCE --out {folder}")
        try:
            db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            found = dict(db.execute("SELECT key, value FROM meta").fetchall()).get("format")
            db.execute("SELECT MAX(id) FROM images").fetchone()
        except sqlite3.DatabaseError as error:
            raise SearchIndexError(f"{path} is not a readable index database ({error}): rebuild the index with "
                                   "blip2 index build into a new --out folder") from error
        if found != FORMAT:
            raise SearchIndexError(f"{path} holds index format {found!r}, not {FORMAT!r}: rebuild the index")
        return cls(path, db)

    def close(self) -> None:
        self.db.close()

    # ---- settings --------------------------------------------------------------------------------------

    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    def set_meta(self, values: dict[str, str]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())

    # ---- images and files ----------------------------------------------------------------------------

    def slots(self) -> int:
        """How many vector slots are committed (removed images included)."""
        return self.db.execute("SELECT COALESCE(MAX(id) + 1, 0) FROM images").fetchone()[0]

    def removed_mask(self, slots: int) -> np.ndarray:
        """[slots] bool: True for removed images."""
        mask = np.zeros(slots, dtype=bool)
        ids = [row[0] for row in self.db.execute("SELECT id FROM images WHERE removed = 1 AND id < ?", (slots,))]
        mask[ids] = True
        return mask

    def file_state(self, path: str) -> tuple[int, int] | None:
        """(bytes, mtime_ns) recorded for ``path``, or None when it is not indexed."""
        return self.db.execute("SELECT bytes, mtime_ns FROM files WHERE path = ?", (path,)).fetchone()

    def image_for_hash(self, sha256: str) -> int | None:
        row = self.db.execute("SELECT id FROM images WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else row[0]

    def commit(self, images: Sequence[NewImage], files: Sequence[FileRow], failures: dict[str, str]) -> None:
        """Record one chunk in one transaction: new images, (re)pointed files, failed paths (succeeded ones are
        cleared). An image that lost its last file is marked removed; one that gained a file is live again."""
        with self.db:
            touched = {f.image_id for f in files}
            for f in files:
                old = self.db.execute("SELECT image_id FROM files WHERE path = ?", (f.path,)).fetchone()
                if old is not None:
                    touched.add(old[0])
            self.db.executemany("INSERT INTO images (id, sha256, bytes, width, height, caption) VALUES (?, ?, ?, ?, ?, ?)",
                                [(i.id, i.sha256, i.bytes, i.width, i.height, i.caption) for i in images])
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                                [(f.path, f.image_id, f.bytes, f.mtime_ns, f.shard, f.offset) for f in files])
            self.db.executemany("DELETE FROM failures WHERE path = ?", [(f.path,) for f in files])
            self.db.executemany("INSERT OR REPLACE INTO failures VALUES (?, ?)", failures.items())
            self._update_removed(touched)

    def remove(self, targets: Iterable[str]) -> tuple[list[str], list[int], list[str]]:
        """Drop the files at ``targets`` (a file path, a folder: everything under it, a tar shard: its members).
        -> (files removed, image ids removed, targets that matched nothing)."""
        removed_files, unmatched, touched = [], [], set()
        with self.db:
            for target in targets:
                rows = self.db.execute(
                    "SELECT path, image_id FROM files WHERE path = ? OR substr(path, 1, ?) IN (?, ?)",
                    (target, len(target) + 1, target.rstrip("/") + "/", target + ":"),
                ).fetchall()
                if not rows:
                    unmatched.append(target)
                self.db.executemany("DELETE FROM files WHERE path = ?", [(path,) for path, _ in rows])
                removed_files += [path for path, _ in rows]
                touched |= {image for _, image in rows}
            self._update_removed(touched)
        gone = [i for (i,) in self.db.execute(
            f"SELECT id FROM images WHERE removed = 1 AND id IN ({','.join('?' * len(touched))})", list(touched))]
        return removed_files, sorted(gone), unmatched

    def _update_removed(self, image_ids: set[int]) -> None:
        self.db.executemany("UPDATE images SET removed = NOT EXISTS (SELECT 1 FROM files WHERE image_id = images.id) "
                            "WHERE id = ?", [(i,) for i in image_ids])

    def describe(self, image_ids: Sequence[int]) -> dict[int, dict]:
        """Metadata of live images: path (the first file), duplicates (the others), sha256, bytes, size, caption."""
        rows = {}
        for image_id in image_ids:
            image = self.db.execute("SELECT sha256, bytes, width, height, caption FROM images WHERE id = ? AND "
                                    "removed = 0", (int(image_id),)).fetchone()
            if image is None:
                continue
            files = self.db.execute("SELECT path, shard, offset FROM files WHERE image_id = ? ORDER BY rowid",
                                    (int(image_id),)).fetchall()
            rows[int(image_id)] = {"path": files[0][0], "duplicates": [f[0] for f in files[1:]], "sha256": image[0],
                                   "bytes": image[1], "width": image[2], "height": image[3], "caption": image[4],
                                   "location": (files[0][1], files[0][2])}
        return rows

    def counts(self) -> dict[str, int]:
        def one(sql: str) -> int:
            return self.db.execute(sql).fetchone()[0]

        return {
            "images": one("SELECT COUNT(*) FROM images WHERE removed = 0"),
            "files": one("SELECT COUNT(*) FROM files"),
            "removed_images": one("SELECT COUNT(*) FROM images WHERE removed = 1"),
            "failed_files": one("SELECT COUNT(*) FROM failures"),
            "slots": self.slots(),
        }

    def failures(self, limit: int = 10) -> dict[str, str]:
        return dict(self.db.execute("SELECT path, cause FROM failures ORDER BY path LIMIT ?", (limit,)).fetchall())
