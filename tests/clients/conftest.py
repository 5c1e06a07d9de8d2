"""crio-py checked with the real Kubernetes clients: crictl and a standalone kubelet.

These tests run under `make test-clients`, which hands over the binaries in the
CRICTL and KUBELET environment variables; `make test` leaves them out. Without
the variables every test here is skipped with a message that says how to run them.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.support import images
from tests.support.pods import bridge_stack
from tests.support.registry import Registry, launch_registry
from tests.support.stack import Stack

CGROUP_PARENT = f"/criopy-clients-{secrets.token_hex(3)}"


def _binary(variable: str) -> str:
    path = os.environ.get(variable, "")
    if not path:
        pytest.skip(f"{variable} is not set: run these checks with `make test-clients`")
    if not os.access(path, os.X_OK):
        pytest.fail(f"{variable}={path} is missing or not executable")
    return path


@dataclass
class Images:
    busybox: str  # busybox with a shell and httpd, CMD sh
    registry: Registry


@pytest.fixture(scope="session")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    registry = launch_registry(tmp_path_factory.mktemp("clients-registry"))
    try:
        pushed = images.push_busybox_image(registry, "clients/busybox", "latest", cmd=["sh"])
        yield Images(busybox=pushed.ref, registry=registry)
    finally:
        registry.stop()


@pytest.fixture(scope="module")
def stack(test_images: Images) -> Iterator[Stack]:
    with bridge_stack("cpc-", CGROUP_PARENT, registry=test_images.registry) as running:
        yield running


@dataclass
class Crictl:
    """crictl pointed at one crio-py, with no configuration file of its own."""

    binary: str
    socket: Path

    def args(self, *args: str) -> list[str]:
        endpoint = f"unix://{self.socket}"
        return [self.binary, "--config", "/dev/null", "-r", endpoint, "-i", endpoint, "--timeout", "60s", *args]

    def run(self, *args: str, check: bool = True, input: str | None = None,
            timeout: float = 90) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.args(*args), capture_output=True, text=True, input=input, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"crictl {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def out(self, *args: str) -> str:
        """stdout of a successful command, stripped (crictl warns on stderr)."""
        return self.run(*args).stdout.strip()

    def json(self, command: str, *args: str) -> dict:
        # crictl takes a command's options before its arguments.
        return json.loads(self.out(command, "-o", "json", *args))


@pytest.fixture(scope="module")
def crictl(stack: Stack) -> Crictl:
    return Crictl(_binary("CRICTL"), stack.dirs.socket)


@pytest.fixture(scope="module")
def kubelet_binary() -> str:
    return _binary("KUBELET")
