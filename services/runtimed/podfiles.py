"""A pod's /etc/hostname, /etc/hosts and /etc/resolv.conf, written into its directory."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from shared import atomic
from shared.errors import InvalidArgument

_HOSTNAME = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9.-]{0,251}[a-zA-Z0-9])?$")


def check_hostname(name: str) -> str:
    if name and not _HOSTNAME.match(name):
        raise InvalidArgument(f"invalid hostname {name!r}")
    return name


def _write(path: str, text: str) -> None:
    # Readable by every user of the containers. Not flushed to disk: written on the hot path of each pod creation.
    atomic.write_bytes(path, text.encode(), mode=0o644, durable=False)


def write_hostname(path: str, hostname: str) -> None:
    _write(path, hostname + "\n")


def hosts_text(hostname: str, ips: list[str]) -> str:
    lines = [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "fe00::0\tip6-localnet",
        "fe00::0\tip6-mcastprefix",
        "fe00::1\tip6-allnodes",
        "fe00::2\tip6-allrouters",
    ]
    for ip in ips:
        if hostname:
            lines.append(f"{ip}\t{hostname}")
    return "\n".join(lines) + "\n"


def write_hosts(path: str, hostname: str, ips: list[str], *, host_network: bool) -> None:
    if host_network:
        try:
            with open("/etc/hosts") as f:
                _write(path, f.read())
            return
        except OSError:
            pass
    _write(path, hosts_text(hostname, ips))


def resolv_text(dns: dict[str, Any] | None) -> str | None:
    """resolv.conf from the CRI DNSConfig; None when the pod gave none."""
    if not dns or not any(dns.get(k) for k in ("servers", "searches", "options")):
        return None
    lines = []
    searches = [str(s) for s in dns.get("searches") or []]
    for s in searches:
        if not s or any(c.isspace() for c in s):
            raise InvalidArgument(f"invalid DNS search domain {s!r}")
    if searches:
        lines.append("search " + " ".join(searches))
    for server in dns.get("servers") or []:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise InvalidArgument(f"invalid DNS server {server!r}") from None
        lines.append(f"nameserver {server}")
    options = [str(o) for o in dns.get("options") or []]
    for o in options:
        if not o or any(c.isspace() for c in o):
            raise InvalidArgument(f"invalid DNS option {o!r}")
    if options:
        lines.append("options " + " ".join(options))
    return "\n".join(lines) + "\n"


def write_resolv(path: str, dns: dict[str, Any] | None) -> None:
    text = resolv_text(dns)
    if text is None:
        try:
            with open("/etc/resolv.conf") as f:
                text = f.read()
        except OSError:
            text = ""
    _write(path, text)
