"""Image records in SQLite (WAL): one row per image (id = config digest) and its names.

An image's sizes: `size`, what its blobs take to download (config and
compressed layers); `meta_size`, the bytes of its config and manifests; and
`unpacked_size`, its layers uncompressed, as storaged measured them when it
unpacked them (empty until then, and for images pulled before it was kept).

A name is a repo tag (`docker.io/library/busybox:latest`) or a repo digest
(`docker.io/library/busybox@sha256:...`); each names one image, so pulling
a tag that moved re-points the tag, but only once the new image is ready:
until then the pull's names wait in `pending_names`, and a pull that fails
leaves the tag on the image it named before. Methods are synchronous and
quick; the service calls them through `asyncio.to_thread`. A write that finds
the file system full ("database or disk is full") raises ResourceExhausted
and changes nothing.

Each ready image also has a JSON copy of its record beside the database
(record_copies.py). A database found damaged at start (garbage, truncated: a
power cut, a disk fault) is moved to quarantine/ and made again from those
copies; an empty or new database is filled from them too.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import structlog

from services.imaged.record_copies import RecordCopies
from shared import quarantine
from shared.errors import out_of_space

log = structlog.get_logger(__name__)

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
    pulled_ns INTEGER NOT NULL,
    pending_names TEXT
);
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('tag', 'digest')),
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS names_by_image ON names(image_id);
"""
# Columns added since the first schema: a database from before gets them, empty.
ADDED_COLUMNS = {"meta_size": "INTEGER", "unpacked_size": "INTEGER", "pending_names": "TEXT"}
# The columns a record's copy restores (the rest are its names, and `ready`).
_COPIED = ("id", "manifest_digest", "manifest_media_type", "size", "meta_size", "unpacked_size", "config",
           "layers", "blobs", "pinned", "top_layer", "pulled_ns")


class _Damaged(Exception):
    """The database's own check found it broken."""


