"""The OCI runtime (runc) command line: one call per subcommand, typed errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import structlog

from services.runtimed import exec_fifo
from shared import programs, tracing
from shared.errors import Internal, NotFound

log = structlog.get_logger(__name__)

DEFAULT_TIMEOUT = 30.0


class RuntimeError_(Internal):
    """runc exited non-zero."""


@dataclass(frozen=True)
class Runc:
    path: str
    root: str
    systemd_cgroup: bool = False
    exec_fifo_start: bool = False  # the runtime is runc: `start` may open its exec fifo itself

    def _base(self) -> list[str]:
        args = [self.path, "--root", self.root]
        if self.systemd_cgroup:
            args.append("--systemd-cgroup")
        return args

    def global_args(self) -> list[str]:
        """The flags conmon passes to runc in front of each subcommand."""
        args = [f"--root={self.root}"]
        if self.systemd_cgroup:
            args.append("--systemd-cgroup")
        return args

    async def _run(self, sub: list[str], *, timeout: float = DEFAULT_TIMEOUT,
                   input: bytes | None = None) -> programs.Completed:
        with tracing.tracer(__name__).start_as_current_span(
                f"runc {sub[0]}", attributes={"criopy.runc.args": " ".join(sub[1:])[:200]}):
            result = await programs.run(self._base() + sub, timeout=timeout, input=input)
        if result.returncode != 0:
            message = _error_text(result.stderr) or f"exit status {result.returncode}"
            if "does not exist" in message or "not exist" in message:
                raise NotFound(f"runc {sub[0]}: {message}")
            raise RuntimeError_(f"runc {sub[0]}: {message}")
        return result

    async def create(self, container_id: str, bundle: str, pid_file: str, *,
                     timeout: float = DEFAULT_TIMEOUT) -> None:
        await self._run(["create", "--bundle", bundle, "--pid-file", pid_file, container_id], timeout=timeout)

    async def start(self, container_id: str, *, init_pid: int = 0, init_start: int | None = None,
                    timeout: float = DEFAULT_TIMEOUT) -> None:
        """Start a created container; `init_pid` (its init, waiting to exec) lets runc's own protocol be used
        without a `runc start` process."""
        if self.exec_fifo_start and init_pid > 0 and await exec_fifo.start(
                self.root, container_id, init_pid, init_start, timeout=timeout):
            return
        await self._run(["start", container_id], timeout=timeout)

    async def state(self, container_id: str, *, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any] | None:
        """runc's state of a container, or None when runc does not know it."""
        try:
            result = await self._run(["state", container_id], timeout=timeout)
        except NotFound:
            return None
        try:
            return json.loads(result.stdout)
        except ValueError:
            raise Internal(f"runc state {container_id}: unreadable output") from None

    async def list(self, *, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
        result = await self._run(["list", "--format", "json"], timeout=timeout)
        text = result.stdout.strip()
        return json.loads(text) if text and text != b"null" else []

    async def kill(self, container_id: str, signal: str | int = "TERM", *, all_processes: bool = False,
                   timeout: float = DEFAULT_TIMEOUT) -> None:
        sub = ["kill"] + (["--all"] if all_processes else []) + [container_id, str(signal)]
        await self._run(sub, timeout=timeout)

    async def delete(self, container_id: str, *, force: bool = False, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Delete a container; one runc does not know is already deleted."""
        try:
            await self._run(["delete"] + (["--force"] if force else []) + [container_id], timeout=timeout)
        except NotFound:
            pass

    def exec_args(self, container_id: str, process_file: str, pid_file: str) -> list[str]:
        """The command line of `runc exec` for a process spec file (run by the caller)."""
        return self._base() + ["exec", "--process", process_file, "--pid-file", pid_file, container_id]

    async def update(self, container_id: str, resources: dict[str, Any], *,
                     timeout: float = DEFAULT_TIMEOUT) -> None:
        await self._run(["update", "--resources", "-", container_id],
                        input=json.dumps(resources).encode(), timeout=timeout)

    async def pause(self, container_id: str) -> None:
        await self._run(["pause", container_id])

    async def resume(self, container_id: str) -> None:
        await self._run(["resume", container_id])


async def version(path: str, *, timeout: float = 10.0) -> tuple[str, str]:
    """The program's name and version from its first line (`runc version 1.1.5+ds1`: "runc", "1.1.5+ds1")."""
    result = await programs.run([path, "--version"], timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError_(f"{path} --version: {_error_text(result.stderr) or f'exit status {result.returncode}'}")
    lines = result.stdout.decode(errors="replace").splitlines()
    words = lines[0].split() if lines else []
    if not words:
        raise RuntimeError_(f"{path} --version printed nothing")
    return words[0], words[-1]


def _error_text(stderr: bytes) -> str:
    """The message of runc's last log line (runc logs logfmt or JSON)."""
    lines = [ln for ln in stderr.decode(errors="replace").strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    last = lines[-1]
    if last.startswith("{"):
        try:
            return str(json.loads(last).get("msg", last))
        except ValueError:
            return last
    marker = 'msg="'
    if marker in last:
        body = last.split(marker, 1)[1]
        return body.rsplit('"', 1)[0].replace('\\"', '"')
    return last
