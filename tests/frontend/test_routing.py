"""The frontend's CRI server: default routes, error mapping and crashes, over a real gRPC socket."""

from __future__ import annotations

from typing import Any, AsyncIterator

import grpc
import pytest
from cri_api.v1 import api_pb2, api_pb2_grpc

from services.frontend import grpc_server
from services.frontend.routing import bus_method_name, owner
from shared import errors
from shared.config import Config
from tests.support.stack import short_tempdir


class FakeDaemons:
    """Stands in for the bus: records calls and answers with a preset error."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.error: BaseException = errors.Unimplemented("not here")

    async def call(self, daemon: str, method: str, *, deadline: float, **params: Any) -> Any:
        self.calls.append((daemon, method, params))
        raise self.error


@pytest.fixture
async def served(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[FakeDaemons, grpc.aio.Channel]]:
    monkeypatch.setattr(grpc_server, "load_handlers", lambda: {})  # every method takes its default route
    base = short_tempdir("rt-")
    config = Config()
    config.crio.api.listen = str(base / "cri.sock")
    daemons = FakeDaemons()
    server = await grpc_server.bind_server(daemons, config)
    await server.start()
    channel = grpc.aio.insecure_channel(f"unix://{config.crio.api.listen}")
    yield daemons, channel
    await channel.close()
    await server.stop(None)
    for p in base.iterdir():
        p.unlink()
    base.rmdir()


def test_owners_and_method_names() -> None:
    assert owner("PullImage") == "imaged"
    assert owner("PortForward") == "netd"
    assert owner("RunPodSandbox") == "runtimed"
    assert bus_method_name("UpdatePodSandboxResources") == "update_pod_sandbox_resources"


async def test_a_method_without_handler_goes_to_its_owner_and_is_unimplemented(served) -> None:  # type: ignore[no-untyped-def]
    daemons, channel = served
    stub = api_pb2_grpc.RuntimeServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CheckpointContainer(api_pb2.CheckpointContainerRequest(container_id="c1", location="/x"))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "CheckpointContainer is not implemented" in info.value.details()
    assert daemons.calls == [("runtimed", "checkpoint_container",
                              {"request": {"container_id": "c1", "location": "/x"}})]


async def test_typed_daemon_error_keeps_its_code(served) -> None:  # type: ignore[no-untyped-def]
    daemons, channel = served
    daemons.error = errors.NotFound("image busybox is not pulled")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api_pb2_grpc.ImageServiceStub(channel).ImageStatus(api_pb2.ImageStatusRequest())
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "image busybox is not pulled"
    assert daemons.calls[0][:2] == ("imaged", "image_status")


async def test_a_crash_in_a_handler_is_internal_and_the_server_goes_on(served) -> None:  # type: ignore[no-untyped-def]
    daemons, channel = served
    daemons.error = ZeroDivisionError("boom")
    stub = api_pb2_grpc.RuntimeServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListContainers(api_pb2.ListContainersRequest())
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "boom" in info.value.details()
    daemons.error = errors.NotFound("no such container")
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await stub.ListContainers(api_pb2.ListContainersRequest())
    assert again.value.code() == grpc.StatusCode.NOT_FOUND


async def test_streaming_method_without_handler_is_unimplemented(served) -> None:  # type: ignore[no-untyped-def]
    _daemons, channel = served
    stream = api_pb2_grpc.RuntimeServiceStub(channel).GetContainerEvents(api_pb2.GetEventsRequest())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stream:
            pass
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_deadline_of_the_caller_bounds_the_daemons_work(served) -> None:  # type: ignore[no-untyped-def]
    daemons, channel = served
    seen: list[float] = []

    async def record(daemon: str, method: str, *, deadline: float, **params: Any) -> Any:
        import time

        seen.append(deadline - time.time())
        raise errors.Unavailable("down")

    daemons.call = record  # type: ignore[method-assign]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api_pb2_grpc.RuntimeServiceStub(channel).ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=2.0)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert 1.5 < seen[0] < 2.0
