"""to_message reads a daemon's dict exactly as ParseDict does, on its fast way and on ParseDict's."""

from __future__ import annotations

from typing import Any

import pytest
from cri_api.v1 import api_pb2
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError

from services.frontend.runtime_convert import to_message

CID, PID = "c" * 64, "p" * 64

# Shaped as runtimed's list and status entries are: plain ints, enum names, nested maps.
CONTAINER: dict[str, Any] = {
    "id": CID, "pod_sandbox_id": PID, "metadata": {"name": "sleep", "attempt": 2},
    "image": {"image": "registry/busybox:latest"}, "image_ref": "sha256:" + "a" * 64,
    "image_id": "sha256:" + "a" * 64, "state": "CONTAINER_RUNNING", "created_at": 1_700_000_000_123_456_789,
    "labels": {"app": "web"}, "annotations": {"io.kubernetes.container.hash": "1234"},
}
SANDBOX_STATUS: dict[str, Any] = {
    "id": PID, "metadata": {"name": "web", "uid": "u1", "namespace": "default", "attempt": 0},
    "state": "SANDBOX_NOTREADY", "created_at": 5, "labels": {}, "annotations": {"a": "b"},
    "runtime_handler": "runc",
    "network": {"ip": "10.0.0.2", "additional_ips": [{"ip": "fd00::2"}]},
    "linux": {"namespaces": {"options": {"network": "NODE", "pid": "CONTAINER", "ipc": "POD"}}},
}


def _full_container_status() -> api_pb2.ContainerStatus:
    status = api_pb2.ContainerStatus(
        id=CID, metadata=api_pb2.ContainerMetadata(name="sleep", attempt=1),
        state=api_pb2.ContainerState.CONTAINER_EXITED, created_at=1, started_at=2, finished_at=3, exit_code=137,
        image=api_pb2.ImageSpec(image="busybox"), image_ref="sha256:x", reason="OOMKilled", message="killed",
        labels={"a": "b"}, annotations={"c": "d"}, log_path="/var/log/pods/x/0.log",
        mounts=[api_pb2.Mount(container_path="/data", host_path="/srv", readonly=True,
                              propagation=api_pb2.MountPropagation.PROPAGATION_HOST_TO_CONTAINER)],
        resources=api_pb2.ContainerResources(linux=api_pb2.LinuxContainerResources(
            cpu_period=100_000, cpu_quota=50_000, cpu_shares=512, memory_limit_in_bytes=64 << 20,
            oom_score_adj=1000, unified={"memory.high": "max"})))
    status.user.linux.uid = 1000
    status.user.linux.gid = 1000
    status.user.linux.supplemental_groups.extend([10, 20])
    return status


def _parse(data: dict[str, Any], cls: type) -> Any:
    return ParseDict(data, cls(), ignore_unknown_fields=True)


@pytest.mark.parametrize("data, cls", [
    (CONTAINER, api_pb2.Container),
    ({k: v for k, v in CONTAINER.items() if k != "pod_sandbox_id"}, api_pb2.ContainerStatus),
    (SANDBOX_STATUS, api_pb2.PodSandboxStatus),
    ({k: SANDBOX_STATUS[k] for k in ("id", "metadata", "state", "created_at", "labels")}, api_pb2.PodSandbox),
    # What only ParseDict reads: an unknown key or enum name (ignored), a JSON name, an int64 as a string.
    ({**CONTAINER, "rootfs": "/x"}, api_pb2.Container),
    ({**CONTAINER, "state": "CONTAINER_SLEEPY"}, api_pb2.Container),
    ({**CONTAINER, "podSandboxId": PID}, api_pb2.Container),
    ({**CONTAINER, "created_at": "42"}, api_pb2.Container),
])
def test_reads_a_daemon_dict_as_parse_dict_does(data: dict[str, Any], cls: type) -> None:
    message = to_message(data, cls)
    assert message == _parse(data, cls)
    assert message.id  # not an empty message that merely equals another


def test_a_status_written_by_message_to_dict_comes_back_whole() -> None:
    status = _full_container_status()
    data = MessageToDict(status, preserving_proto_field_name=True)
    assert isinstance(data["resources"]["linux"]["cpu_period"], str)  # int64 as JSON writes it
    assert to_message(data, api_pb2.ContainerStatus) == status


def test_a_value_parse_dict_refuses_is_still_refused() -> None:
    with pytest.raises(ParseError):
        to_message({**CONTAINER, "created_at": "soon"}, api_pb2.Container)
