"""The bus API table: the services implement exactly their rows, and a class that does not is refused."""

from __future__ import annotations

import pytest

from shared.bus.api import API, CALLERS, FRONTEND, ROOT, STREAM_CALLERS, SUBSCRIBERS, ServiceApi, retried
from shared.bus.server import BusServer
from shared.bus.service import Service, method
from shared.config import Config
from shared.errors import ApiMismatch
from shared.services import DAEMONS, START_ORDER, service_class
from shared.supervisor import SupervisorApi


@pytest.mark.parametrize("name", START_ORDER)
def test_every_service_implements_exactly_its_row(name: str) -> None:
    cls = service_class(name)
    assert cls.api is API[name]
    assert set(cls.bus_methods()) == set(API[name].methods)
    assert cls.name == name


def test_the_supervisor_implements_exactly_its_row() -> None:
    assert set(SupervisorApi.bus_methods()) == set(API["supervisor"].methods)


def test_only_the_frontend_calls_the_daemons_and_only_root_calls_the_supervisor() -> None:
    for name in DAEMONS:
        for method_name, info in API[name].methods.items():
            assert info.callers == {FRONTEND}, (name, method_name)
        assert API[name].callers == {FRONTEND}
    for method_name, info in API["supervisor"].methods.items():
        assert info.callers == {ROOT}, method_name
    # Nobody calls the frontend over the bus: it binds no bus socket.
    assert API["frontend"].callers == frozenset()
    assert SUBSCRIBERS == STREAM_CALLERS == {FRONTEND}
    assert CALLERS == {FRONTEND, ROOT}


def test_a_caller_outside_the_known_ones_is_refused_in_the_table() -> None:
    with pytest.raises(ValueError, match="unknown callers"):
        retried("kubelet")


THIN = ServiceApi("thin", {"health": retried(ROOT), "metrics": retried(ROOT), "ping": retried(ROOT)})


class Missing(Service):
    api = THIN


class Undeclared(Service):
    api = THIN

    @method
    async def ping(self) -> str:
        return "pong"

    @method
    async def shutdown(self) -> None:
        return None


def test_a_class_that_misses_a_method_of_its_row_is_refused() -> None:
    with pytest.raises(ApiMismatch, match="missing ping"):
        Missing.bus_methods()
    with pytest.raises(ApiMismatch):
        BusServer(Missing(Config()), "ipc:///nonexistent/thin.sock", max_message_bytes=1024)


def test_a_class_with_a_method_outside_its_row_is_refused() -> None:
    with pytest.raises(ApiMismatch, match="not in the table: shutdown"):
        Undeclared.bus_methods()