def _is_damage(error: BaseException) -> bool:
    if isinstance(error, _Damaged):
        return True
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(error, sqlite3.DatabaseError) and code is not None and \
        code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _connect(path: Path) -> tuple[sqlite3.Connection, bool]:
    """The database at `path`, checked and with the current schema; and whether it had no images table."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        # Reads every page: a few milliseconds for the few hundred images of a node.
        problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise _Damaged("; ".join(problems[:5]))
        new = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'images'").fetchone() is None
        db.executescript(SCHEMA)
        present = {row["name"] for row in db.execute("PRAGMA table_info(images)")}
        for column, kind in ADDED_COLUMNS.items():
            if column not in present:
                db.execute(f"ALTER TABLE images ADD COLUMN {column} {kind}")
    except BaseException:
        db.close()
        raise
    return db, new


class ImageRecords:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._copies = RecordCopies(path.parent / "records", path.parent)
        try:
            self._db, new = _connect(path)
        except (sqlite3.DatabaseError, _Damaged) as e:
            if not _is_damage(e):
                raise
            # The WAL and shared-memory files belong to the damaged database: they go with it.
            quarantine.set_aside(path.parent, [path.with_name(path.name + suffix) for suffix in ("", "-wal", "-shm")],
                                 kind="image_database", name=path.name, error=str(e))
            self._db, new = _connect(path)
        if new:
            self._restore()
        else:
            self._refresh_copies()

    def _restore(self) -> None:
        """Fill a new database from the records' copies; a name two copies claim goes to the image pulled last."""
        copies = sorted(self._copies.read_all(), key=lambda c: c[1]["pulled_ns"])
        restored = 0
        for image_id, copy in copies:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    f"INSERT INTO images ({', '.join(_COPIED)}, ready) VALUES ({', '.join('?' * len(_COPIED))}, 1)",
                    [json.dumps(copy[c]) if c in ("config", "layers", "blobs") else copy[c] for c in _COPIED])
                for kind, key in (("tag", "repo_tags"), ("digest", "repo_digests")):
                    for name in copy[key]:
                        self._db.execute("INSERT INTO names (name, kind, image_id) VALUES (?, ?, ?) ON CONFLICT(name)"
                                         " DO UPDATE SET image_id = excluded.image_id, kind = excluded.kind",
                                         (name, kind, copy["id"]))
                self._db.execute("COMMIT")
            except (KeyError, TypeError, ValueError, sqlite3.Error) as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._copies.set_aside(image_id, f"cannot be restored: {e!r:.200}")
                continue
            restored += 1
        if copies:
            log.warning("image_records_restored", images=restored, database=str(self.path))

    def _refresh_copies(self) -> None:
        """Make the copies match the database: written for each ready image, gone for the others."""
        ready = {}
        for row in self._db.execute("SELECT * FROM images WHERE ready = 1"):
            ready[row["id"]] = self._record(row)
        found = dict(self._copies.read_all())
        for image_id, record in ready.items():
            if found.get(image_id) != _copy_of(record):
                self._write_copy(record)
        for image_id in found.keys() - ready.keys():
            self._copies.remove(image_id)

    def _write_copy(self, record: dict[str, Any]) -> None:
        try:
            self._copies.write(record["id"], _copy_of(record))
        except OSError as e:
            # The database stays the truth; the next start writes the copy again.
            log.warning("image_record_copy_failed", image_id=record["id"], error=str(e))

    def _sync_copy(self, image_id: str) -> None:
        """After a write (the lock held): the image's copy follows its row."""
        row = self._db.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        if row is not None and row["ready"]:
            self._write_copy(self._record(row))
        else:
            self._copies.remove(image_id)

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
        """Insert or refresh an image (keeping ready, top layer and pin); `names` move to it once it is ready."""
        with self._writing(f"storing image {image['id']}") as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT pending_names FROM images WHERE id = ?", (image["id"],)).fetchone()
                pending = json.loads(row["pending_names"] or "[]") if row else []
                pending += [[name, kind] for name, kind in names if [name, kind] not in pending]
                db.execute(
                    "INSERT INTO images (id, manifest_digest, manifest_media_type, size, meta_size, config, layers,"
                    " blobs, pinned, pulled_ns, pending_names) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT(id) DO UPDATE SET pinned = max(pinned, excluded.pinned),"
                    " pulled_ns = excluded.pulled_ns, meta_size = excluded.meta_size,"
                    " pending_names = excluded.pending_names, blobs = ("
                    "   SELECT json_group_array(DISTINCT value) FROM ("
                    "     SELECT value FROM json_each(images.blobs) UNION SELECT value FROM json_each(excluded.blobs)))",
                    (image["id"], image["manifest_digest"], image["manifest_media_type"], image["size"],
                     image.get("meta_size"), json.dumps(image["config"]), json.dumps(image["layers"]), json.dumps(image["blobs"]),
                     int(image.get("pinned", False)), time.time_ns(), json.dumps(pending)))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite rolls back by itself after some errors, a full disk among them
                    db.execute("ROLLBACK")
                raise
            row = db.execute("SELECT * FROM images WHERE id = ?", (image["id"],)).fetchone()
            return self._record(row)

    def mark_ready(self, image_id: str) -> bool:
        """The image is usable: list it, and move the names its pulls asked for to it."""
        with self._writing(f"marking image {image_id} ready") as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT pending_names FROM images WHERE id = ?", (image_id,)).fetchone()
                if row is None:
                    db.execute("ROLLBACK")
                    return False
                for name, kind in json.loads(row["pending_names"] or "[]"):
                    db.execute("INSERT INTO names (name, kind, image_id) VALUES (?, ?, ?)"
                               " ON CONFLICT(name) DO UPDATE SET image_id = excluded.image_id, kind = excluded.kind",
                               (name, kind, image_id))
                db.execute("UPDATE images SET ready = 1, pending_names = NULL WHERE id = ?", (image_id,))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            self._sync_copy(image_id)
            return True

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
        """Change some fields; `ready` goes down here (missing blobs), up only through `mark_ready`."""
        allowed = {"ready", "top_layer", "pinned", "unpacked_size", "pending_names"}
        assert set(fields) <= allowed and fields.get("ready", 0) == 0
        with self._writing(f"updating image {image_id}") as db:
            sets = ", ".join(f"{k} = ?" for k in fields)
            cur = db.execute(f"UPDATE images SET {sets} WHERE id = ?", (*fields.values(), image_id))
            self._sync_copy(image_id)
            return cur.rowcount > 0

    def remove_name(self, name: str) -> None:
        with self._writing(f"removing image name {name}") as db:
            row = db.execute("DELETE FROM names WHERE name = ? RETURNING image_id", (name,)).fetchone()
            if row is not None:
                self._sync_copy(row["image_id"])

    def delete(self, image_id: str) -> None:
        with self._writing(f"removing image {image_id}") as db:
            db.execute("DELETE FROM images WHERE id = ?", (image_id,))
            self._copies.remove(image_id)

    def referenced_blobs(self) -> set[str]:
        """Every blob digest some image record needs."""
        out: set[str] = set()
        with self._lock:
            for row in self._db.execute("SELECT layers, blobs FROM images"):
                out.update(layer["digest"] for layer in json.loads(row["layers"]))
                out.update(json.loads(row["blobs"]))
        return out


def _copy_of(record: dict[str, Any]) -> dict[str, Any]:
    """What a record's copy keeps: enough to restore its row and names."""
    return {**{c: record[c] for c in _COPIED}, "repo_tags": record["repo_tags"], "repo_digests": record["repo_digests"]}
