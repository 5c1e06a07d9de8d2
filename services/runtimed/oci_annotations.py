"""What a bundle's config.json says of its pod or container, under CRI-O's annotation names.

runc keeps a container's annotations with its own state (`runc list` shows
them), so a pod or container whose record was lost (recovery.py) is still
found with its names, metadata, labels, image and log path, as CRI-O finds its
own from the same annotations.
"""

from __future__ import annotations

import json
from typing import Any

CONTAINER_TYPE = "io.kubernetes.cri-o.ContainerType"
SANDBOX_ID = "io.kubernetes.cri-o.SandboxID"
CONTAINER_ID = "io.kubernetes.cri-o.ContainerID"
NAME = "io.kubernetes.cri-o.Name"
SANDBOX_NAME = "io.kubernetes.cri-o.SandboxName"
METADATA = "io.kubernetes.cri-o.Metadata"
LABELS = "io.kubernetes.cri-o.Labels"
ANNOTATIONS = "io.kubernetes.cri-o.Annotations"
LOG_PATH = "io.kubernetes.cri-o.LogPath"
IMAGE = "io.kubernetes.cri-o.Image"
IMAGE_NAME = "io.kubernetes.cri-o.ImageName"
IMAGE_REF = "io.kubernetes.cri-o.ImageRef"
CGROUP_PARENT = "io.kubernetes.cri-o.CgroupParent"

TYPE_SANDBOX = "sandbox"
TYPE_CONTAINER = "container"


def _described(config: dict[str, Any]) -> dict[str, str]:
    return {METADATA: json.dumps(config.get("metadata") or {}, sort_keys=True),
            LABELS: json.dumps(config.get("labels") or {}, sort_keys=True),
            ANNOTATIONS: json.dumps(config.get("annotations") or {}, sort_keys=True)}


def of_container(rec: dict[str, Any], sandbox: dict[str, Any]) -> dict[str, str]:
    """A container's own annotations, from its record (image and log path set) and its pod's."""
    return {NAME: rec["name"], SANDBOX_NAME: sandbox["name"], LOG_PATH: rec.get("log_path", ""),
            IMAGE: rec.get("image_id", ""), IMAGE_NAME: rec.get("image_name", ""),
            IMAGE_REF: rec.get("image_ref", ""), CGROUP_PARENT: sandbox.get("cgroup_parent", ""),
            **_described(rec["config"])}


def of_sandbox(rec: dict[str, Any]) -> dict[str, str]:
    """The annotations of a pod's infra process, from the pod's record."""
    return {NAME: rec["name"], SANDBOX_NAME: rec["name"], CGROUP_PARENT: rec.get("cgroup_parent", ""),
            **_described(rec["config"])}


def config_of(annotations: dict[str, str]) -> dict[str, Any]:
    """The CRI configuration's metadata, labels and annotations, as far as the annotations say."""
    out: dict[str, Any] = {}
    for key, field in ((METADATA, "metadata"), (LABELS, "labels"), (ANNOTATIONS, "annotations")):
        try:
            value = json.loads(annotations.get(key) or "{}")
        except ValueError:
            value = {}
        out[field] = value if isinstance(value, dict) else {}
    return out
