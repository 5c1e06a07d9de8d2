"""GetContainerEvents: runtimed's container and pod events, fanned out to each subscribed client.

The frontend's EventHub holds one subscription to runtimed and a bounded queue
per client; a client that falls behind is dropped (its stream ends with
RESOURCE_EXHAUSTED, so it relists and subscribes again) rather than slowing
runtimed or the other clients.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import structlog
from cri_api.v1 import api_pb2

from services.frontend.event_hub import SlowClient
from services.frontend.registry import CallContext, cri_method
from services.frontend.runtime_convert import to_message
from shared.errors import ResourceExhausted, Unavailable

log = structlog.get_logger(__name__)


def to_response(event: dict[str, Any]) -> api_pb2.ContainerEventResponse | None:
    """A CRI event from runtimed's bus event; None for events the CRI has no type for (oom)."""
    kind = event.get("type")
    if not kind:
        return None
    response = api_pb2.ContainerEventResponse(
        container_id=event.get("container_id", ""),
        container_event_type=api_pb2.ContainerEventType.Value(kind),
        created_at=int(event.get("created_at") or 0))
    if event.get("pod_sandbox_status"):
        response.pod_sandbox_status.CopyFrom(to_message(event["pod_sandbox_status"], api_pb2.PodSandboxStatus))
    response.containers_statuses.extend(
        to_message(s, api_pb2.ContainerStatus) for s in event.get("containers_statuses") or [])
    return response


@cri_method("GetContainerEvents")
async def get_container_events(_request: api_pb2.GetEventsRequest,
                               call: CallContext) -> AsyncIterator[api_pb2.ContainerEventResponse]:
    hub = call.daemons.events
    if hub is None:
        raise Unavailable("the event hub is not running")
    queue = hub.subscribe()
    log.info("container_events_subscribed", clients=hub.client_count)
    try:
        while True:
            item = await queue.get()
            if isinstance(item, SlowClient):
                raise ResourceExhausted("the client did not keep up with container events and was dropped; "
                                        "relist and subscribe again")
            try:
                response = to_response(item)
            except (ValueError, KeyError, TypeError) as e:
                log.warning("container_event_unconvertible", error=str(e), event=item.get("event"))
                continue
            if response is not None:
                yield response
    finally:
        hub.unsubscribe(queue)
        log.info("container_events_unsubscribed", clients=hub.client_count)
