"""runtimed: pod sandboxes and containers with runc under conmon, cgroups, logs.

Every pod and container is a record (records.py, saved by store.py) that moves through states:
  sandbox:   reserved -> creating -> ready -> notready -> (removed)
  container: reserved -> creating -> created -> running -> exited -> (removing) -> (removed)
`reserved` holds the name while the frontend runs the steps of other daemons
(network, rootfs); a retried request with the same name waits for the first
one and gets the same id, as CRI-O's resource store does (reservations.py).

This class is the table of runtimed's bus methods (their properties are in
shared/bus/api.py); each delegates to the module that owns its concern.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any, Callable

import structlog

from services.runtimed import (checkpoint, container_create, container_exec, container_log, container_remove,
                               container_start, container_stop, exec_leftovers, exit_watcher, reconcile,
                               reservations, resource_updates, runc, sandbox_remove, sandbox_run, sandbox_stop,
                               state_feed, stats, status)
from services.runtimed.context import Context
from services.runtimed.event_publisher import EventPublisher
from services.runtimed.records import CONTAINER_STATES, SANDBOX_STATES
from shared import metrics
from shared.bus.api import RUNTIMED
from shared.bus.feed import StateFeed
from shared.bus.service import Service, method
from shared.config import Config
from shared.reload import ReloadResult

log = structlog.get_logger(__name__)


def _count_oom_kills(event: dict[str, Any]) -> None:
    """OOM kills in the metrics; a removed container's own series goes with it."""
    if event["kind"] != "container":
        return
    if event["event"] == "oom":
        metrics.container_oom_killed(event.get("name", ""))
    elif event["event"] == "removed" and event.get("name"):
        metrics.container_removed(event["name"])


