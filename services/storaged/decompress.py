"""The uncompressed tar stream of a layer blob, hashed as it is read."""

from __future__ import annotations

import gzip
import hashlib
import sys
import zlib
from typing import BinaryIO

from shared.errors import InvalidArgument

GZIP = "gzip"
ZSTD = "zstd"
PLAIN = "tar"

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a damaged stream raises while it is read; zstandard's only once zstandard was needed."""
    zstd = sys.modules.get("zstandard")
    return (OSError, EOFError, zlib.error) + ((zstd.ZstdError,) if zstd is not None else ())


def compression_of(media_type: str) -> str:
    """gzip, zstd or tar, from an OCI or Docker layer media type."""
    mt = media_type.strip().lower()
    if mt.endswith("+gzip") or mt.endswith(".tar.gzip") or mt.endswith(".tar.gz"):
        return GZIP
    if mt.endswith("+zstd") or mt.endswith(".tar.zstd"):
        return ZSTD
    if mt.endswith(".tar") or mt.endswith("layer.v1.tar") or mt.endswith("diff.tar"):
        return PLAIN
    raise InvalidArgument(f"unsupported layer media type {media_type!r}")


def sniff(head: bytes) -> str:
    """The compression of a blob from its first bytes (for blobs without a media type)."""
    if head.startswith(_GZIP_MAGIC):
        return GZIP
    if head.startswith(_ZSTD_MAGIC):
        return ZSTD
    return PLAIN


class HashingReader:
    """A read-only stream that hashes and counts everything read through it."""

    def __init__(self, raw: BinaryIO, compression: str) -> None:
        self._raw = raw
        self._compression = compression
        self._sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._raw.read(n)
        except _read_errors() as e:
            raise InvalidArgument(
                f"layer blob is not a valid {self._compression} stream "
                f"(after {self.size} uncompressed bytes): {e}") from e
        self._sha.update(data)
        self.size += len(data)
        return data

    def drain(self, chunk: int = 1 << 20) -> None:
        """Read to the end (the tar end marker may be followed by padding)."""
        while self.read(chunk):
            pass

    def digest(self) -> str:
        return "sha256:" + self._sha.hexdigest()


def uncompressed(blob: BinaryIO, compression: str) -> BinaryIO:
    """A stream of the tar inside `blob`."""
    if compression == GZIP:
        return gzip.GzipFile(fileobj=blob, mode="rb")  # type: ignore[return-value]
    if compression == ZSTD:
        import zstandard  # only once a zstd layer comes: most images have none

        reader = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True)
        return reader  # type: ignore[return-value]
    return blob
