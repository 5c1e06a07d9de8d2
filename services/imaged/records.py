"""Image records in SQLite (WAL): one row per image (id = config digest) and its names.

An image's sizes: `size`, what its blobs take to download (config and
compressed layers); `meta_size`, the bytes of its config and manifests; and
`unpacked_size`, its layers uncompressed, as storaged measured them when it
unpacked them (empty until then, and for images pulled before it was kept).

A name is a repo tag (`docker.io/library/busybox:latest`) or a repo digest
(`docker.io/library/busybox@sha256:...`); each names one image, so pulling
a tag that moved re-points the tag. Methods are synchronous and quick; the
service calls them through `asyncio.to_thread`. A write that finds the file
system full ("database or disk is full") raises ResourceExhausted and
changes nothing.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from shared.errors import out_of_space

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    manifest_digest TEXT NOT NULL,
    manifest_media_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    meta_size INTEGER,
    unpacked_size INTEGER,
    config TEXT NOT NULL,
    layers TEXT NOT NULL,
    blobs TEXT NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    ready INTEGER NOT NULL DEFAULT 0,
    top_layer TEXT,
    pulled_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('tag', 'digest')),
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS names_by_image ON names(image_id);
"""
# Columns added since the first schema: a database from before gets them, empty.
ADDED_COLUMNS = {"meta_size": "INTEGER", "unpacked_size": "INTEGER"}


class ImageRecords:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        present = {row["name"] for row in self._db.execute("PRAGMA table_info(images)")}
        for column, kind in ADDED_COLUMNS.items():
            if column not in present:
                self._db.execute(f"ALTER TABLE images ADD COLUMN {column} {kind}")

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[sqlite3.Connection]:
        """The database, locked, for one write; a full file system becomes ResourceExhausted."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as e:
                if e.sqlite_errorcode != sqlite3.SQLITE_FULL:
                    raise
                raise out_of_space(None, self.path.parent, f"{what} in the image database") from e

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _record(self, row: sqlite3.Row) -> dict[str, Any]:
        names = self._db.execute("SELECT name, kind FROM names WHERE image_id = ? ORDER BY rowid",
                                 (row["id"],)).fetchall()
        return {
            "id": row["id"],
            "repo_tags": [n["name"] for n in names if n["kind"] == "tag"],
            "repo_digests": [n["name"] for n in names if n["kind"] == "digest"],
            "size": row["size"],
            "meta_size": row["meta_size"],
            "unpacked_size": row["unpacked_size"],
            "pinned": bool(row["pinned"]),
            "ready": bool(row["ready"]),
            "top_layer": row["top_layer"],
            "manifest_digest": row["manifest_digest"],
            "manifest_media_type": row["manifest_media_type"],
            "config": json.loads(row["config"]),
            "layers": json.loads(row["layers"]),
            "blobs": json.loads(row["blobs"]),
            "pulled_ns": row["pulled_ns"],
        }

    def store(self, image: dict[str, Any], names: list[tuple[str, str]]) -> dict[str, Any]:
        """Insert or refresh an image (keeping ready, top layer and pin) and point `names` at it."""
        with self._writing(f"storing image {image['id']}") as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT INTO images (id, manifest_digest, manifest_media_type, size, meta_size, config, layers,"
                    " blobs, pinned, pulled_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT(id) DO UPDATE SET pinned = max(pinned, excluded.pinned),"
                    " pulled_ns = excluded.pulled_ns, meta_size = excluded.meta_size, blobs = ("
                    "   SELECT json_group_array(DISTINCT value) FROM ("
                    "     SELECT value FROM json_each(images.blobs) UNION SELECT value FROM json_each(excluded.blobs)))",
                    (image["id"], image["manifest_digest"], image["manifest_media_type"], image["size"],
                     image.get("meta_size"), json.dumps(image["config"]), json.dumps(image["layers"]), json.dumps(image["blobs"]),
                     int(image.get("pinned", False)), time.time_ns()))
                for name, kind in names:
                    db.execute("INSERT INTO names (name, kind, image_id) VALUES (?, ?, ?)"
                               " ON CONFLICT(name) DO UPDATE SET image_id = excluded.image_id, kind = excluded.kind",
                               (name, kind, image["id"]))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite rolls back by itself after some errors, a full disk among them
                    db.execute("ROLLBACK")
                raise
            row = db.execute("SELECT * FROM images WHERE id = ?", (image["id"],)).fetchone()
            return self._record(row)

    def get(self, image_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
            return self._record(row) if row else None

    def by_name(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT images.* FROM names JOIN images ON images.id = names.image_id"
                                   " WHERE names.name = ?", (name,)).fetchone()
            return self._record(row) if row else None

    def by_id_prefix(self, prefix: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM images WHERE substr(id, 1, ?) = ?",
                                    (len(prefix), prefix)).fetchall()
            return [self._record(r) for r in rows]

    def all(self, *, ready_only: bool = True) -> list[dict[str, Any]]:
        with self._lock:
            sql = "SELECT * FROM images" + (" WHERE ready = 1" if ready_only else "") + " ORDER BY pulled_ns"
            return [self._record(r) for r in self._db.execute(sql).fetchall()]

    def update(self, image_id: str, **fields: Any) -> bool:
        allowed = {"ready", "top_layer", "pinned", "unpacked_size"}
        assert set(fields) <= allowed
        with self._writing(f"updating image {image_id}") as db:
            sets = ", ".join(f"{k} = ?" for k in fields)
            cur = db.execute(f"UPDATE images SET {sets} WHERE id = ?", (*fields.values(), image_id))
            return cur.rowcount > 0

    def remove_name(self, name: str) -> None:
        with self._writing(f"removing image name {name}") as db:
            db.execute("DELETE FROM names WHERE name = ?", (name,))

    def delete(self, image_id: str) -> None:
        with self._writing(f"removing image {image_id}") as db:
            db.execute("DELETE FROM images WHERE id = ?", (image_id,))

    def referenced_blobs(self) -> set[str]:
        """Every blob digest some image record needs."""
        out: set[str] = set()
        with self._lock:
            for row in self._db.execute("SELECT layers, blobs FROM images"):
                out.update(layer["digest"] for layer in json.loads(row["layers"]))
                out.update(json.loads(row["blobs"]))
        return out
