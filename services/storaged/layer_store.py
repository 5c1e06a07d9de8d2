"""The layer store: each layer unpacked once, in its own directory keyed by chain id.

    <root>/layers/<chain hex>/diff         the layer's files (an overlay lower dir)
    <root>/layers/<chain hex>/layer.json   its record
    <root>/l/<short name>                  -> ../layers/<chain hex>/diff
    <root>/tmp/                            unpacks in progress
    <root>/trash/                          layers being deleted
    <root>/held/<chain hex>-<random>/diff  layers whose record was found damaged while a
                                           mounted root file system used them

A layer is unpacked into a directory of tmp/ together with its record, then
renamed into layers/: the rename commits it, so after a crash a layer either
is complete with its record or is not there at all. The short links keep
overlay mount options small (containers/storage does the same).

A record found torn or garbage at start (a power cut, a disk fault) is moved
into quarantine/, and its layer's files are not trusted any more: the layer
is deleted, to be unpacked again from imaged's blobs. When a mounted root file
system still uses it (no reboot came in between), deleting the files would
pull them from under a running container: the layer is moved to held/
instead (a mounted overlay keeps the directories it was mounted on, whatever
their path), out of reach of new root file systems, and deleted once no
mount uses it.

Every function here blocks; the service runs them in threads.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from services.storaged import decompress
from services.storaged.digests import hex_of, is_digest
from services.storaged.tar_extract import extract_tar
from services.storaged.usage import measure
from shared import atomic, quarantine
from shared.errors import InvalidArgument, NotFound, is_no_space, out_of_space
from shared.libc import libc

log = structlog.get_logger(__name__)

RECORD = "layer.json"
DIFF = "diff"
_LINK_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_LINK_LENGTH = 10
_libc = libc()


@dataclass(frozen=True)
class LayerRecord:
    chain_id: str
    diff_id: str
    parent: str | None
    link: str           # short name in l/
    tar_size: int       # bytes of the uncompressed tar
    used_bytes: int     # disk space of the unpacked layer
    inodes: int
    created: float

    def to_wire(self) -> dict:
        return asdict(self)


def _syncfs(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _libc.syncfs(fd)
    finally:
        os.close(fd)


class LayerStore:
    def __init__(self, root: str) -> None:
        self.root = root
        self.layers_dir = os.path.join(root, "layers")
        self.links_dir = os.path.join(root, "l")
        self.tmp_dir = os.path.join(root, "tmp")
        self.trash_dir = os.path.join(root, "trash")
        self.held_dir = os.path.join(root, "held")
        # The lower dir of a root file system made from no layer at all.
        self.empty_dir = os.path.join(root, "empty")

    def layer_dir(self, chain_id: str) -> str:
        return os.path.join(self.layers_dir, hex_of(chain_id))

    def diff_dir(self, chain_id: str) -> str:
        return os.path.join(self.layer_dir(chain_id), DIFF)

    # -- loading and reconciling --------------------------------------------

    def load(self, in_use: set[str]) -> dict[str, LayerRecord]:
        """Read every committed layer; drop what interrupted unpacks and deletions left.

        `in_use`: the chain ids of layers that mounted root file systems use.
        """
        for d in (self.layers_dir, self.links_dir, self.tmp_dir, self.trash_dir, self.held_dir, self.empty_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(self.empty_dir, 0o755)
        for leftover in (self.tmp_dir, self.trash_dir):
            for name in os.listdir(leftover):
                log.info("layer_store_leftover_removed", path=os.path.join(leftover, name))
                _remove_tree(os.path.join(leftover, name))

        records: dict[str, LayerRecord] = {}
        for name in os.listdir(self.layers_dir):
            path = os.path.join(self.layers_dir, name)
            try:
                record = LayerRecord(**atomic.read_json(os.path.join(path, RECORD)))
                if hex_of(record.chain_id) != name or not os.path.isdir(os.path.join(path, DIFF)):
                    raise ValueError("record does not match its directory")
            except (OSError, ValueError, TypeError) as e:
                quarantine.set_aside(self.root, [os.path.join(path, RECORD)], kind="layer", name=name, error=str(e))
                if f"sha256:{name}" in in_use:
                    self._hold(name)
                else:
                    _remove_tree(path)
                continue
            records[record.chain_id] = record

        # Short links: recreate missing ones, remove those of no layer (those of held layers stay).
        wanted = {r.link: r for r in records.values()}
        for name in os.listdir(self.links_dir):
            link = os.path.join(self.links_dir, name)
            record = wanted.get(name)
            target = os.readlink(link)
            if record is not None and target == self._link_target(record.chain_id):
                continue
            if record is None and target.startswith("../held/") and os.path.isdir(os.path.join(self.links_dir, target)):
                continue
            os.unlink(link)
        for record in list(records.values()):
            link = os.path.join(self.links_dir, record.link)
            if not os.path.lexists(link):
                os.symlink(self._link_target(record.chain_id), link)
        return records

    # -- unpacking ------------------------------------------------------------

    def unpack(self, *, chain_id: str, parent: str | None, diff_id: str, blob_path: str,
               media_type: str, blob_root: str, allow_device_nodes: bool) -> LayerRecord:
        """Unpack one layer blob and commit it under its chain id."""
        work = Path(os.path.join(self.tmp_dir, f"{hex_of(chain_id)[:16]}-{secrets.token_hex(4)}"))
        try:
            work.mkdir(mode=0o700)
            diff = work / DIFF
            diff.mkdir()
            os.chmod(diff, 0o755)
            with _open_blob(blob_path, blob_root) as blob:
                compression = (decompress.compression_of(media_type) if media_type
                               else decompress.sniff(blob.peek(4)[:4]))
                reader = decompress.HashingReader(decompress.uncompressed(blob, compression), compression)
                extract_tar(reader, str(diff), allow_device_nodes=allow_device_nodes)
                reader.drain()
            if reader.digest() != diff_id:
                raise InvalidArgument(
                    f"layer {diff_id}: the uncompressed content of {blob_path} has digest "
                    f"{reader.digest()}, not the diff_id the image config declares")
            usage = measure(str(diff))
            record = LayerRecord(
                chain_id=chain_id, diff_id=diff_id, parent=parent, link="",
                tar_size=reader.size, used_bytes=usage.used_bytes, inodes=usage.inodes,
                created=time.time())
            record = self._commit(work, record)
        except BaseException as e:
            _discard(str(work))
            if is_no_space(e):
                raise out_of_space(e, self.root, f"unpacking layer {diff_id}") from e
            raise
        log.info("layer_unpacked", chain_id=chain_id, diff_id=diff_id, tar_size=record.tar_size,
                 inodes=record.inodes)
        return record

    def _commit(self, work: Path, record: LayerRecord) -> LayerRecord:
        # A link name is claimed by creating the symlink (fails if taken);
        # it dangles until the rename below makes the layer appear.
        target = self._link_target(record.chain_id)
        while True:
            link = "".join(secrets.choice(_LINK_ALPHABET) for _ in range(_LINK_LENGTH))
            try:
                os.symlink(target, os.path.join(self.links_dir, link))
                break
            except FileExistsError:
                continue
        record = LayerRecord(**{**asdict(record), "link": link})
        try:
            atomic.write_json(str(work / RECORD), asdict(record), mode=0o600)
            _syncfs(str(work))
            os.rename(work, self.layer_dir(record.chain_id))
            atomic.fsync_dir(self.layers_dir)
        except BaseException:
            os.unlink(os.path.join(self.links_dir, link))
            raise
        return record

    def _link_target(self, chain_id: str) -> str:
        return os.path.join("..", "layers", hex_of(chain_id), DIFF)

    def chain_id_of_link(self, link: str) -> str | None:
        """The chain id of the layer (committed or held) a short link points to; None if it points elsewhere."""
        try:
            parts = os.readlink(os.path.join(self.links_dir, link)).split("/")
        except OSError:
            return None
        if len(parts) != 4 or parts[0] != ".." or parts[1] not in ("layers", "held") or parts[3] != DIFF:
            return None
        chain_id = f"sha256:{parts[2][:64]}"
        return chain_id if is_digest(chain_id) else None

    # -- layers kept only for the mounts that use them -------------------------

    def _hold(self, name: str) -> None:
        """Move a layer out of layers/ (its files stay under the mounts that use them); its link follows."""
        held = f"{name}-{secrets.token_hex(4)}"
        os.rename(os.path.join(self.layers_dir, name), os.path.join(self.held_dir, held))
        old_target = os.path.join("..", "layers", name, DIFF)
        for link in os.listdir(self.links_dir):
            path = os.path.join(self.links_dir, link)
            if os.readlink(path) == old_target:
                tmp = os.path.join(self.links_dir, f".{link}.tmp")
                os.symlink(os.path.join("..", "held", held, DIFF), tmp)
                os.replace(tmp, path)
        log.warning("layer_held_for_mounts", chain_id=f"sha256:{name}", path=os.path.join(self.held_dir, held))

    def drop_held(self, mounted_links: set[str]) -> None:
        """Delete the held layers whose short link no mounted root file system names any more."""
        used = set()
        for link in os.listdir(self.links_dir):
            path = os.path.join(self.links_dir, link)
            try:
                target = os.readlink(path)
                if target.startswith("../held/") and link in mounted_links:
                    used.add(target.split("/")[2])
                elif target.startswith("../held/"):
                    os.unlink(path)
            except FileNotFoundError:
                continue  # a removal beside this one took it
        for name in os.listdir(self.held_dir):
            if name not in used:
                log.info("held_layer_removed", path=os.path.join(self.held_dir, name))
                _remove_tree(os.path.join(self.held_dir, name))

    # -- removal --------------------------------------------------------------

    def remove(self, record: LayerRecord) -> None:
        """Delete a layer: out of layers/ in one rename, then from the disk."""
        path = self.layer_dir(record.chain_id)
        try:
            os.unlink(os.path.join(self.links_dir, record.link))
        except FileNotFoundError:
            pass
        trashed = self._trash(path)
        if trashed:
            _remove_tree(trashed)

    def _trash(self, path: str) -> str | None:
        dest = os.path.join(self.trash_dir, f"{os.path.basename(path)}-{secrets.token_hex(4)}")
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            return None
        return dest

    # -- chains ---------------------------------------------------------------

    @staticmethod
    def chain(records: dict[str, LayerRecord], top_layer: str) -> list[LayerRecord]:
        """The layers of a stack, top first; NotFound when one is missing."""
        out: list[LayerRecord] = []
        current: str | None = top_layer
        while current is not None:
            record = records.get(current)
            if record is None:
                if current == top_layer:
                    raise NotFound(f"layer {top_layer} is not in the layer store")
                raise NotFound(f"layer {current}, below {top_layer}, is not in the layer store")
            out.append(record)
            current = record.parent
            if len(out) > 10_000:
                raise InvalidArgument(f"layer {top_layer}: its parent chain loops")
        return out

    @staticmethod
    def unreachable(records: dict[str, LayerRecord], tops: list[str], spared: set[str]) -> list[LayerRecord]:
        """The layers that are neither `spared` nor in the stack of any of `tops`."""
        keep = set(spared)
        for top in tops:
            current: str | None = top
            while current is not None and current not in keep:
                keep.add(current)
                record = records.get(current)
                current = record.parent if record else None
        return [r for cid, r in records.items() if cid not in keep]


def _open_blob(path: str, blob_root: str):
    """Open a layer blob, refusing anything but a regular file inside `blob_root`."""
    if not os.path.isabs(path):
        raise InvalidArgument(f"layer blob path {path!r} is not absolute")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NotFound(f"layer blob {path} does not exist") from None
    except OSError as e:
        raise InvalidArgument(f"layer blob {path} cannot be opened: {e.strerror}") from None
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
        root = os.path.realpath(blob_root).rstrip("/") + "/"
        if not real.startswith(root):
            raise InvalidArgument(f"layer blob {path} is outside the image store {blob_root}")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidArgument(f"layer blob {path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return open(fd, "rb", buffering=1 << 20)


def _remove_tree(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass



def _discard(path: str) -> None:
    """Remove a failed unpack; what cannot go now is removed at the next start."""
    try:
        _remove_tree(path)
    except OSError as e:
        log.error("layer_store_cleanup_failed", path=path, error=str(e))
