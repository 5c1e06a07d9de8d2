"""The Prometheus endpoint: one page with the metrics of all five processes.

On each scrape the frontend asks every daemon for its metrics over the bus,
labels each sample with the service it came from, and serves the merged
families. Each process reports its own restart count
(`criopy_service_restarts_total`, handed to it by the supervisor), so the
frontend never calls the supervisor. A daemon that does not
answer in time is reported as `criopy_service_up{service=...} 0` rather than
failing the scrape.

CRI-O's families (`container_runtime_crio_*`) are the exception: each is taken
from the one service that fills it (`metrics.CRIO_OWNERS`) and keeps CRI-O's
labels only, so that queries, recording rules and alerts written for CRI-O
(including those that match label sets exactly) read crio-py unchanged.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Iterable

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from shared import metrics
from shared.config import Config
from shared.errors import CriopyError
from shared.services import DAEMONS

log = structlog.get_logger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Static:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge(pages: dict[str, str]) -> list[Metric]:
    """Merge exposition pages of several services, adding a `service` label to every sample.

    A CRI-O family comes from its owner alone, without the `service` label.
    """
    merged: dict[str, Metric] = {}
    for service, text in pages.items():
        for family in text_string_to_metric_families(text):
            owner = metrics.CRIO_OWNERS.get(family.name)
            if owner is not None and owner != service:
                continue  # the same family, never filled, in a process that does not own it
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labels = sample.labels if owner else {**sample.labels, "service": service}
                target.samples.append(sample._replace(labels=labels))
    return list(merged.values())


def _defunct_processes() -> Metric:
    name, documentation = metrics.CRIO_PROCESSES_DEFUNCT
    family = GaugeMetricFamily(name, documentation)
    family.add_metric([], metrics.defunct_processes())
    return family


class MetricsEndpoint:
    def __init__(self, config: Config, daemons: Any) -> None:
        self.config = config
        self.daemons = daemons
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        settings = self.config.crio.metrics
        self._server = await asyncio.start_server(self._handle, settings.metrics_host, settings.metrics_port)
        log.info("metrics_listening", address=f"{settings.metrics_host}:{self.port}")

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def page(self) -> bytes:
        timeout = self.config.criopy.bus.health_timeout

        async def fetch(name: str) -> tuple[str, str | None]:
            try:
                return name, await self.daemons.call(name, "metrics", deadline=time.time() + timeout)
            except CriopyError:
                return name, None

        results = await asyncio.gather(*(fetch(name) for name in DAEMONS))
        pages = {"frontend": metrics.exposition(), **{name: text for name, text in results if text is not None}}
        up = GaugeMetricFamily("criopy_service_up", "Whether the service answered this scrape.", labels=["service"])
        up.add_metric(["frontend"], 1)
        for name, text in results:
            up.add_metric([name], 0 if text is None else 1)
        families: list[Metric] = [up, *merge(pages), await asyncio.to_thread(_defunct_processes)]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Static(families))  # type: ignore[arg-type]
        return generate_latest(registry)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass  # headers are not needed
            parts = request_line.decode("latin-1").split()
            if len(parts) < 2 or parts[0] != "GET":
                await self._respond(writer, "405 Method Not Allowed", b"only GET\n", "text/plain")
            elif parts[1].split("?")[0] != "/metrics":
                await self._respond(writer, "404 Not Found", b"metrics are at /metrics\n", "text/plain")
            else:
                await self._respond(writer, "200 OK", await self.page(), CONTENT_TYPE)
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        except Exception:
            log.exception("metrics_request_failed")
        finally:
            writer.close()

    @staticmethod
    async def _respond(writer: asyncio.StreamWriter, status: str, body: bytes, content_type: str) -> None:
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        writer.write(head.encode() + body)
        await writer.drain()
