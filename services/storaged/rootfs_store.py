"""Container root file systems: per container an upper, a work and a merged directory.

    <root>/rootfs/<container id>/rootfs.json   its record (state: created | removing)
    <root>/rootfs/<container id>/upper         the container's changes
    <root>/rootfs/<container id>/work          overlayfs work directory
    <root>/rootfs/<container id>/merged        the mount point handed to the runtime

A root file system is prepared in tmp/ and renamed into rootfs/ (committed),
then mounted. Removal first marks the record `removing`, unmounts, and moves
the directory to trash/ before deleting it, so a restart finishes any removal
it finds half done. A record found damaged at start goes to quarantine/; the
service writes it again from the mount table when the root file system is
mounted (its container may be running), and deletes the directory otherwise.
Every function here blocks; the service runs them in threads.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, replace

import structlog

from shared import atomic, quarantine
from shared.errors import InvalidArgument, is_no_space, out_of_space

log = structlog.get_logger(__name__)

RECORD = "rootfs.json"
CREATED = "created"
REMOVING = "removing"
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_container_id(value: object) -> str:
    if not isinstance(value, str) or not _CONTAINER_ID.match(value):
        raise InvalidArgument(
            f"container id {value!r:.140} must be 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit")
    return value


@dataclass(frozen=True)
class RootfsRecord:
    container_id: str
    top_layer: str | None
    state: str
    created: float


class RootfsStore:
    def __init__(self, root: str, tmp_dir: str, trash_dir: str) -> None:
        self.root = root
        self.rootfs_dir = os.path.join(root, "rootfs")
        self.tmp_dir = tmp_dir
        self.trash_dir = trash_dir

    def dir(self, container_id: str) -> str:
        return os.path.join(self.rootfs_dir, container_id)

    def merged(self, container_id: str) -> str:
        return os.path.join(self.rootfs_dir, container_id, "merged")

    def upper(self, container_id: str) -> str:
        return os.path.join(self.rootfs_dir, container_id, "upper")

    def work(self, container_id: str) -> str:
        return os.path.join(self.rootfs_dir, container_id, "work")

    def relative(self, path: str) -> str:
        """`path` relative to the store root, for compact mount options."""
        return os.path.relpath(path, self.root)

    def load(self) -> tuple[dict[str, RootfsRecord], list[str]]:
        """The records, and the container ids whose directory has no valid record (moved to quarantine)."""
        os.makedirs(self.rootfs_dir, mode=0o711, exist_ok=True)
        records: dict[str, RootfsRecord] = {}
        broken: list[str] = []
        for name in os.listdir(self.rootfs_dir):
            try:
                record = RootfsRecord(**atomic.read_json(os.path.join(self.rootfs_dir, name, RECORD)))
                if record.container_id != name or record.state not in (CREATED, REMOVING):
                    raise ValueError("record does not match its directory")
            except (OSError, ValueError, TypeError) as e:
                quarantine.set_aside(self.root, [os.path.join(self.rootfs_dir, name, RECORD)],
                                     kind="rootfs", name=name, error=str(e))
                broken.append(name)
                continue
            records[name] = record
        return records, broken

    def rewrite(self, container_id: str, top_layer: str | None) -> RootfsRecord:
        """A new record for a mounted root file system whose record was lost, from what its mount shows."""
        record = RootfsRecord(container_id, top_layer, CREATED, time.time())
        atomic.write_json(os.path.join(self.dir(container_id), RECORD), asdict(record))
        log.warning("rootfs_record_rebuilt", container_id=container_id, top_layer=top_layer)
        return record

    def create(self, container_id: str, top_layer: str | None, *, mode: int, uid: int, gid: int) -> RootfsRecord:
        """Prepare the directories of a root file system whose root has this owner and mode."""
        work = os.path.join(self.tmp_dir, f"rootfs-{container_id}-{secrets.token_hex(4)}")
        os.mkdir(work, 0o700)
        try:
            for sub in ("upper", "work", "merged"):
                os.mkdir(os.path.join(work, sub), 0o700)
            # The merged root takes its owner and mode from the upper dir.
            os.chown(os.path.join(work, "upper"), uid, gid)
            os.chmod(os.path.join(work, "upper"), mode)
            os.chmod(os.path.join(work, "merged"), 0o755)
            record = RootfsRecord(container_id, top_layer, CREATED, time.time())
            atomic.write_json(os.path.join(work, RECORD), asdict(record), mode=0o600)
            os.rename(work, self.dir(container_id))
            atomic.fsync_dir(self.rootfs_dir)
        except BaseException as e:
            _rmtree(work)
            if is_no_space(e):
                raise out_of_space(e, self.root, f"creating the root file system of container {container_id}") from e
            raise
        return record

    def mark_removing(self, record: RootfsRecord) -> RootfsRecord:
        record = replace(record, state=REMOVING)
        if os.path.isdir(self.dir(record.container_id)):
            atomic.write_json(os.path.join(self.dir(record.container_id), RECORD), asdict(record), mode=0o600)
        return record

    def delete(self, container_id: str) -> None:
        """Delete the (unmounted) directories of a root file system."""
        trashed = os.path.join(self.trash_dir, f"rootfs-{container_id}-{secrets.token_hex(4)}")
        try:
            os.rename(self.dir(container_id), trashed)
        except FileNotFoundError:
            return
        try:
            _rmtree(trashed)
        except OSError as e:
            # Out of rootfs/ it is gone for good; trash/ is emptied again at start.
            log.error("rootfs_delete_incomplete", container_id=container_id, path=trashed, error=str(e))


def _rmtree(path: str) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
