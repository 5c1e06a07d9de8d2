"""runtimed's visible pods and containers in the frontend, and the CRI answers read from them.

Each object is kept as runtimed's feed gave it (services/runtimed/state_feed.py):
its PodSandboxStatus or ContainerStatus as a dict, built by runtimed's status
builders. The protobuf messages are made from it once, when first asked for,
and kept until the object changes; the unfiltered lists are one response
message each, made again only after a change. So a relist of a hundred pods
costs one lookup, not a hundred conversions.

Lookups follow runtimed's: an exact id, or an id prefix that names a single
object; filters match id prefixes, the state and every label of the selector.
"""

from __future__ import annotations

from typing import Any

from cri_api.v1 import api_pb2

from services.frontend.runtime_convert import to_message
from shared.errors import NotFound

# The ListPodSandbox and ListContainers entries: the fields of the status they share.
_POD_FIELDS = ("id", "metadata", "state", "created_at", "labels", "annotations", "runtime_handler")
_CONTAINER_FIELDS = ("id", "metadata", "image", "image_ref", "image_id", "state", "created_at", "labels",
                     "annotations")


class _Pod:
    __slots__ = ("id", "status", "state", "labels", "_entry", "_response")

    def __init__(self, view: dict[str, Any]) -> None:
        self.status: dict[str, Any] = view["status"]
        self.id: str = self.status["id"]
        self.state = api_pb2.PodSandboxState.Value(self.status["state"])
        self.labels: dict[str, str] = self.status.get("labels") or {}
        self._entry: api_pb2.PodSandbox | None = None
        self._response: api_pb2.PodSandboxStatusResponse | None = None

    def entry(self) -> api_pb2.PodSandbox:
        if self._entry is None:
            self._entry = to_message({k: self.status[k] for k in _POD_FIELDS if k in self.status}, api_pb2.PodSandbox)
        return self._entry

    def response(self) -> api_pb2.PodSandboxStatusResponse:
        if self._response is None:
            self._response = api_pb2.PodSandboxStatusResponse(
                status=to_message(self.status, api_pb2.PodSandboxStatus))
        return self._response


class _Container:
    __slots__ = ("id", "sandbox_id", "status", "state", "labels", "_entry", "_response")

    def __init__(self, view: dict[str, Any]) -> None:
        self.status: dict[str, Any] = view["status"]
        self.sandbox_id: str = view["sandbox_id"]
        self.id: str = self.status["id"]
        self.state = api_pb2.ContainerState.Value(self.status["state"])
        self.labels: dict[str, str] = self.status.get("labels") or {}
        self._entry: api_pb2.Container | None = None
        self._response: api_pb2.ContainerStatusResponse | None = None

    def entry(self) -> api_pb2.Container:
        if self._entry is None:
            fields = {k: self.status[k] for k in _CONTAINER_FIELDS if k in self.status}
            self._entry = to_message({**fields, "pod_sandbox_id": self.sandbox_id}, api_pb2.Container)
        return self._entry

    def response(self) -> api_pb2.ContainerStatusResponse:
        if self._response is None:
            self._response = api_pb2.ContainerStatusResponse(
                status=to_message(self.status, api_pb2.ContainerStatus))
        return self._response


def _find(table: dict[str, Any], object_id: str) -> Any:
    """By id, or by a prefix that only one id has (as runtimed's records find them)."""
    found = table.get(object_id)
    if found is None and object_id and len(object_id) < 64:
        matches = [o for i, o in table.items() if i.startswith(object_id)]
        if len(matches) == 1:
            found = matches[0]
    return found


def _labelled(labels: dict[str, str], selector: Any) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


class RuntimeView:
    def __init__(self) -> None:
        self.pods: dict[str, _Pod] = {}
        self.containers: dict[str, _Container] = {}
        self._pod_list: api_pb2.ListPodSandboxResponse | None = None
        self._container_list: api_pb2.ListContainersResponse | None = None

    # -- kept by the feed ---------------------------------------------------------------

    def reset(self, views: dict[str, Any]) -> None:
        self.pods, self.containers = {}, {}
        self._pod_list = self._container_list = None
        for key, view in views.items():
            self.apply(key, view)

    def apply(self, key: str, view: dict[str, Any] | None) -> None:
        kind, _, object_id = key.partition("/")
        if kind == "sandbox":
            self._pod_list = None
            if view is None:
                self.pods.pop(object_id, None)
            else:
                self.pods[object_id] = _Pod(view)
        elif kind == "container":
            self._container_list = None
            if view is None:
                self.containers.pop(object_id, None)
            else:
                self.containers[object_id] = _Container(view)
        else:
            raise ValueError(f"unknown kind of object {key!r}")

    # -- answers ----------------------------------------------------------------------------

    def pod_status(self, pod_id: str) -> api_pb2.PodSandboxStatusResponse:
        pod = _find(self.pods, pod_id)
        if pod is None:
            raise NotFound(f"pod sandbox {pod_id} not found")
        return pod.response()

    def container_status(self, container_id: str) -> api_pb2.ContainerStatusResponse:
        container = _find(self.containers, container_id)
        if container is None:
            raise NotFound(f"container {container_id} not found")
        return container.response()

    def list_pods(self, f: api_pb2.PodSandboxFilter | None) -> api_pb2.ListPodSandboxResponse:
        state = f.state.state if f is not None and f.HasField("state") else None
        if f is None or not (f.id or state is not None or f.label_selector):
            if self._pod_list is None:
                self._pod_list = api_pb2.ListPodSandboxResponse(items=[p.entry() for p in self.pods.values()])
            return self._pod_list
        return api_pb2.ListPodSandboxResponse(items=[
            p.entry() for p in self.pods.values()
            if (not f.id or p.id.startswith(f.id)) and (state is None or p.state == state)
            and _labelled(p.labels, f.label_selector)])

    def list_containers(self, f: api_pb2.ContainerFilter | None) -> api_pb2.ListContainersResponse:
        state = f.state.state if f is not None and f.HasField("state") else None
        if f is None or not (f.id or f.pod_sandbox_id or state is not None or f.label_selector):
            if self._container_list is None:
                self._container_list = api_pb2.ListContainersResponse(
                    containers=[c.entry() for c in self.containers.values()])
            return self._container_list
        return api_pb2.ListContainersResponse(containers=[
            c.entry() for c in self.containers.values()
            if (not f.id or c.id.startswith(f.id)) and (not f.pod_sandbox_id or c.sandbox_id.startswith(f.pod_sandbox_id))
            and (state is None or c.state == state) and _labelled(c.labels, f.label_selector)])
