"""The one HTTP/1.1 request a streaming connection starts with, and plain responses to it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

MAX_HEAD = 16 * 1024


class BadRequest(Exception):
    pass


@dataclass
class RequestHead:
    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    headers: list[tuple[str, str]]
    raw: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_values(self, name: str) -> list[str]:
        """Every value of a header, comma-separated lists split."""
        name = name.lower()
        out: list[str] = []
        for key, value in self.headers:
            if key == name:
                out += [v.strip() for v in value.split(",") if v.strip()]
        return out

    def upgrade(self) -> str:
        return (self.header("upgrade") or "").strip().lower()


async def read_head(reader: asyncio.StreamReader, timeout: float) -> RequestHead:
    try:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.LimitOverrunError:
        raise BadRequest("request head too large") from None
    except asyncio.IncompleteReadError:
        raise BadRequest("connection closed before a full request head") from None
    except asyncio.TimeoutError:
        raise BadRequest("no request head in time") from None
    if len(raw) > MAX_HEAD:
        raise BadRequest("request head too large")
    return parse_head(raw)


def parse_head(raw: bytes) -> RequestHead:
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        raise BadRequest("undecodable request head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"bad request line {lines[0][:80]!r}")
    method, target, _version = parts
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        if ":" not in line or line[0] in " \t":
            raise BadRequest(f"bad header line {line[:80]!r}")
        key, value = line.split(":", 1)
        headers.append((key.strip().lower(), value.strip()))
    url = urlsplit(target)
    return RequestHead(method, target, url.path, parse_qs(url.query, keep_blank_values=True), headers, raw)


def response(status: int, reason: str, body: str = "", headers: list[tuple[str, str]] | None = None) -> bytes:
    payload = body.encode()
    lines = [f"HTTP/1.1 {status} {reason}"]
    for key, value in headers or []:
        lines.append(f"{key}: {value}")
    if status != 101:
        lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(payload)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
