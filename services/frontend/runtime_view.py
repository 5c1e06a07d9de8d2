"""runtimed's visible pods and containers in the frontend, and the CRI answers read from them.

Each object is kept as runtimed's feed gave it (services/runtimed/state_feed.py):
its PodSandboxStatus or ContainerStatus as a dict, built by runtimed's status
builders. The protobuf messages are made from it once, when first asked for,
and kept until the object changes; a list, for a given filter, is one
response message made again only after a pod or container changes. So a
relist of a hundred pods costs one lookup, not a hundred conversions.

Lookups follow runtimed's: an exact id, or an id prefix that names a single
object; filters match id prefixes, the state and every label of the selector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from cri_api.v1 import api_pb2
from google.protobuf.message import Message

from services.frontend.runtime_convert import to_message
from shared.errors import NotFound
from shared.short_ids import find as _find

# Lists remembered per kind between changes (the kubelet asks a few filters, and one per pod).
MAX_LISTS = 512

@dataclass(frozen=True)
class _Kind:
    """The CRI messages of pods, or of containers."""

    states: Any  # the state enum
    entry: type[Message]  # the list entry, made of the status's fields below
    entry_fields: tuple[str, ...]
    status: type[Message]
    response: type[Message]


_POD = _Kind(api_pb2.PodSandboxState, api_pb2.PodSandbox,
             ("id", "metadata", "state", "created_at", "labels", "annotations", "runtime_handler"),
             api_pb2.PodSandboxStatus, api_pb2.PodSandboxStatusResponse)
_CONTAINER = _Kind(api_pb2.ContainerState, api_pb2.Container,
                   ("id", "metadata", "image", "image_ref", "image_id", "state", "created_at", "labels", "annotations"),
                   api_pb2.ContainerStatus, api_pb2.ContainerStatusResponse)


class _Object:
    """A pod or a container: its status as runtimed built it, and the messages made of it once asked for."""

    __slots__ = ("kind", "id", "sandbox_id", "status", "state", "labels", "_entry", "_response")

    def __init__(self, kind: _Kind, view: dict[str, Any]) -> None:
        self.kind = kind
        self.status: dict[str, Any] = view["status"]
        self.id: str = self.status["id"]
        self.sandbox_id: str = view.get("sandbox_id", "")  # a container's pod
        self.state: int = kind.states.Value(self.status["state"])
        self.labels: dict[str, str] = self.status.get("labels") or {}
        self._entry: Message | None = None
        self._response: Message | None = None

    def entry(self) -> Any:
        if self._entry is None:
            fields = {k: self.status[k] for k in self.kind.entry_fields if k in self.status}
            if self.sandbox_id:
                fields["pod_sandbox_id"] = self.sandbox_id
            self._entry = to_message(fields, self.kind.entry)
        return self._entry

    def response(self) -> Any:
        if self._response is None:
            self._response = self.kind.response(status=to_message(self.status, self.kind.status))
        return self._response


def _entries(table: dict[str, _Object], f: Any) -> list[Any]:
    """The list entries of the objects a PodSandboxFilter or ContainerFilter selects (None: all)."""
    if f is None:
        return [o.entry() for o in table.values()]
    state = f.state.state if f.HasField("state") else None
    pod = getattr(f, "pod_sandbox_id", "")
    return [o.entry() for o in table.values()
            if (not f.id or o.id.startswith(f.id)) and (not pod or o.sandbox_id.startswith(pod))
            and (state is None or o.state == state) and all(o.labels.get(k) == v for k, v in f.label_selector.items())]


class RuntimeView:
    def __init__(self) -> None:
        self.pods: dict[str, _Object] = {}
        self.containers: dict[str, _Object] = {}
        # The lists answered since the last change, by kind and by filter (serialized; b"": none).
        self._lists: dict[str, dict[bytes, Any]] = {"sandbox": {}, "container": {}}

    # -- kept by the feed ---------------------------------------------------------------

    def reset(self, views: dict[str, Any]) -> None:
        self.pods, self.containers = {}, {}
        for key, view in views.items():
            self.apply(key, view)

    def apply(self, key: str, view: dict[str, Any] | None) -> None:
        kind, _, object_id = key.partition("/")
        if kind == "sandbox":
            table, spec = self.pods, _POD
        elif kind == "container":
            table, spec = self.containers, _CONTAINER
        else:
            raise ValueError(f"unknown kind of object {key!r}")
        self._lists[kind].clear()
        if view is None:
            table.pop(object_id, None)
        else:
            table[object_id] = _Object(spec, view)

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
        return self._list("sandbox", f, lambda: api_pb2.ListPodSandboxResponse(items=_entries(self.pods, f)))

    def list_containers(self, f: api_pb2.ContainerFilter | None) -> api_pb2.ListContainersResponse:
        return self._list("container", f,
                          lambda: api_pb2.ListContainersResponse(containers=_entries(self.containers, f)))

    def _list(self, kind: str, f: Message | None, made: Callable[[], Message]) -> Any:
        """The list for this filter: made once after each change, then the same message again."""
        lists = self._lists[kind]
        key = b"" if f is None else f.SerializeToString(deterministic=True)
        found = lists.get(key)
        if found is None:
            if len(lists) >= MAX_LISTS:
                lists.clear()
            found = lists[key] = made()
        return found
