"""Test support: layer blobs built from tar entries (as imaged would hand them over), mount cleanup."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import zstandard

from services.storaged import overlay
from shared import mountinfo

MTIME = 1_600_000_000
MEDIA_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "tar": "application/vnd.oci.image.layer.v1.tar",
    "docker": "application/vnd.docker.image.rootfs.diff.tar.gzip",
}


def _info(name: str, type_: bytes, *, mode: int, uid: int = 0, gid: int = 0,
          mtime: float = MTIME, xattrs: dict[str, bytes] | None = None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = mtime
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                            for k, v in xattrs.items()}
    return info


def file(name: str, data: bytes = b"", *, mode: int = 0o644, **kw) -> tuple[tarfile.TarInfo, bytes]:
    info = _info(name, tarfile.REGTYPE, mode=mode, **kw)
    info.size = len(data)
    return info, data


def directory(name: str, *, mode: int = 0o755, **kw) -> tuple[tarfile.TarInfo, None]:
    return _info(name, tarfile.DIRTYPE, mode=mode, **kw), None


def symlink(name: str, target: str, **kw) -> tuple[tarfile.TarInfo, None]:
    info = _info(name, tarfile.SYMTYPE, mode=0o777, **kw)
    info.linkname = target
    return info, None


def hardlink(name: str, target: str, **kw) -> tuple[tarfile.TarInfo, None]:
    info = _info(name, tarfile.LNKTYPE, mode=0o644, **kw)
    info.linkname = target
    return info, None


def fifo(name: str, *, mode: int = 0o600, **kw) -> tuple[tarfile.TarInfo, None]:
    return _info(name, tarfile.FIFOTYPE, mode=mode, **kw), None


def chardev(name: str, major: int, minor: int, *, mode: int = 0o666, **kw) -> tuple[tarfile.TarInfo, None]:
    info = _info(name, tarfile.CHRTYPE, mode=mode, **kw)
    info.devmajor, info.devminor = major, minor
    return info, None


def tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(data: bytes, compression: str) -> bytes:
    if compression in ("gzip", "docker"):
        return gzip.compress(data, compresslevel=1)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(data)
    return data


@dataclass(frozen=True)
class Blob:
    path: str
    diff_id: str
    media_type: str

    def spec(self) -> dict:
        return {"path": self.path, "diff_id": self.diff_id, "media_type": self.media_type,
                "digest": "sha256:" + hashlib.sha256(Path(self.path).read_bytes()).hexdigest(),
                "size": os.path.getsize(self.path)}


def write_blob(blob_dir: Path, entries: list, compression: str = "gzip") -> Blob:
    """Write a layer blob into the (imaged) blob directory, as a pull would leave it."""
    raw = tar_bytes(entries)
    data = compress(raw, compression)
    blob_dir.mkdir(parents=True, exist_ok=True)
    path = blob_dir / hashlib.sha256(data).hexdigest()
    path.write_bytes(data)
    return Blob(str(path), "sha256:" + hashlib.sha256(raw).hexdigest(), MEDIA_TYPES[compression])


def unmount_everything_under(path: Path) -> None:
    for point in mountinfo.mount_points_under(os.path.realpath(path)):
        while overlay.unmount_blocking(point):
            pass
