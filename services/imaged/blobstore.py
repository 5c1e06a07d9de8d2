"""The content-addressed blob store: blobs/sha256/<hex>, written only once verified.

A blob streams into a temporary file beside the store while it is hashed;
more bytes than declared stop the download at once; the file is renamed to
its digest's name only when size and digest match, and removed otherwise,
so the store never holds a byte that was not verified. A write that finds
no room (ENOSPC, EDQUOT) removes its temporary file too and fails with
ResourceExhausted naming the full file system.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import AsyncIterator, BinaryIO

import structlog

from shared.errors import DataLoss, InvalidArgument, is_no_space, out_of_space

log = structlog.get_logger(__name__)

# Chunks are written and hashed in a thread in batches of this size, so
# the event loop neither blocks on disk nor pays a thread hop per chunk.
FLUSH_BYTES = 1024 * 1024


class BlobVerificationError(DataLoss):
    """A blob's bytes do not match the digest or size its descriptor declares."""


def hex_of(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise InvalidArgument(f"unsupported digest {digest[:80]!r}: only sha256 is supported")
    return hexpart


def _write(f: BinaryIO, hasher: "hashlib._Hash", chunks: list[bytes]) -> None:
    for chunk in chunks:
        hasher.update(chunk)
        f.write(chunk)


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "sha256"
        self.tmp_dir = root / "tmp"

    def setup(self) -> None:
        """Create the directories and drop temporary files a killed pull left behind."""
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)

    def path(self, digest: str) -> Path:
        return self.blob_dir / hex_of(digest)

    def has(self, digest: str, size: int | None = None) -> bool:
        """Whether the blob is stored (and, with `size`, has that size)."""
        try:
            st = os.stat(self.path(digest))
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def read(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def remove(self, digest: str) -> None:
        try:
            os.unlink(self.path(digest))
        except FileNotFoundError:
            pass

    def digests(self) -> set[str]:
        return {f"sha256:{p.name}" for p in self.blob_dir.iterdir() if len(p.name) == 64}

    async def ingest(self, digest: str, size: int, chunks: AsyncIterator[bytes], *, what: str) -> Path:
        """Stream `chunks` into the store as `digest`; raises BlobVerificationError on mismatch."""
        final = self.path(digest)
        try:
            fd, tmp_name = tempfile.mkstemp(dir=self.tmp_dir, prefix=final.name[:12] + ".")
        except OSError as e:
            if is_no_space(e):
                raise await asyncio.to_thread(out_of_space, e, self.root, what) from e
            raise
        tmp = Path(tmp_name)
        hasher = hashlib.sha256()
        received = 0
        pending: list[bytes] = []
        pending_bytes = 0
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    received += len(chunk)
                    if received > size:
                        raise BlobVerificationError(
                            f"{what}: registry sent more than the {size} bytes the manifest declares")
                    pending.append(chunk)
                    pending_bytes += len(chunk)
                    if pending_bytes >= FLUSH_BYTES:
                        await asyncio.to_thread(_write, f, hasher, pending)
                        pending, pending_bytes = [], 0
                if pending:
                    await asyncio.to_thread(_write, f, hasher, pending)
            if received != size:
                raise BlobVerificationError(
                    f"{what}: registry sent {received} bytes, the manifest declares {size}")
            actual = f"sha256:{hasher.hexdigest()}"
            if actual != digest:
                raise BlobVerificationError(f"{what}: content digest {actual} does not match {digest}")
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            return final
        except BlobVerificationError as e:
            log.warning("blob_rejected", digest=digest, error=e.message)
            raise
        except OSError as e:
            if is_no_space(e):
                raise await asyncio.to_thread(out_of_space, e, self.root, what) from e
            raise
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def put_verified(self, digest: str, data: bytes, *, what: str) -> Path:
        """Store bytes already checked against `digest` (manifests, read in memory)."""
        final = self.path(digest)
        if final.exists():
            return final
        tmp_name = None
        try:
            fd, tmp_name = tempfile.mkstemp(dir=self.tmp_dir, prefix=final.name[:12] + ".")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp_name, 0o444)
            os.replace(tmp_name, final)
        except OSError as e:
            if is_no_space(e):
                raise out_of_space(e, self.root, what) from e
            raise
        finally:
            if tmp_name is not None:
                try:
                    os.unlink(tmp_name)
                except FileNotFoundError:
                    pass
        return final


def disk_usage(root: Path) -> tuple[int, int]:
    """(bytes used on disk, inodes used) under `root`, counting each hard-linked inode once."""
    used = 0
    inodes = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            used += st.st_blocks * 512
            inodes += 1
    return used, inodes
