"""Converters between the CRI image messages and imaged's records, and the records' sizes."""

from __future__ import annotations

import json
from typing import Any

import structlog
from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext
from shared.errors import CriopyError, InvalidArgument

log = structlog.get_logger(__name__)


def image_reference(spec: api_pb2.ImageSpec, what: str = "image") -> str:
    if not spec.image:
        raise InvalidArgument(f"{what}: an image reference is required")
    return spec.image


def auth_params(auth: api_pb2.AuthConfig) -> dict[str, str] | None:
    """The AuthConfig fields that are set, or None when there are none."""
    fields = {name: getattr(auth, name) for name in
              ("username", "password", "auth", "server_address", "identity_token", "registry_token")}
    fields = {k: v for k, v in fields.items() if v}
    return fields or None


async def complete_sizes(call: CallContext, records: list[dict[str, Any]]) -> None:
    """Give records that lack their layers' uncompressed size (pulled before it was kept) that size.

    storaged measures the stacks in one call and imaged records each size, so
    this happens once per image; until it succeeds, imaged's stand-in stays.
    """
    missing: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record.get("unpacked_size") is None and record.get("top_layer"):
            missing.setdefault(record["top_layer"], []).append(record)
    if not missing:
        return
    try:
        sizes = await call.daemon("storaged", "unpacked_sizes", top_layers=sorted(missing))
        for top_layer, unpacked_size in sizes.items():
            for record in missing.get(top_layer, []):
                stored = await call.daemon("imaged", "set_top_layer", image_id=record["id"],
                                           top_layer=top_layer, unpacked_size=unpacked_size)
                record.update(size=stored["size"], unpacked_size=unpacked_size)
    except CriopyError as e:
        log.warning("image_sizes_not_completed", images=sum(map(len, missing.values())), error=e.message)


def _user(user: str) -> tuple[int | None, str]:
    """An image's user as the CRI wants it: a numeric uid, or a name to resolve in the rootfs."""
    name = user.split(":", 1)[0]
    if not name:
        return None, ""
    if name.isdigit():
        return int(name), ""
    return None, name


def to_image(record: dict[str, Any]) -> api_pb2.Image:
    uid, username = _user(record["config"].get("user", ""))
    image = api_pb2.Image(
        id=record["id"], repo_tags=record["repo_tags"], repo_digests=record["repo_digests"],
        size=record["size"], username=username, pinned=record["pinned"],
        spec=api_pb2.ImageSpec(image=record["id"]))
    if uid is not None:
        image.uid.value = uid
    return image


def verbose_info(record: dict[str, Any]) -> dict[str, str]:
    """ImageStatus verbose info: one JSON document under "info", as CRI-O gives it."""
    config = record["config"]
    info = {
        "id": record["id"],
        "labels": config.get("labels", {}),
        "imageSpec": {
            "created": record.get("created", ""),
            "architecture": config.get("architecture", ""),
            "os": config.get("os", ""),
            "config": {
                "User": config.get("user", ""), "Env": config.get("env", []),
                "Entrypoint": config.get("entrypoint", []), "Cmd": config.get("cmd", []),
                "WorkingDir": config.get("working_dir", ""),
                "ExposedPorts": {p: {} for p in config.get("exposed_ports", [])},
                "Volumes": {v: {} for v in config.get("volumes", [])},
                "Labels": config.get("labels", {}), "StopSignal": config.get("stop_signal", ""),
            },
            "rootfs": {"type": "layers", "diff_ids": [l["diff_id"] for l in record.get("layers", [])]},
        },
        "manifestDigest": record.get("manifest_digest", ""),
        "manifestMediaType": record.get("manifest_media_type", ""),
        "layers": record.get("layers", []),
        "topLayer": record.get("top_layer"),
    }
    return {"info": json.dumps(info, sort_keys=True)}


def filesystem_usage(mountpoint: str, used_bytes: int, inodes_used: int, timestamp_ns: int) -> api_pb2.FilesystemUsage:
    usage = api_pb2.FilesystemUsage(timestamp=timestamp_ns,
                                    fs_id=api_pb2.FilesystemIdentifier(mountpoint=mountpoint))
    usage.used_bytes.value = used_bytes
    usage.inodes_used.value = inodes_used
    return usage
