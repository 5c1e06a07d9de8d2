"""The five services of crio-py: where each class lives, and the order they start in."""

from __future__ import annotations

import importlib
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.bus.service import Service

# Daemons first, so the frontend finds them when the kubelet's first call comes.
SERVICE_CLASSES: dict[str, str] = {
    "storaged": "services.storaged.service:Storaged",
    "imaged": "services.imaged.service:Imaged",
    "netd": "services.netd.service:Netd",
    "runtimed": "services.runtimed.service:Runtimed",
    "frontend": "services.frontend.service:Frontend",
}
DAEMONS: tuple[str, ...] = ("storaged", "imaged", "netd", "runtimed")
START_ORDER: tuple[str, ...] = tuple(SERVICE_CLASSES)


@cache
def service_class(name: str) -> type["Service"]:
    try:
        module_name, class_name = SERVICE_CLASSES[name].split(":")
    except KeyError:
        raise ValueError(f"unknown service {name!r} (services: {', '.join(SERVICE_CLASSES)})") from None
    return getattr(importlib.import_module(module_name), class_name)
