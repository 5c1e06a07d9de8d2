"""The four manifest kinds, their layers and platform selection.

OCI image manifest and index, Docker schema 2 manifest and manifest list.
Parsing checks the shape strictly: a descriptor's digest, size and media
type must be there and be well formed, since they decide what is fetched
and how it is verified.
"""

from __future__ import annotations

import json
import platform as _platform
import re
from dataclasses import dataclass
from typing import Any

from shared.errors import FailedPrecondition, InvalidArgument

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")

MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join(MANIFEST_TYPES)

CONFIG_TYPES = ("application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json")

# Layer media types and their compression.
LAYER_TYPES: dict[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}

# A manifest or config larger than this is refused (containers/image uses 4 MiB too).
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_CONFIG_BYTES = 4 * 1024 * 1024

_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] | None = None


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class ImageManifest:
    media_type: str
    config: Descriptor
    layers: list[Descriptor]


@dataclass(frozen=True)
class ManifestIndex:
    media_type: str
    manifests: list[Descriptor]


_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
         "armv7l": "arm", "armv6l": "arm", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
_DEFAULT_VARIANT = {"arm64": "v8", "armv7l": "v7", "armv6l": "v6"}


def parse_platform(text: str) -> Platform:
    """`os/arch[/variant]`; empty means this machine."""
    if not text:
        machine = _platform.machine()
        arch = _ARCH.get(machine, machine)
        return Platform("linux", arch, _DEFAULT_VARIANT.get(machine, ""))
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidArgument(f"invalid image platform {text!r}: expected os/arch[/variant]")
    return Platform(*parts)


def _descriptor(raw: Any, where: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{where}: descriptor is not an object")
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise InvalidArgument(f"{where}: descriptor has no mediaType")
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise InvalidArgument(f"{where}: descriptor digest {str(digest)[:80]!r} is not a sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument(f"{where}: descriptor size {size!r} is invalid")
    plat = raw.get("platform")
    return Descriptor(media_type, digest, size, plat if isinstance(plat, dict) else None)


def parse(body: bytes, content_type: str, where: str) -> ImageManifest | ManifestIndex:
    """Parse a manifest body; its kind comes from `mediaType`, else from the Content-Type."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise InvalidArgument(f"{where}: manifest is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{where}: manifest is not a JSON object")
    media_type = doc.get("mediaType") or content_type.split(";")[0].strip()
    if media_type in DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise FailedPrecondition(f"{where}: Docker schema 1 manifests are not supported")
    if doc.get("schemaVersion") != 2:
        raise InvalidArgument(f"{where}: unsupported manifest schemaVersion {doc.get('schemaVersion')!r}")
    if not media_type:
        # An OCI document may omit mediaType; its fields say what it is.
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if media_type in INDEX_TYPES:
        manifests = doc.get("manifests")
        if not isinstance(manifests, list):
            raise InvalidArgument(f"{where}: index has no manifests list")
        return ManifestIndex(media_type, [_descriptor(m, f"{where}: manifests[{i}]") for i, m in enumerate(manifests)])
    if media_type in (OCI_MANIFEST, DOCKER_MANIFEST):
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise InvalidArgument(f"{where}: manifest has no layers list")
        config = _descriptor(doc.get("config"), f"{where}: config")
        descs = [_descriptor(layer, f"{where}: layers[{i}]") for i, layer in enumerate(layers)]
        for i, d in enumerate(descs):
            if d.media_type not in LAYER_TYPES:
                raise FailedPrecondition(f"{where}: layers[{i}] has unsupported media type {d.media_type!r}")
        if config.size > MAX_CONFIG_BYTES:
            raise InvalidArgument(f"{where}: config of {config.size} bytes exceeds the {MAX_CONFIG_BYTES}-byte limit")
        return ImageManifest(media_type, config, descs)
    raise FailedPrecondition(f"{where}: unsupported manifest media type {media_type!r}")


class NoMatchingPlatform(FailedPrecondition):
    """The index has no manifest for the wanted platform."""


def select_platform(index: ManifestIndex, wanted: Platform, where: str) -> Descriptor:
    """The manifest of `index` for `wanted`: exact variant first, then one without variant."""
    matches: list[tuple[int, Descriptor]] = []
    for d in index.manifests:
        if d.media_type not in (OCI_MANIFEST, DOCKER_MANIFEST):
            continue
        p = d.platform or {}
        if p.get("os") != wanted.os or p.get("architecture") != wanted.architecture:
            continue
        variant = p.get("variant") or ""
        if variant == wanted.variant:
            rank = 0
        elif not variant or not wanted.variant:
            rank = 1
        else:
            continue
        matches.append((rank, d))
    if not matches:
        offered = sorted({"/".join(x for x in ((d.platform or {}).get("os", "?"), (d.platform or {}).get("architecture", "?"),
                                                (d.platform or {}).get("variant", "")) if x) for d in index.manifests})
        raise NoMatchingPlatform(f"{where}: no image for platform {wanted} (offered: {', '.join(offered) or 'none'})")
    matches.sort(key=lambda m: m[0])
    return matches[0][1]


def image_config(raw: bytes, where: str) -> dict[str, Any]:
    """The parts of an image config that records keep, plus diff ids."""
    try:
        doc = json.loads(raw)
    except ValueError:
        raise InvalidArgument(f"{where}: image config is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{where}: image config is not a JSON object")
    cfg = doc.get("config") or {}
    if not isinstance(cfg, dict):
        raise InvalidArgument(f"{where}: image config 'config' is not an object")
    rootfs = doc.get("rootfs") or {}
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) and _DIGEST_RE.match(d) for d in diff_ids):
        raise InvalidArgument(f"{where}: image config has no valid rootfs.diff_ids")

    def strs(value: Any) -> list[str]:
        return [str(v) for v in value] if isinstance(value, list) else []

    labels = cfg.get("Labels") or {}
    return {
        "user": str(cfg.get("User") or ""),
        "env": strs(cfg.get("Env")),
        "entrypoint": strs(cfg.get("Entrypoint")),
        "cmd": strs(cfg.get("Cmd")),
        "working_dir": str(cfg.get("WorkingDir") or ""),
        "exposed_ports": sorted(str(p) for p in (cfg.get("ExposedPorts") or {})),
        "labels": {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        "stop_signal": str(cfg.get("StopSignal") or ""),
        "volumes": sorted(str(v) for v in (cfg.get("Volumes") or {})),
        "os": str(doc.get("os") or ""),
        "architecture": str(doc.get("architecture") or ""),
        "created": str(doc.get("created") or ""),
        "diff_ids": diff_ids,
    }