class Runtimed(Service):
    api = RUNTIMED
    # runc needs whatever the containers it starts may be granted: keep every
    # capability this machine gives us (None), and no more.
    capabilities = None

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.ctx = Context(config)
        self._watcher: asyncio.Task[None] | None = None
        self._event_publisher: EventPublisher | None = None
        self.feed = StateFeed(self.publish)

    @property
    def sandboxes(self) -> dict[str, dict[str, Any]]:
        """Every pod's record, by id."""
        return self.ctx.records.sandboxes

    @property
    def containers(self) -> dict[str, dict[str, Any]]:
        """Every container's record, by id."""
        return self.ctx.records.containers

    # -- life cycle -------------------------------------------------------

    async def start(self) -> None:
        ctx = self.ctx
        for d in ctx.directories():
            os.makedirs(d, mode=0o700, exist_ok=True)
        await ctx.features.detect(ctx.rc)
        ctx.records.load()
        # Hooked before reconciling, so exits that happened while runtimed was down are published.
        self._event_publisher = EventPublisher(self)
        self._event_publisher.attach()
        ctx.events.subscribe(_count_oom_kills)
        state_feed.attach(ctx, self.feed)
        await reconcile.reconcile(ctx)
        await exec_leftovers.end_leftover_execs(ctx)
        state_feed.put_all(ctx, self.feed)
        self.feed.start()
        self._watcher = asyncio.create_task(exit_watcher.watch(ctx), name="runtimed-exit-watcher")
        self.ready = True
        log.info("runtimed_started", sandboxes=len(self.sandboxes), containers=len(self.containers))

    async def stop(self) -> None:
        self.ready = False
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        if self._event_publisher is not None:
            await self._event_publisher.close()
            self._event_publisher = None
        await self.feed.close()

    def refresh_metrics(self) -> None:
        for gauge, records, names in ((metrics.CONTAINERS, self.containers, CONTAINER_STATES),
                                      (metrics.PODS, self.sandboxes, SANDBOX_STATES)):
            counts = Counter(r["state"] for r in records.values() if r["state"] in names)
            for state in names:
                gauge.labels(state).set(counts[state])

    def readiness(self) -> dict[str, Any]:
        return {"runtime_ready": self.ready, **self.ctx.features.report()}

    async def apply_config(self, result: ReloadResult) -> None:
        if any(path.startswith("crio.runtime.runtimes") for path in result.applied):
            await self.ctx.features.detect(self.ctx.rc)

    def add_event_hook(self, hook: Callable[[dict[str, Any]], None]) -> None:
        """Call `hook` with each container and sandbox event (see events.py)."""
        self.ctx.events.subscribe(hook)

    # -- the runtime ------------------------------------------------------------

    @method
    async def runtime_config(self) -> dict[str, Any]:
        return {"linux": {"cgroup_driver": "SYSTEMD" if self.ctx.systemd else "CGROUPFS"}}

    @method
    async def runtime_version(self) -> dict[str, Any]:
        _program, version = await runc.version(self.ctx.handler("").runtime_path)
        return {"runtime_name": "runc", "runtime_version": version, "runtime_api_version": "v1"}

    # -- pods (reservations.py, sandbox_run.py, sandbox_stop.py, sandbox_remove.py, status.py) --

    @method
    async def reserve_sandbox(self, config: dict, runtime_handler: str = "", timeout: float = 30.0,
                              token: str = "", holder: str = "") -> dict:
        """Hold the pod's name; a retry of a pod still being made waits for it and gets its id."""
        return await reservations.reserve_sandbox(self.ctx, config, runtime_handler, timeout, token, holder)

    @method
    async def prepare_sandbox(self, sandbox_id: str) -> dict:
        """Make the part of the reserved pod that needs no network, while netd attaches it."""
        return await sandbox_run.prepare(self.ctx, sandbox_id)

    @method
    async def create_sandbox(self, sandbox_id: str, netns_path: str | None = None,
                             ips: list | None = None) -> dict:
        """Make the reserved pod: directory, namespaces, files, cgroup, infra process."""
        return await sandbox_run.create(self.ctx, sandbox_id, netns_path, ips)

    @method
    async def release_sandbox(self, sandbox_id: str) -> dict:
        """Undo a reservation whose RunPodSandbox failed; a finished pod is left alone."""
        return await sandbox_run.release(self.ctx, sandbox_id)

    @method
    async def stop_sandbox(self, sandbox_id: str) -> dict:
        """Stop the pod's containers and infra process; an unknown pod is success ({"id": ""})."""
        return await sandbox_stop.stop(self.ctx, sandbox_id)

    @method
    async def remove_sandbox(self, sandbox_id: str) -> dict:
        """Remove the pod and its containers; {"id", "removed_containers"}; a pod already gone is success."""
        return await sandbox_remove.remove(self.ctx, sandbox_id)

    @method
    async def sandbox_status(self, sandbox_id: str, verbose: bool = False) -> dict:
        return await status.sandbox_status_call(self.ctx, sandbox_id, verbose)

    @method
    async def list_sandboxes(self, filter: dict | None = None) -> list:
        return await status.list_sandboxes(self.ctx, filter)

    @method
    async def snapshot(self, marker: str = "") -> dict:
        """Every visible pod and container as the frontend's read model keeps them (state_feed.py)."""
        return self.feed.snapshot(marker)

    @method
    async def update_sandbox_resources(self, sandbox_id: str, resources: dict | None = None,
                                       overhead: dict | None = None) -> dict:
        """Apply pod-level limits to the pod's own cgroup (cgroupfs driver)."""
        return await resource_updates.update_sandbox(self.ctx, sandbox_id, resources, overhead)

    @method
    async def take_over_reservations(self, holder: str) -> dict:
        """Reservations of frontends that are gone, handed to `holder` to undo (reservations.py)."""
        return await reservations.take_over_abandoned(self.ctx, holder)

    @method
    async def record_ids(self) -> dict:
        """The id of every pod and container runtimed keeps a record of, in any state."""
        return {"sandboxes": list(self.sandboxes), "containers": list(self.containers)}

    # -- containers (container_create.py, container_start.py, container_stop.py, container_remove.py) --

    @method
    async def reserve_container(self, sandbox_id: str, config: dict, timeout: float = 30.0,
                                token: str = "", holder: str = "") -> dict:
        """Hold the container's name in its pod; a retry of a create in progress waits for it."""
        return await reservations.reserve_container(self.ctx, sandbox_id, config, timeout, token, holder)

    @method
    async def create_container(self, container_id: str, rootfs: str, image: dict | None = None,
                               image_ref: str = "") -> dict:
        """Build the OCI spec and have conmon create the container with runc."""
        return await container_create.create(self.ctx, container_id, rootfs, image, image_ref)

    @method
    async def release_container(self, container_id: str) -> dict:
        """Undo a reservation whose CreateContainer failed; a created container is left alone."""
        return await container_create.release(self.ctx, container_id)

    @method
    async def start_container(self, container_id: str) -> dict:
        return await container_start.start(self.ctx, container_id)

    @method
    async def stop_container(self, container_id: str, timeout: int = 0) -> dict:
        """Stop signal, then SIGKILL after `timeout` seconds; an unknown container is success."""
        return await container_stop.stop(self.ctx, container_id, timeout)

    @method
    async def remove_container(self, container_id: str) -> dict:
        """Stop (if needed) and remove the container; one already gone is success ({"id": ""})."""
        return await container_remove.remove(self.ctx, container_id)

    @method
    async def container_status(self, container_id: str, verbose: bool = False) -> dict:
        return await status.container_status_call(self.ctx, container_id, verbose)

    @method
    async def list_containers(self, filter: dict | None = None) -> list:
        return await status.list_containers(self.ctx, filter)

    @method
    async def reopen_log(self, container_id: str) -> dict:
        """Have conmon reopen the log file after the kubelet rotated it."""
        return await container_log.reopen(self.ctx, container_id)

    @method
    async def update_resources(self, container_id: str, linux: dict | None = None,
                               annotations: dict | None = None) -> dict:
        """Change the container's cgroup limits live (runc update)."""
        return await resource_updates.update_container(self.ctx, container_id, linux)

    @method
    async def checkpoint_container(self, container_id: str, location: str, upper_dir: str | None = None,
                                   timeout: float = 0) -> dict:
        """Checkpoint a running container with CRIU into the archive `location` (it keeps running)."""
        return await checkpoint.checkpoint_container(self.ctx, container_id, location, upper_dir, timeout)

    # -- stats (stats.py) -----------------------------------------------------------

    @method
    async def list_container_stats(self, filter: dict | None = None, container_id: str | None = None) -> list:
        """CRI ContainerStats (cgroup CPU, memory, swap) of one container, or of those matching `filter`."""
        return await stats.list_container_stats(self.ctx, filter, container_id)

    @method
    async def list_sandbox_stats(self, filter: dict | None = None, sandbox_id: str | None = None) -> list:
        """CRI PodSandboxStats without network counters (netd's), with each pod's netns path."""
        return await stats.list_sandbox_stats(self.ctx, filter, sandbox_id)

    @method
    async def metric_samples(self, families: list | None = None) -> list:
        """Raw cgroup samples of every ready pod's running containers, for ListPodSandboxMetrics."""
        return await stats.metric_samples(self.ctx, families)

    # -- exec and streaming sessions (container_exec.py) -------------------------------

    @method
    async def exec_sync(self, container_id: str, cmd: list, timeout: float = 0) -> dict:
        """Run `cmd` in the running container; its stdout, stderr and exit code."""
        return await container_exec.exec_sync(self.ctx, container_id, cmd, timeout)

    @method
    async def exec_start(self, container_id: str, cmd: list, tty: bool = False, stdin: bool = False,
                         stdout: bool = True, stderr: bool = True) -> dict:
        """Start `cmd` in the running container for a streaming exec; {"token"} of its stream."""
        return await container_exec.exec_start(self.ctx, self, container_id, cmd, tty, stdin, stdout, stderr)

    @method
    async def attach_start(self, container_id: str, tty: bool = False, stdin: bool = False,
                           stdout: bool = True, stderr: bool = True) -> dict:
        """Connect to the running container's stdio through conmon; {"token"} of its stream."""
        return await container_exec.attach_start(self.ctx, self, container_id, tty, stdin, stdout, stderr)
