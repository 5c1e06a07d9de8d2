"""A small registry on loopback that misbehaves on purpose.

It serves whatever routes a test gives it: manifests and blobs whose bytes
do not match their digests, truncated or oversized blobs, huge manifests,
transient failures (503/429 with Retry-After, connections closed before a
reply) a number of times before the real answer, and fixed error statuses.

    with HostileRegistry() as reg:
        pushed = reg.serve_image("evil/img", "latest", image, blob_bodies={layer.digest: b"other bytes"})
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.images import Image, Pushed, sha256


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_length: int | None = None  # announce this instead of len(body)
    # The first `failures` requests get this instead: an int status, or "reset" to close the connection.
    failures: int = 0
    failure: int | str = 503
    retry_after: str | None = None
    # Send this many bytes of the body, then hang until the server stops (a stalled download).
    stall_after: int | None = None
    delay: float = 0.0  # seconds to wait before answering (to observe concurrency)
    hits: int = 0


class HostileRegistry:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.active = 0  # requests being answered now
        self.max_active = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.routes["/v2/"] = Route(200, b"{}", {"Content-Type": "application/json"})
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def __enter__(self) -> "HostileRegistry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def hits(self, path: str) -> int:
        return self.routes[path].hits

    # -- content --------------------------------------------------------------

    def route(self, path: str, **kwargs: Any) -> Route:
        r = Route(**kwargs)
        self.routes[path] = r
        return r

    def add_manifest(self, repo: str, reference: str, body: bytes, media_type: str, **kwargs: Any) -> Route:
        headers = {"Content-Type": media_type, "Docker-Content-Digest": sha256(body)}
        return self.route(f"/v2/{repo}/manifests/{reference}", body=body, headers=headers, **kwargs)

    def add_blob(self, repo: str, digest: str, body: bytes, **kwargs: Any) -> Route:
        return self.route(f"/v2/{repo}/blobs/{digest}", body=body,
                          headers={"Content-Type": "application/octet-stream"}, **kwargs)

    def serve_image(self, repo: str, tag: str | None, image: Image, *, blob_bodies: dict[str, bytes] | None = None,
                    manifest_body: bytes | None = None) -> Pushed:
        """Serve `image` (by tag and by digest); `blob_bodies` replaces the bytes served for some digests."""
        overrides = blob_bodies or {}
        config = image.config_bytes()
        self.add_blob(repo, sha256(config), overrides.get(sha256(config), config))
        for layer in image.layers:
            self.add_blob(repo, layer.digest, overrides.get(layer.digest, layer.blob))
        body = image.manifest_bytes()
        digest = sha256(body)
        served = manifest_body if manifest_body is not None else body
        self.add_manifest(repo, digest, served, image.media_type)
        if tag:
            self.add_manifest(repo, tag, served, image.media_type)
        return Pushed(self.host, repo, tag, digest, sha256(config), [l.digest for l in image.layers],
                      [l.diff_id for l in image.layers], len(config) + sum(len(l.blob) for l in image.layers))

    def serve_oversized_manifest(self, repo: str, tag: str, size: int = 5 * 1024 * 1024,
                                 announce: bool = True) -> Route:
        """A manifest larger than any client should accept (valid JSON, padded)."""
        pad = b" " * size
        body = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",' + pad + b'"layers": []}'
        route = self.add_manifest(repo, tag, body, "application/vnd.oci.image.manifest.v1+json")
        if not announce:
            route.headers["Transfer-Encoding"] = "chunked"
        return route

    # -- the server -------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _serve(self, head: bool) -> None:
                path = self.path.split("?", 1)[0]
                with registry._lock:
                    registry.requests.append(path)
                    route = registry.routes.get(path)
                    if route is not None:
                        route.hits += 1
                        failing = route.hits <= route.failures
                if route is None:
                    self._send(404, json.dumps({"errors": [{"code": "NOT_FOUND"}]}).encode(),
                               {"Content-Type": "application/json"}, None, head)
                    return
                if route.delay:
                    with registry._lock:
                        registry.active += 1
                        registry.max_active = max(registry.max_active, registry.active)
                    try:
                        registry._stopping.wait(route.delay)
                    finally:
                        with registry._lock:
                            registry.active -= 1
                if failing:
                    if route.failure == "reset":
                        self.close_connection = True
                        self.connection.close()
                        return
                    headers = {"Retry-After": route.retry_after} if route.retry_after is not None else {}
                    self._send(int(route.failure), b"try later", headers, None, head)
                    return
                if route.stall_after is not None and not head:
                    self.send_response(route.status)
                    for k, v in route.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(route.body)))
                    self.end_headers()
                    self.wfile.write(route.body[:route.stall_after])
                    self.wfile.flush()
                    registry._stopping.wait(60)
                    self.close_connection = True
                    return
                self._send(route.status, route.body, route.headers, route.content_length, head)

            def _send(self, status: int, body: bytes, headers: dict[str, str], length: int | None,
                      head: bool) -> None:
                chunked = headers.get("Transfer-Encoding") == "chunked"
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if not chunked:
                    self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                if head:
                    return
                if chunked:
                    for i in range(0, len(body), 65536):
                        part = body[i:i + 65536]
                        self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.wfile.write(body)
                    if length is not None and length != len(body):
                        self.close_connection = True

            def do_GET(self) -> None:
                self._serve(False)

            def do_HEAD(self) -> None:
                self._serve(True)

        return Handler
