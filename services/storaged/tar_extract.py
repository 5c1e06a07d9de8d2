"""Safe extraction of one layer tar into an empty directory.

Every path is resolved one component at a time from the layer directory with
`O_NOFOLLOW`, so no entry, hard-link target or parent directory can lead
outside it: an entry with an absolute name or a `..` component, or whose
parent is a symbolic link or not a directory, is refused. Files are created
with `O_EXCL` after removing what was there, so a later entry replaces an
earlier symlink instead of writing through it.

OCI whiteouts become overlayfs ones: `.wh.NAME` a 0:0 character device NAME,
`.wh..wh..opq` the `trusted.overlay.opaque=y` attribute on its directory.
Owners, modes (with setuid/setgid/sticky bits), times, symlinks, hard links
and extended attributes (PAX `SCHILY.xattr.*`) are kept.

This is blocking work: run it in a thread.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
from typing import BinaryIO

import structlog

from shared.errors import Internal, InvalidArgument, PermissionDenied, is_no_space, out_of_space

log = structlog.get_logger(__name__)

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
# Attributes that overlayfs itself interprets; a layer must not smuggle them in.
_RESERVED_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
_PAX_XATTR_PREFIX = "SCHILY.xattr."

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FD_CACHE_LIMIT = 256
_COPY_CHUNK = 1 << 20

Parts = tuple[str, ...]


# Long names and PAX records are read into memory whole: bound them (as Go's
# archive/tar does) so a hostile layer cannot exhaust memory with one header.
MAX_METADATA_HEADER = 1 << 20
_METADATA_TYPES = frozenset({tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
                             tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE})


class _BoundedTarInfo(tarfile.TarInfo):
    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        buf = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
        obj = cls.frombuf(buf, tarfile_.encoding, tarfile_.errors)
        obj.offset = tarfile_.fileobj.tell() - tarfile.BLOCKSIZE
        if obj.type in _METADATA_TYPES and obj.size > MAX_METADATA_HEADER:
            raise InvalidArgument(
                f"layer has a {obj.size}-byte tar metadata header at offset {obj.offset} "
                f"(the limit is {MAX_METADATA_HEADER} bytes)")
        return obj._proc_member(tarfile_)


def _reject(entry: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"layer entry {entry!r}: {why}")


def _fs_error(err: OSError, entry: str, dest: str) -> Exception:
    if is_no_space(err):
        return out_of_space(err, dest, f"unpacking layer entry {entry!r}")
    what = f"layer entry {entry!r}: {err.strerror or err}"
    if err.errno in (errno.EPERM, errno.EACCES):
        return PermissionDenied(f"{what} (storaged lacks a privilege to recreate it)")
    return Internal(what)


def split_entry_name(name: str, entry: str, role: str = "path") -> Parts:
    """The components of a path relative to the layer root; refuses escapes."""
    if name.startswith("/"):
        raise _reject(entry, f"{role} {name!r} is an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _reject(entry, f"{role} {name!r} has a '..' component")
    return parts


def _xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if not key.startswith(_PAX_XATTR_PREFIX):
            continue
        name = key[len(_PAX_XATTR_PREFIX):]
        if not name or name.startswith(_RESERVED_XATTR_PREFIXES):
            continue
        # tarfile decodes PAX values as UTF-8 with surrogateescape: this restores the bytes.
        out[name] = value.encode("utf-8", "surrogateescape")
    return out


def _mtime_ns(member: tarfile.TarInfo) -> int:
    return int(member.mtime * 1_000_000_000)


class _Extractor:
    def __init__(self, root_fd: int, allow_device_nodes: bool) -> None:
        self.root_fd = root_fd
        self.allow_device_nodes = allow_device_nodes
        self._dirs: dict[Parts, int] = {}
        # Directory modes and times are set last: adding entries changes the
        # mtime, and a read-only mode must not stop later entries.
        self._deferred: dict[Parts, tuple[int, int]] = {}

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    # -- resolving paths inside the layer ---------------------------------

    def _dir_fd(self, parts: Parts, entry: str, *, create: bool) -> int:
        """An open fd of directory `parts`, created (0755, root) if missing and `create`."""
        if not parts:
            return self.root_fd
        fd = self._dirs.get(parts)
        if fd is not None:
            return fd
        parent = self._dir_fd(parts[:-1], entry, create=create)
        name = parts[-1]
        shown = "/".join(parts)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise _reject(entry, f"{shown!r} does not exist in this layer") from None
            os.mkdir(name, 0o755, dir_fd=parent)
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
            os.fchmod(fd, 0o755)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.lstat(name, dir_fd=parent)
            if stat.S_ISLNK(st.st_mode):
                raise _reject(entry, f"goes through {shown!r}, a symbolic link") from None
            raise _reject(entry, f"{shown!r} is not a directory") from None
        self._dirs[parts] = fd
        return fd

    def _forget(self, parts: Parts) -> None:
        """Drop cached fds and pending metadata of `parts` and everything below it."""
        n = len(parts)
        for key in [k for k in self._dirs if k[:n] == parts]:
            os.close(self._dirs.pop(key))
        for key in [k for k in self._deferred if k[:n] == parts]:
            del self._deferred[key]

    def _clear_existing(self, parent: int, parts: Parts, *, keep_dir: bool) -> bool:
        """Remove what is at `parts`; returns True when a directory was kept."""
        name = parts[-1]
        try:
            st = os.lstat(name, dir_fd=parent)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            self._forget(parts)
            shutil.rmtree(name, dir_fd=parent)
        else:
            os.unlink(name, dir_fd=parent)
        return False

    # -- metadata -----------------------------------------------------------

    def _set_xattrs_fd(self, fd: int, member: tarfile.TarInfo) -> None:
        for key, value in _xattrs(member).items():
            try:
                os.setxattr(fd, key, value)
            except OSError as e:
                self._xattr_failed(e, member, key)

    def _set_xattrs_path(self, parent: int, name: str, member: tarfile.TarInfo) -> None:
        path = f"/proc/self/fd/{parent}/{name}"
        for key, value in _xattrs(member).items():
            try:
                os.setxattr(path, key, value, follow_symlinks=False)
            except OSError as e:
                self._xattr_failed(e, member, key)

    @staticmethod
    def _xattr_failed(err: OSError, member: tarfile.TarInfo, key: str) -> None:
        # As tar does, skip what the kernel never takes here: user.* attributes
        # on symlinks and special files, namespaces the file system lacks (e.g.
        # security.selinux). File capabilities are never dropped silently.
        special = not (member.isreg() or member.isdir())
        if err.errno == errno.EPERM and key.startswith("user.") and special:
            log.debug("layer_xattr_skipped", entry=member.name, xattr=key, error=err.strerror)
            return
        if err.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) and key != "security.capability":
            log.debug("layer_xattr_skipped", entry=member.name, xattr=key, error=err.strerror)
            return
        raise err

    def _set_meta_fd(self, fd: int, member: tarfile.TarInfo) -> None:
        # Order matters: chown clears setuid bits and file capabilities.
        os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, member.mode & 0o7777)
        self._set_xattrs_fd(fd, member)
        mtime = _mtime_ns(member)
        os.utime(fd, ns=(mtime, mtime))

    def _set_meta_path(self, parent: int, name: str, member: tarfile.TarInfo, *, chmod: bool) -> None:
        os.chown(name, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
        if chmod:
            # Only for FIFOs and devices that this extraction just created.
            os.chmod(name, member.mode & 0o7777, dir_fd=parent)
        self._set_xattrs_path(parent, name, member)
        mtime = _mtime_ns(member)
        os.utime(name, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)

    # -- entries ------------------------------------------------------------

    def add(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        entry = member.name
        if len(self._dirs) > _FD_CACHE_LIMIT:
            self.close()
        parts = split_entry_name(member.name, entry)
        if not parts:
            if not member.isdir():
                raise _reject(entry, "the layer root can only be a directory")
            os.fchown(self.root_fd, member.uid, member.gid)
            self._set_xattrs_fd(self.root_fd, member)
            self._deferred[()] = (member.mode & 0o7777, _mtime_ns(member))
            return
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, member, entry)
            return
        parent = self._dir_fd(parts[:-1], entry, create=True)
        if member.isdir():
            self._directory(parent, parts, member, entry)
        elif member.issym():
            self._symlink(parent, parts, member, entry)
        elif member.islnk():
            self._hardlink(parts, member, entry)
        elif member.isreg():
            self._regular(parent, parts, member, tar)
        elif member.isfifo():
            self._clear_existing(parent, parts, keep_dir=False)
            os.mkfifo(base, 0o600, dir_fd=parent)
            self._set_meta_path(parent, base, member, chmod=True)
        elif member.ischr() or member.isblk():
            if not self.allow_device_nodes:
                raise _reject(entry, "device nodes in layers are not allowed "
                                     "(crio.image.allow_device_nodes is false)")
            self._clear_existing(parent, parts, keep_dir=False)
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(base, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=parent)
            self._set_meta_path(parent, base, member, chmod=True)
        else:
            raise _reject(entry, f"unsupported tar entry type {member.type!r}")

    def _whiteout(self, parts: Parts, member: tarfile.TarInfo, entry: str) -> None:
        parent_parts, base = parts[:-1], parts[-1]
        parent = self._dir_fd(parent_parts, entry, create=True)
        if base == OPAQUE_MARKER:
            os.setxattr(parent, OPAQUE_XATTR, b"y")
            return
        if base.startswith(WHITEOUT_META_PREFIX):
            return  # aufs bookkeeping (e.g. its hard-link directory), not content
        name = base[len(WHITEOUT_PREFIX):]
        if name in ("", ".", ".."):
            raise _reject(entry, "whiteout without a valid file name")
        target = parent_parts + (name,)
        self._clear_existing(parent, target, keep_dir=False)
        os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=parent)
        os.chown(name, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)

    def _directory(self, parent: int, parts: Parts, member: tarfile.TarInfo, entry: str) -> None:
        if not self._clear_existing(parent, parts, keep_dir=True):
            os.mkdir(parts[-1], 0o700, dir_fd=parent)
        fd = self._dir_fd(parts, entry, create=False)
        os.fchown(fd, member.uid, member.gid)
        self._set_xattrs_fd(fd, member)
        self._deferred[parts] = (member.mode & 0o7777, _mtime_ns(member))

    def _symlink(self, parent: int, parts: Parts, member: tarfile.TarInfo, entry: str) -> None:
        if not member.linkname:
            raise _reject(entry, "symbolic link with an empty target")
        # The target is not followed here; it is resolved later inside the
        # container's root, so it may be absolute.
        self._clear_existing(parent, parts, keep_dir=False)
        os.symlink(member.linkname, parts[-1], dir_fd=parent)
        self._set_meta_path(parent, parts[-1], member, chmod=False)

    def _hardlink(self, parts: Parts, member: tarfile.TarInfo, entry: str) -> None:
        target = split_entry_name(member.linkname, entry, "hard link target")
        if not target:
            raise _reject(entry, "hard link to the layer root")
        if target == parts:
            return
        parent = self._dir_fd(parts[:-1], entry, create=True)
        self._clear_existing(parent, parts, keep_dir=False)
        parent = self._dir_fd(parts[:-1], entry, create=True)
        target_parent = self._dir_fd(target[:-1], entry, create=False)
        try:
            st = os.lstat(target[-1], dir_fd=target_parent)
        except FileNotFoundError:
            raise _reject(entry, f"hard link target {member.linkname!r} does not exist in this layer") from None
        if stat.S_ISDIR(st.st_mode):
            raise _reject(entry, f"hard link target {member.linkname!r} is a directory")
        os.link(target[-1], parts[-1], src_dir_fd=target_parent, dst_dir_fd=parent,
                follow_symlinks=False)

    def _regular(self, parent: int, parts: Parts, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        try:
            fd = os.open(parts[-1], _FILE_FLAGS, 0o600, dir_fd=parent)
        except FileExistsError:
            # O_EXCL also refuses an existing symlink: it is replaced, never followed.
            self._clear_existing(parent, parts, keep_dir=False)
            fd = os.open(parts[-1], _FILE_FLAGS, 0o600, dir_fd=parent)
        try:
            source = tar.extractfile(member) if member.size else None
            if source is not None:
                while chunk := source.read(_COPY_CHUNK):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            self._set_meta_fd(fd, member)
        finally:
            os.close(fd)

    def finish(self) -> None:
        for parts in sorted(self._deferred, key=len, reverse=True):
            mode, mtime = self._deferred[parts]
            try:
                fd = self._dir_fd(parts, "/".join(parts) or ".", create=False)
            except InvalidArgument:
                continue  # replaced by a later entry
            os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime, mtime))


def extract_tar(stream: BinaryIO, dest: str, *, allow_device_nodes: bool) -> None:
    """Extract the tar read from `stream` into the existing, empty directory `dest`."""
    root_fd = os.open(dest, _DIR_FLAGS)
    extractor = _Extractor(root_fd, allow_device_nodes)
    entry = "(tar header)"
    try:
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo) as tar:
            while (member := tar.next()) is not None:
                # Stream mode keeps every header read; nothing here needs them.
                tar.members.clear()
                entry = member.name
                try:
                    extractor.add(member, tar)
                except OSError as e:
                    raise _fs_error(e, entry, dest) from e
            entry = "(directory metadata)"
            try:
                extractor.finish()
            except OSError as e:
                raise _fs_error(e, entry, dest) from e
    except tarfile.TarError as e:
        raise InvalidArgument(f"layer is not a valid tar archive (after {entry!r}): {e}") from e
    finally:
        extractor.close()
        os.close(root_fd)
