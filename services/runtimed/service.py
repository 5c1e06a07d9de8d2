"""runtimed: pod sandboxes and containers with runc under conmon, cgroups, logs.

Every pod and container is a record (see store.py) that moves through states:
  sandbox:   reserved -> creating -> ready -> notready -> (removed)
  container: reserved -> creating -> created -> running -> exited -> (removing) -> (removed)
`reserved` holds the name while the frontend runs the steps of other daemons
(network, rootfs); a retried request with the same name waits for the first
one and gets the same id, as CRI-O's resource store does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shutil
import signal as signals
import time
from collections import Counter
from typing import Any, Callable

import structlog

from services.runtimed import (cgroups, checkpoint, conmon, exec_session, features, namespaces, pod_resources,
                               podfiles, process, runc, spec, stats, users)
from services.runtimed.events import Events
from services.runtimed.event_publisher import EventPublisher
from services.runtimed.paths import confined_relative
from services.runtimed.runc import Runc
from services.runtimed.store import Store
from shared import metrics, mountinfo
from shared.bus.api import RUNTIMED
from shared.bus.service import Service, method
from shared.config import Config, RuntimeHandler
from shared.errors import (AlreadyExists, DeadlineExceeded, FailedPrecondition, Internal,
                           InvalidArgument, NotFound)
from shared.mounts import mount, unmount
from shared.reload import ReloadResult

log = structlog.get_logger(__name__)

# A reservation nobody finished within this time may be taken over by a retry.
RESERVATION_LEASE = 240.0
EXIT_POLL_INTERVAL = 0.25
MONITOR_CHECK_TICKS = 8
EXEC_OUTPUT_LIMIT = 16 * 1024 * 1024
DEFAULT_CGROUP_PARENT = "/criopy"
SHM_SIZE = "65536k"

def _selected(entry: dict[str, Any], want_state: str | None, selector: dict[str, str]) -> bool:
    """Whether a listed sandbox or container passes a CRI filter's state and label selector."""
    return (not want_state or entry["state"] == want_state) and \
        all(entry["labels"].get(k) == v for k, v in selector.items())


def _count_oom_kills(event: dict[str, Any]) -> None:
    """OOM kills in the metrics; a removed container's own series goes with it."""
    if event["kind"] != "container":
        return
    if event["event"] == "oom":
        metrics.container_oom_killed(event.get("name", ""))
    elif event["event"] == "removed" and event.get("name"):
        metrics.container_removed(event["name"])


_SANDBOX_STATES = {"ready": "SANDBOX_READY", "notready": "SANDBOX_NOTREADY"}
_CONTAINER_STATES = {"created": "CONTAINER_CREATED", "running": "CONTAINER_RUNNING",
                     "exited": "CONTAINER_EXITED"}


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _metadata(config: dict[str, Any], what: str, fields: tuple[str, ...]) -> dict[str, Any]:
    meta = config.get("metadata") or {}
    for name in fields:
        value = meta.get(name)
        if not value or not isinstance(value, str):
            raise InvalidArgument(f"{what} metadata.{name} is required")
    return meta


def _signal_name(value: str | None) -> str:
    """A signal name runc accepts; the image's STOPSIGNAL or SIGTERM."""
    if not value:
        return "TERM"
    text = str(value).strip().upper()
    if text.isdigit():
        return text
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return signals.Signals[text].name[3:]
    except KeyError:
        if text.startswith("SIGRTMIN") or text.startswith("SIGRTMAX"):
            return text[3:]
        return "TERM"


class Runtimed(Service):
    api = RUNTIMED
    # runc needs whatever the containers it starts may be granted: keep every
    # capability this machine gives us (None), and no more.
    capabilities = None

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.rc = config.crio.runtime
        self.state_dir = str(config.state_dir("runtimed"))
        self.run_dir = str(config.run_dir("runtimed"))
        self.exit_dir = self.rc.container_exits_dir or os.path.join(self.run_dir, "exits")
        self.attach_dir = os.path.join(self.run_dir, "attach")
        self.systemd = self.rc.cgroup_manager == "systemd"
        self.events = Events()
        self.sandboxes: dict[str, dict[str, Any]] = {}
        self.containers: dict[str, dict[str, Any]] = {}
        self._sandbox_names: dict[str, str] = {}
        self._container_names: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._changed: asyncio.Condition | None = None
        self._store: Store | None = None
        self._watcher: asyncio.Task | None = None
        self.features = features.Features()

    # -- life cycle -------------------------------------------------------

    async def start(self) -> None:
        for d in (self.state_dir, self.run_dir, self.exit_dir, self.attach_dir,
                  os.path.join(self.state_dir, "sandboxes"), os.path.join(self.state_dir, "containers"),
                  os.path.join(self.run_dir, "sandboxes")):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self._changed = asyncio.Condition()
        await self.features.detect(self.rc)
        self._store = Store(os.path.join(self.state_dir, "records"))
        for rec in self._store.load_all("sandboxes"):
            self.sandboxes[rec["id"]] = rec
            self._sandbox_names[rec["name"]] = rec["id"]
        for rec in self._store.load_all("containers"):
            self.containers[rec["id"]] = rec
            self._container_names[rec["name"]] = rec["id"]
        # Hooked before reconciling, so exits that happened while runtimed was down are published.
        self._event_publisher = EventPublisher(self)
        self._event_publisher.attach()
        self.events.subscribe(_count_oom_kills)
        await self._reconcile()
        self._watcher = asyncio.create_task(self._watch_exits(), name="runtimed-exit-watcher")
        self.ready = True
        log.info("runtimed_started", sandboxes=len(self.sandboxes), containers=len(self.containers))

    def refresh_metrics(self) -> None:
        for gauge, records, names in ((metrics.CONTAINERS, self.containers, _CONTAINER_STATES),
                                      (metrics.PODS, self.sandboxes, _SANDBOX_STATES)):
            counts = Counter(r["state"] for r in records.values() if r["state"] in names)
            for state in names:
                gauge.labels(state).set(counts[state])

    async def stop(self) -> None:
        self.ready = False
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except asyncio.CancelledError:
                pass
            self._watcher = None

    def readiness(self) -> dict[str, Any]:
        return {"runtime_ready": self.ready, **self.features.report()}

    async def apply_config(self, result: ReloadResult) -> None:
        if any(path.startswith("crio.runtime.runtimes") for path in result.applied):
            await self.features.detect(self.rc)

    def _rro(self, handler_name: str) -> tuple[bool, str]:
        """Whether the handler can make mounts read-only recursively, and why (not)."""
        found = self.features.handler(handler_name)
        if found is None:
            return False, f"runtime handler {handler_name!r} was not examined"
        return found.recursive_read_only_mounts, found.reason

    def add_event_hook(self, hook: Callable[[dict[str, Any]], None]) -> None:
        """Call `hook` with each container and sandbox event (see events.py)."""
        self.events.subscribe(hook)

    async def _reconcile(self) -> None:
        """Finish or undo what a previous run left in flight; pick up exits that happened meanwhile."""
        for rec in list(self.sandboxes.values()):
            if rec["state"] == "creating":
                log.info("sandbox_undo_in_flight", sandbox_id=rec["id"])
                await self._teardown_sandbox(rec, remove=True)
                rec["state"] = "reserved"
                await self._save_sandbox(rec)
            elif rec["state"] == "removing":
                await self._remove_sandbox_locked(rec)
        for rec in list(self.containers.values()):
            state = rec["state"]
            if state == "creating":
                await self._reconcile_creating(rec)
            elif state == "removing":
                await self._remove_container_locked(rec)
            elif state in ("created", "running"):
                await self._refresh(rec)
                if rec["state"] in ("created", "running") and not self._conmon_alive(rec):
                    self._note_monitor_gone(rec)
                    st = await self._runc(rec).state(rec["id"])
                    if st is None or st.get("status") == "stopped":
                        await self._mark_exited(rec, 255, reason="Error",
                                                message="the container's monitor (conmon) is gone")
        for rec in self.sandboxes.values():
            if rec.get("infra") and rec["state"] == "ready":
                self._refresh_infra(rec)
        await self._delete_orphans()

    async def _delete_orphans(self) -> None:
        """Delete runc containers in our own runc root that no record knows (never leak one)."""
        runc = self._runc_for("")
        if not os.path.isdir(runc.root):
            return
        # A reserved record has no runc container yet: one with its id is left
        # from a create that was interrupted, and is deleted like any orphan.
        known = ({i for i, r in self.containers.items() if r["state"] != "reserved"}
                 | {i for i, r in self.sandboxes.items() if r.get("infra")})
        for container_id in os.listdir(runc.root):
            if container_id not in known:
                log.warning("orphan_container_deleted", container_id=container_id)
                try:
                    await runc.delete(container_id, force=True)
                except Internal as e:
                    log.error("orphan_delete_failed", container_id=container_id, error=str(e))

    async def _reconcile_creating(self, rec: dict[str, Any]) -> None:
        st = await self._runc(rec).state(rec["id"])
        if st is not None and st.get("status") == "created" and self._conmon_alive(rec, lenient=True):
            pid = int(st.get("pid") or 0)
            conmon_pid = conmon.read_pidfile(os.path.join(rec["bundle"], "conmon.pid"))
            rec.update(state="created", pid=pid, pid_start=process.process_start_time(pid),
                       conmon_pid=conmon_pid, conmon_start=process.process_start_time(conmon_pid or 0),
                       created_at=rec.get("created_at") or time.time_ns())
            log.info("container_create_finished_after_restart", container_id=rec["id"])
            await self._save_container(rec)
            self.events.emit("container", "created", rec["id"], rec["sandbox_id"])
            return
        log.info("container_undo_in_flight", container_id=rec["id"])
        await self._undo_container_create(rec)
        rec["state"] = "reserved"
        await self._save_container(rec)

    # -- helpers: records, locks, waiting -----------------------------------

    def _lock(self, object_id: str) -> asyncio.Lock:
        lock = self._locks.get(object_id)
        if lock is None:
            lock = self._locks[object_id] = asyncio.Lock()
        return lock

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _wait_change(self, timeout: float) -> None:
        assert self._changed is not None
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def _save_sandbox(self, rec: dict[str, Any]) -> None:
        assert self._store is not None
        await self._store.save("sandboxes", rec)

    async def _save_container(self, rec: dict[str, Any]) -> None:
        assert self._store is not None
        await self._store.save("containers", rec)

    def _sandbox(self, sandbox_id: str, *, visible: bool = False) -> dict[str, Any]:
        rec = self.sandboxes.get(sandbox_id)
        if rec is None and sandbox_id and len(sandbox_id) < 64:
            matches = [r for i, r in self.sandboxes.items() if i.startswith(sandbox_id)]
            if len(matches) == 1:
                rec = matches[0]
        if rec is None or (visible and rec["state"] not in _SANDBOX_STATES):
            raise NotFound(f"pod sandbox {sandbox_id} not found")
        return rec

    def _container(self, container_id: str, *, visible: bool = False) -> dict[str, Any]:
        rec = self.containers.get(container_id)
        if rec is None and container_id and len(container_id) < 64:
            matches = [r for i, r in self.containers.items() if i.startswith(container_id)]
            if len(matches) == 1:
                rec = matches[0]
        if rec is None or (visible and rec["state"] not in _CONTAINER_STATES):
            raise NotFound(f"container {container_id} not found")
        return rec

    def _known_sandbox(self, sandbox_id: str) -> dict[str, Any] | None:
        """The pod with this id or unique id prefix, in any state; None when there is none."""
        try:
            return self._sandbox(sandbox_id)
        except NotFound:
            return None

    def _known_container(self, container_id: str) -> dict[str, Any] | None:
        """The container with this id or unique id prefix, in any state; None when there is none."""
        try:
            return self._container(container_id)
        except NotFound:
            return None

    def _handler(self, name: str) -> RuntimeHandler:
        handler = self.rc.runtimes.get(name or self.rc.default_runtime)
        if handler is None:
            raise InvalidArgument(f"unknown runtime handler {name!r} (configured: {', '.join(sorted(self.rc.runtimes))})")
        if handler.runtime_type not in ("oci", ""):
            raise InvalidArgument(f"runtime handler {name!r} has unsupported type {handler.runtime_type!r}")
        return handler

    def _runc_for(self, handler_name: str) -> Runc:
        handler = self._handler(handler_name)
        root = handler.runtime_root or os.path.join(self.state_dir, "runc")
        return Runc(path=handler.runtime_path, root=root, systemd_cgroup=self.systemd)

    def _runc(self, rec: dict[str, Any]) -> Runc:
        return self._runc_for(rec.get("runtime_handler", ""))

    def _conmon_alive(self, rec: dict[str, Any], *, lenient: bool = False) -> bool:
        pid = rec.get("conmon_pid")
        if not pid:
            pid = conmon.read_pidfile(os.path.join(rec.get("bundle", ""), "conmon.pid"))
            if not pid:
                return False
            return process.pid_alive(pid) if lenient else False
        if not process.pid_alive(pid):
            return False
        start = rec.get("conmon_start")
        return start is None or process.process_start_time(pid) == start

    # -- reservations (the resource store) ----------------------------------

    async def _reserve(self, kind: str, name: str, config_hash: str, timeout: float,
                       make: Callable[[], dict[str, Any]], token: str = "") -> dict[str, Any]:
        """The name's record, made if new. `token` names the calling request: the same request
        retried (its reply was lost while runtimed restarted) gets its own reservation back."""
        names = self._sandbox_names if kind == "sandbox" else self._container_names
        table = self.sandboxes if kind == "sandbox" else self.containers
        done_states = _SANDBOX_STATES if kind == "sandbox" else _CONTAINER_STATES
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            existing_id = names.get(name)
            rec = table.get(existing_id) if existing_id else None
            if rec is None:
                rec = make()
                rec["token"] = token
                names[name] = rec["id"]
                table[rec["id"]] = rec
                await (self._save_sandbox(rec) if kind == "sandbox" else self._save_container(rec))
                log.info(f"{kind}_reserved", id=rec["id"], name=name)
                return {"id": rec["id"], "state": "reserved", "created": True}
            if rec.get("config_hash") != config_hash:
                raise AlreadyExists(f"the name {name} is already used by {kind} {rec['id']}")
            if rec["state"] in done_states:
                if (kind == "sandbox" and rec["state"] != "ready") or rec["state"] == "exited":
                    raise AlreadyExists(f"the name {name} is held by finished {kind} {rec['id']}")
                return {"id": rec["id"], "state": rec["state"], "created": False}
            if token and rec.get("token") == token:
                return {"id": rec["id"], "state": "reserved", "created": True}
            # Reserved or being created by an earlier call: wait for it.
            if time.time() - rec.get("reserved_at", 0) > RESERVATION_LEASE:
                rec["reserved_at"] = time.time()
                log.info(f"{kind}_reservation_taken_over", id=rec["id"], name=name)
                return {"id": rec["id"], "state": "reserved", "created": True}
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(
                    f"the {kind} {name} is still being created by an earlier request ({rec['id']})")
            await self._wait_change(min(remaining, 1.0))

    # -- sandboxes ----------------------------------------------------------

    @method
    async def runtime_config(self) -> dict[str, Any]:
        return {"linux": {"cgroup_driver": "SYSTEMD" if self.systemd else "CGROUPFS"}}

    @method
    async def runtime_version(self) -> dict[str, Any]:
        _program, version = await runc.version(self._handler("").runtime_path)
        return {"runtime_name": "runc", "runtime_version": version, "runtime_api_version": "v1"}

    @method
    async def reserve_sandbox(self, config: dict, runtime_handler: str = "", timeout: float = 30.0,
                              token: str = "") -> dict:
        """Hold the pod's name; a retry of a pod still being made waits for it and gets its id."""
        meta = _metadata(config, "pod sandbox", ("name", "namespace", "uid"))
        self._handler(runtime_handler)
        users.check_run_as_group(((config.get("linux") or {}).get("security_context") or {}), pod=True)
        attempt = int(meta.get("attempt") or 0)
        name = f"k8s_{meta['name']}_{meta['namespace']}_{meta['uid']}_{attempt}"
        config_hash = _hash([config, runtime_handler])

        def make() -> dict[str, Any]:
            return {"id": secrets.token_hex(32), "name": name, "config": config, "config_hash": config_hash,
                    "runtime_handler": runtime_handler or self.rc.default_runtime, "state": "reserved",
                    "reserved_at": time.time(), "created_at": 0}

        return await self._reserve("sandbox", name, config_hash, timeout, make, token)

    @method
    async def create_sandbox(self, sandbox_id: str, netns_path: str | None = None,
                             ips: list | None = None) -> dict:
        """Make the reserved pod: directory, namespaces, files, cgroup, infra process."""
        rec = self._sandbox(sandbox_id)
        async with self._lock(rec["id"]):
            if rec["state"] in _SANDBOX_STATES:
                return {"id": rec["id"], "state": _SANDBOX_STATES[rec["state"]]}
            if rec["state"] != "reserved":
                raise FailedPrecondition(f"pod sandbox {sandbox_id} is {rec['state']}")
            if netns_path is not None and not os.path.exists(netns_path):
                raise InvalidArgument(f"network namespace {netns_path} does not exist")
            rec.update(state="creating", netns_path=netns_path, ips=list(ips or []))
            await self._save_sandbox(rec)
            try:
                await self._setup_sandbox(rec)
            except BaseException:
                await self._teardown_sandbox(rec, remove=True)
                rec["state"] = "reserved"
                await self._save_sandbox(rec)
                await self._notify()
                raise
            rec["state"] = "ready"
            rec["created_at"] = time.time_ns()
            await self._save_sandbox(rec)
        await self._notify()
        self.events.emit("sandbox", "created", rec["id"], rec["id"])
        log.info("sandbox_created", sandbox_id=rec["id"], name=rec["name"])
        return {"id": rec["id"], "state": "SANDBOX_READY"}

    @method
    async def release_sandbox(self, sandbox_id: str) -> dict:
        """Undo a reservation whose RunPodSandbox failed; a finished pod is left alone."""
        rec = self.sandboxes.get(sandbox_id)
        if rec is None:
            return {}
        async with self._lock(sandbox_id):
            if rec["state"] in ("reserved", "creating"):
                await self._teardown_sandbox(rec, remove=True)
                await self._forget("sandboxes", rec)
        await self._notify()
        return {}

    async def _forget(self, kind: str, rec: dict[str, Any]) -> None:
        """Drop a sandbox's or container's record, its name and its lock."""
        assert self._store is not None
        records, names = ((self.sandboxes, self._sandbox_names) if kind == "sandboxes"
                          else (self.containers, self._container_names))
        await self._store.delete(kind, rec["id"])
        records.pop(rec["id"], None)
        if names.get(rec["name"]) == rec["id"]:
            del names[rec["name"]]
        self._locks.pop(rec["id"], None)

    def _sandbox_paths(self, sandbox_id: str) -> tuple[str, str]:
        return (os.path.join(self.state_dir, "sandboxes", sandbox_id),
                os.path.join(self.run_dir, "sandboxes", sandbox_id))

    async def _setup_sandbox(self, rec: dict[str, Any]) -> None:
        cfg = rec["config"]
        linux = cfg.get("linux") or {}
        sc = linux.get("security_context") or {}
        ns = sc.get("namespace_options") or {}
        net_mode = spec.ns_mode(ns, "network")
        ipc_mode = spec.ns_mode(ns, "ipc")
        pid_mode = spec.ns_mode(ns, "pid")
        host_network = net_mode == "NODE"
        if not host_network and not rec.get("netns_path"):
            log.info("sandbox_without_netns", sandbox_id=rec["id"])
        pod_dir, run_dir = self._sandbox_paths(rec["id"])
        os.makedirs(pod_dir, mode=0o755, exist_ok=True)
        os.makedirs(run_dir, mode=0o755, exist_ok=True)
        if host_network:
            hostname = os.uname().nodename
        else:
            hostname = podfiles.check_hostname(cfg.get("hostname") or rec["id"][:12])
        log_directory = cfg.get("log_directory") or os.path.join(self.config.crio.log_dir, rec["id"])
        if not os.path.isabs(log_directory):
            raise InvalidArgument(f"log_directory must be absolute: {log_directory!r}")
        sysctls = {}
        for item in self.rc.default_sysctls:
            key, _, value = item.partition("=")
            sysctls[key.strip()] = value.strip()
        sysctls.update(linux.get("sysctls") or {})
        sysctls = namespaces.check_sysctls(sysctls, host_ipc=ipc_mode == "NODE", host_network=host_network)
        rec.update(
            dir=pod_dir, run_dir=run_dir, hostname=hostname, log_directory=log_directory,
            network_mode=net_mode, ipc_mode=ipc_mode, pid_mode=pid_mode,
            privileged=bool(sc.get("privileged")),
            hostname_path=os.path.join(pod_dir, "hostname"),
            hosts_path=os.path.join(pod_dir, "hosts"),
            resolv_path=os.path.join(pod_dir, "resolv.conf"),
            ipc_ns_path=None if ipc_mode == "NODE" else os.path.join(run_dir, "ipcns"),
            uts_ns_path=None if host_network else os.path.join(run_dir, "utsns"),
            shm_path=None if ipc_mode == "NODE" else os.path.join(run_dir, "shm"),
            sysctls=sysctls, infra=None, cgroups_made=[],
        )
        podfiles.write_hostname(rec["hostname_path"], hostname)
        podfiles.write_hosts(rec["hosts_path"], hostname, rec.get("ips") or [], host_network=host_network)
        podfiles.write_resolv(rec["resolv_path"], cfg.get("dns_config"))
        os.makedirs(log_directory, mode=0o755, exist_ok=True)
        await self._save_sandbox(rec)
        await namespaces.pin(ipc_path=rec["ipc_ns_path"], uts_path=rec["uts_ns_path"], hostname=hostname,
                             sysctls=sysctls, netns=rec.get("netns_path"))
        if rec["shm_path"]:
            os.makedirs(rec["shm_path"], mode=0o755, exist_ok=True)
            try:
                mount("shm", rec["shm_path"], "tmpfs", 0x2 | 0x4 | 0x8, f"mode=1777,size={SHM_SIZE}")
            except OSError as e:
                raise Internal(f"mounting the pod's /dev/shm: {e}") from None
        parent = linux.get("cgroup_parent") or DEFAULT_CGROUP_PARENT
        if self.systemd:
            if not parent.endswith(".slice"):
                raise InvalidArgument(f"cgroup parent for the systemd driver must be a .slice: {parent!r}")
        else:
            parent = cgroups.check_parent(parent)
            rec["cgroups_made"] = cgroups.missing(parent)
        rec["cgroup_parent"] = parent
        await self._save_sandbox(rec)
        if not self.systemd:
            cgroups.create(parent)
        if pid_mode == "POD":
            await self._start_infra(rec)

    def _facts(self, rec: dict[str, Any]) -> spec.SandboxFacts:
        infra = rec.get("infra")
        pid_ns = None
        if infra:
            if not self._infra_alive(rec):
                raise FailedPrecondition(f"the infra process of pod sandbox {rec['id']} is not running")
            pid_ns = f"/proc/{infra['pid']}/ns/pid"
        return spec.SandboxFacts(
            id=rec["id"], cgroup_parent=rec["cgroup_parent"], hostname=rec.get("hostname", ""),
            netns_path=rec.get("netns_path"), network_mode=rec.get("network_mode", "POD"),
            ipc_mode=rec.get("ipc_mode", "POD"), ipc_ns_path=rec.get("ipc_ns_path"),
            uts_ns_path=rec.get("uts_ns_path"), pid_ns_path=pid_ns, hosts_path=rec.get("hosts_path"),
            resolv_path=rec.get("resolv_path"), hostname_path=rec.get("hostname_path"),
            shm_path=rec.get("shm_path"), privileged=bool(rec.get("privileged")))

    def _infra_rootfs(self) -> str:
        root = os.path.join(self.state_dir, "infra-rootfs")
        binary = os.path.join(root, "catatonit")
        if not os.path.exists(binary):
            os.makedirs(root, exist_ok=True)
            for d in ("proc", "dev", "sys"):
                os.makedirs(os.path.join(root, d), exist_ok=True)
            source = self.rc.infra_command
            if not os.path.isfile(source):
                raise FailedPrecondition(f"the infra command {source} does not exist")
            tmp = binary + ".tmp"
            shutil.copyfile(source, tmp)
            os.chmod(tmp, 0o755)
            os.replace(tmp, binary)
        return root

    async def _start_infra(self, rec: dict[str, Any]) -> None:
        """Run the pod's init (catatonit) in a new PID namespace the containers then join."""
        pod_dir = rec["dir"]
        bundle = os.path.join(pod_dir, "infra")
        os.makedirs(bundle, exist_ok=True)
        facts = self._facts(rec)
        infra_spec = spec.infra_spec(sandbox_id=rec["id"], rootfs=self._infra_rootfs(), command="/catatonit",
                                     sandbox=facts, systemd_cgroup=self.systemd)
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(infra_spec, f)
        rec["infra"] = {"bundle": bundle, "pid": 0}
        await self._save_sandbox(rec)
        runc = self._runc(rec)
        started = await conmon.start(conmon.ConmonSpec(
            container_id=rec["id"], name=rec["name"], bundle=bundle, log_path=os.path.join(pod_dir, "infra.log"),
            exit_dir=self.exit_dir, socket_dir=self.attach_dir, persist_dir=os.path.join(bundle, "persist"),
            runc=runc, monitor_path=self._handler(rec["runtime_handler"]).monitor_path,
            log_level=self.rc.log_level, systemd_cgroup=self.systemd))
        rec["infra"].update(pid=started.container_pid, pid_start=process.process_start_time(started.container_pid),
                            conmon_pid=started.conmon_pid, conmon_start=process.process_start_time(started.conmon_pid))
        await self._save_sandbox(rec)
        await runc.start(rec["id"])

    def _infra_alive(self, rec: dict[str, Any]) -> bool:
        infra = rec.get("infra") or {}
        pid = infra.get("pid")
        if not pid or not process.pid_alive(pid):
            return False
        return infra.get("pid_start") is None or process.process_start_time(pid) == infra["pid_start"]

    def _refresh_infra(self, rec: dict[str, Any]) -> None:
        if rec.get("infra") and rec["state"] == "ready" and not self._infra_alive(rec):
            log.warning("sandbox_infra_exited", sandbox_id=rec["id"])
            rec["infra_exited"] = True

    async def _stop_infra(self, rec: dict[str, Any], *, delete: bool) -> None:
        infra = rec.get("infra")
        if not infra:
            return
        runc = self._runc(rec)
        if self._infra_alive(rec):
            try:
                await runc.kill(rec["id"], "KILL", all_processes=True)
            except (NotFound, Internal) as e:
                log.warning("infra_kill_failed", sandbox_id=rec["id"], error=str(e))
            await self._wait_file(os.path.join(self.exit_dir, rec["id"]), 10.0)
        if delete:
            await runc.delete(rec["id"], force=True)
            await self._wait_conmon_gone(infra.get("conmon_pid"), infra.get("conmon_start"))
            _unlink(os.path.join(self.exit_dir, rec["id"]))
            _unlink(os.path.join(self.attach_dir, rec["id"]))

    async def _teardown_sandbox(self, rec: dict[str, Any], *, remove: bool) -> None:
        """Undo what _setup_sandbox made (all of it when `remove`); every step tolerates absence."""
        try:
            await self._stop_infra(rec, delete=remove)
        except Exception as e:
            log.warning("infra_stop_failed", sandbox_id=rec["id"], error=str(e))
        if rec.get("shm_path"):
            _unmount_quiet(rec["shm_path"])
        if not remove:
            return
        for key in ("ipc_ns_path", "uts_ns_path"):
            namespaces.unpin(rec.get(key))
        busy = await asyncio.to_thread(cgroups.remove_dirs, rec.get("cgroups_made") or [])
        if busy:
            log.warning("sandbox_cgroups_left", sandbox_id=rec["id"], dirs=busy)
        pod_dir, run_dir = self._sandbox_paths(rec["id"])
        for d in (run_dir, pod_dir):
            await asyncio.to_thread(_rmtree_same_fs, d)

    @method
    async def stop_sandbox(self, sandbox_id: str) -> dict:
        """Stop every container of the pod and its infra process; the pod stays listed.
        A pod that is unknown (already removed) is success, as the CRI requires: {"id"} is
        the full id stopped, "" when there was none."""
        rec = self._known_sandbox(sandbox_id)
        if rec is None:
            return {"id": ""}
        for c in [c for c in self.containers.values() if c["sandbox_id"] == rec["id"]]:
            if c["state"] in ("created", "running"):
                await self._stop_container(c, 0)
        async with self._lock(rec["id"]):
            if rec["state"] not in _SANDBOX_STATES:
                return {"id": rec["id"]}
            await self._teardown_sandbox(rec, remove=False)
            changed = rec["state"] != "notready"
            rec["state"] = "notready"
            await self._save_sandbox(rec)
        if changed:
            self.events.emit("sandbox", "stopped", rec["id"], rec["id"])
        return {"id": rec["id"]}

    @method
    async def remove_sandbox(self, sandbox_id: str) -> dict:
        """Remove the pod and all its containers (reserved ones too, whose ids it returns
        so their rootfs can be released); a pod already gone is success."""
        rec = self._known_sandbox(sandbox_id)
        if rec is None:
            return {"id": "", "removed_containers": []}
        removed = []
        for c in [c for c in self.containers.values() if c["sandbox_id"] == rec["id"]]:
            await self._remove_container(c)
            removed.append(c["id"])
        async with self._lock(rec["id"]):
            if rec["id"] in self.sandboxes:
                rec["state"] = "removing"
                await self._save_sandbox(rec)
                await self._remove_sandbox_locked(rec)
        await self._notify()
        return {"id": rec["id"], "removed_containers": removed}

    async def _remove_sandbox_locked(self, rec: dict[str, Any]) -> None:
        await self._teardown_sandbox(rec, remove=True)
        await self._forget("sandboxes", rec)
        self.events.emit("sandbox", "removed", rec["id"], rec["id"])
        log.info("sandbox_removed", sandbox_id=rec["id"])

    def _sandbox_state(self, rec: dict[str, Any]) -> str:
        self._refresh_infra(rec)
        if rec["state"] == "ready" and rec.get("infra_exited"):
            return "SANDBOX_NOTREADY"
        return _SANDBOX_STATES[rec["state"]]

    def _sandbox_entry(self, rec: dict[str, Any]) -> dict[str, Any]:
        cfg = rec["config"]
        return {
            "id": rec["id"],
            "metadata": cfg.get("metadata") or {},
            "state": self._sandbox_state(rec),
            "created_at": rec.get("created_at", 0),
            "labels": cfg.get("labels") or {},
            "annotations": cfg.get("annotations") or {},
            "runtime_handler": rec.get("runtime_handler", ""),
        }

    @method
    async def sandbox_status(self, sandbox_id: str, verbose: bool = False) -> dict:
        rec = self._sandbox(sandbox_id, visible=True)
        cfg = rec["config"]
        ns = ((cfg.get("linux") or {}).get("security_context") or {}).get("namespace_options") or {}
        status = self._sandbox_entry(rec)
        ips = rec.get("ips") or []
        status["network"] = {"ip": ips[0] if ips else "",
                             "additional_ips": [{"ip": ip} for ip in ips[1:]]}
        status["linux"] = {"namespaces": {"options": {
            "network": rec.get("network_mode", "POD"), "pid": rec.get("pid_mode", "POD"),
            "ipc": rec.get("ipc_mode", "POD"), **({"target_id": ns["target_id"]} if ns.get("target_id") else {})}}}
        result: dict[str, Any] = {"status": status}
        if verbose:
            infra = rec.get("infra") or {}
            result["info"] = {"info": json.dumps({
                "hostname": rec.get("hostname"), "netns_path": rec.get("netns_path"),
                "cgroup_parent": rec.get("cgroup_parent"), "log_directory": rec.get("log_directory"),
                "infra_pid": infra.get("pid"), "runtime_handler": rec.get("runtime_handler"),
                "sysctls": rec.get("sysctls"), "config": cfg,
            })}
        return result

    @method
    async def list_sandboxes(self, filter: dict | None = None) -> list:
        f = filter or {}
        want_state = f.get("state")
        if isinstance(want_state, dict):
            want_state = want_state.get("state")
        if isinstance(want_state, int):
            want_state = ["SANDBOX_READY", "SANDBOX_NOTREADY"][want_state]
        selector = f.get("label_selector") or {}
        out = []
        for rec in list(self.sandboxes.values()):
            if rec["state"] not in _SANDBOX_STATES:
                continue
            if f.get("id") and not rec["id"].startswith(f["id"]):
                continue
            entry = self._sandbox_entry(rec)
            if _selected(entry, want_state, selector):
                out.append(entry)
        return out

    # -- containers -----------------------------------------------------------

    @method
    async def reserve_container(self, sandbox_id: str, config: dict, timeout: float = 30.0,
                                token: str = "") -> dict:
        """Hold the container's name in its pod; a retry of a create in progress waits for it."""
        sb = self._sandbox(sandbox_id, visible=True)
        if sb["state"] != "ready":
            raise FailedPrecondition(f"pod sandbox {sandbox_id} is not ready")
        meta = _metadata(config, "container", ("name",))
        rro, rro_reason = self._rro(sb.get("runtime_handler", ""))
        spec.check_request(config, rro=rro, rro_reason=rro_reason)
        pod_meta = sb["config"].get("metadata") or {}
        attempt = int(meta.get("attempt") or 0)
        name = (f"k8s_{meta['name']}_{pod_meta.get('name')}_{pod_meta.get('namespace')}_"
                f"{pod_meta.get('uid')}_{attempt}")
        config_hash = _hash([sb["id"], config])

        def make() -> dict[str, Any]:
            return {"id": secrets.token_hex(32), "name": name, "sandbox_id": sb["id"], "config": config,
                    "config_hash": config_hash, "runtime_handler": sb.get("runtime_handler", ""),
                    "state": "reserved", "reserved_at": time.time(), "created_at": 0}

        return await self._reserve("container", name, config_hash, timeout, make, token)

    def _log_path(self, sb: dict[str, Any], cfg: dict[str, Any]) -> str:
        log_directory = sb.get("log_directory") or os.path.join(self.config.crio.log_dir, sb["id"])
        meta = cfg.get("metadata") or {}
        rel = cfg.get("log_path") or f"{meta.get('name')}_{int(meta.get('attempt') or 0)}.log"
        rel = confined_relative(rel, "log_path")
        return os.path.join(log_directory, rel)

    @method
    async def create_container(self, container_id: str, rootfs: str, image: dict | None = None,
                               image_ref: str = "") -> dict:
        """Build the OCI spec and have conmon create the container with runc.

        `image`: imaged's image record ({"id", "repo_tags", "repo_digests", "config": {...}}).
        """
        rec = self._container(container_id)
        async with self._lock(rec["id"]):
            if rec["state"] in _CONTAINER_STATES:
                return {"id": rec["id"]}
            if rec["state"] != "reserved":
                raise FailedPrecondition(f"container {container_id} is {rec['state']}")
            sb = self._sandbox(rec["sandbox_id"], visible=True)
            if sb["state"] != "ready":
                raise FailedPrecondition(f"pod sandbox {sb['id']} is not ready")
            cfg = rec["config"]
            image = image or {}
            image_cfg = image.get("config") or {}
            linux = cfg.get("linux") or {}
            sc = linux.get("security_context") or {}
            target_ns = None
            ns_opts = sc.get("namespace_options") or {}
            if spec.ns_mode(ns_opts, "pid") == "TARGET":
                target = self._container(ns_opts.get("target_id", ""), visible=True)
                if target["sandbox_id"] != sb["id"] or target["state"] != "running":
                    raise FailedPrecondition("the target container must be running in the same pod")
                target_ns = f"/proc/{target['pid']}/ns/pid"
            log_path = self._log_path(sb, cfg)
            handler = self._handler(rec["runtime_handler"])
            rro, rro_reason = self._rro(rec["runtime_handler"])
            built = await asyncio.to_thread(
                spec.build, container_id=rec["id"], config=cfg, image=image_cfg, rootfs=rootfs,
                sandbox=self._facts(sb), rc=self.rc, systemd_cgroup=self.systemd, target_pid_ns=target_ns,
                pids_limit=self.rc.pids_limit,
                privileged_host_devices=not handler.privileged_without_host_devices,
                hugetlb=self.features.hugetlb, rro=rro, rro_reason=rro_reason)
            bundle = os.path.join(self.state_dir, "containers", rec["id"])
            if os.path.exists(bundle):
                # An earlier attempt was cut off (its conmon may even have gone
                # on): clear what it left, runc container and exit file included.
                log.warning("container_create_clears_leftover", container_id=rec["id"])
                await self._undo_container_create({**rec, "bundle": bundle})
            os.makedirs(bundle, mode=0o700, exist_ok=True)
            with open(os.path.join(bundle, "config.json"), "w") as f:
                json.dump(built.spec, f)
            image_spec = cfg.get("image") or {}
            rec.update(
                state="creating", bundle=bundle, rootfs=rootfs, log_path=log_path,
                stop_signal=_signal_name(built.stop_signal), privileged=built.privileged,
                image_name=image_spec.get("image") or image_ref or image.get("id", ""),
                image_id=image.get("id", ""),
                image_ref=image_ref or ((image.get("repo_digests") or [None])[0]) or image.get("id", ""),
                mounts=built.mounts, resources=(linux.get("resources") or {}),
                uid=built.user.uid, gid=built.user.gid, supplemental_groups=list(built.user.additional_gids),
                tty=bool(cfg.get("tty")),
                conmon_cgroup_dirs=[],
            )
            conmon_cgroup = self._conmon_cgroup_path(rec, sb)
            if conmon_cgroup and self.rc.conmon_cgroup == "pod":
                rec["conmon_cgroup_dirs"] = cgroups.missing(conmon_cgroup)
            await self._save_container(rec)
            try:
                os.makedirs(os.path.dirname(log_path), exist_ok=True)
                procs = []
                if conmon_cgroup:
                    cgroups.create(conmon_cgroup)
                    procs = cgroups.procs(conmon_cgroup)
                conmon_spec = conmon.ConmonSpec(
                    container_id=rec["id"], name=rec["name"], bundle=bundle, log_path=log_path,
                    exit_dir=self.exit_dir, socket_dir=self.attach_dir,
                    persist_dir=os.path.join(bundle, "persist"), runc=self._runc(rec),
                    monitor_path=handler.monitor_path, terminal=bool(cfg.get("tty")),
                    stdin=bool(cfg.get("stdin")), stdin_once=bool(cfg.get("stdin_once")),
                    log_size_max=self.rc.log_size_max, log_level=self.rc.log_level,
                    systemd_cgroup=self.systemd)
                started = await conmon.start(conmon_spec, cgroup_procs=procs)
            except BaseException:
                await self._undo_container_create(rec)
                rec["state"] = "reserved"
                await self._save_container(rec)
                await self._notify()
                raise
            rec.update(state="created", pid=started.container_pid,
                       pid_start=process.process_start_time(started.container_pid),
                       conmon_pid=started.conmon_pid, conmon_start=process.process_start_time(started.conmon_pid),
                       created_at=time.time_ns())
            await self._save_container(rec)
        await self._notify()
        self.events.emit("container", "created", rec["id"], rec["sandbox_id"])
        log.info("container_created", container_id=rec["id"], name=rec["name"])
        return {"id": rec["id"]}

    def _conmon_cgroup_path(self, rec: dict[str, Any], sb: dict[str, Any]) -> str | None:
        """The cgroup conmon joins: <pod cgroup>/crio-conmon-<id>, or the configured path."""
        if self.systemd:
            return None
        setting = self.rc.conmon_cgroup
        if setting == "pod":
            return f"{sb['cgroup_parent'].rstrip('/')}/crio-conmon-{rec['id']}"
        if setting.startswith("/"):
            return cgroups.check_parent(setting)
        return None

    async def _undo_container_create(self, rec: dict[str, Any]) -> None:
        runc = self._runc(rec)
        try:
            await runc.delete(rec["id"], force=True)
        except Exception as e:
            log.warning("container_undo_delete_failed", container_id=rec["id"], error=str(e))
        pid = rec.get("conmon_pid") or conmon.read_pidfile(os.path.join(rec.get("bundle", "/nonexistent"), "conmon.pid"))
        await self._wait_conmon_gone(pid, rec.get("conmon_start"))
        self._cleanup_container_files(rec)

    def _cleanup_container_files(self, rec: dict[str, Any]) -> None:
        _unlink(os.path.join(self.exit_dir, rec["id"]))
        _unlink(os.path.join(self.attach_dir, rec["id"]))
        if rec.get("bundle"):
            shutil.rmtree(rec["bundle"], ignore_errors=True)
        if rec.get("conmon_cgroup_dirs"):
            # conmon has exited: its cgroup is empty, and removing it is quick.
            cgroups.remove_dirs(rec["conmon_cgroup_dirs"], timeout=0.5)
            rec["conmon_cgroup_dirs"] = []

    async def _wait_conmon_gone(self, pid: int | None, start: int | None, timeout: float = 10.0) -> None:
        if not pid:
            return
        deadline = time.monotonic() + timeout
        while process.pid_alive(pid) and (start is None or process.process_start_time(pid) == start):
            if time.monotonic() > deadline:
                log.warning("conmon_killed", pid=pid)
                try:
                    os.kill(pid, signals.SIGKILL)
                except ProcessLookupError:
                    pass
                return
            await asyncio.sleep(0.02)

    @method
    async def release_container(self, container_id: str) -> dict:
        """Undo a reservation whose CreateContainer failed; a created container is left alone."""
        rec = self.containers.get(container_id)
        if rec is None:
            return {}
        async with self._lock(container_id):
            if rec["state"] in ("reserved", "creating"):
                await self._undo_container_create(rec)
                await self._forget("containers", rec)
        await self._notify()
        return {}

    @method
    async def start_container(self, container_id: str) -> dict:
        rec = self._container(container_id, visible=True)
        async with self._lock(rec["id"]):
            await self._refresh(rec)
            if rec["state"] == "running":
                return {}
            if rec["state"] != "created":
                raise FailedPrecondition(f"container {container_id} is {rec['state']}, not created")
            started_at = time.time_ns()
            await self._runc(rec).start(rec["id"])
            rec.update(state="running", started_at=started_at)
            await self._save_container(rec)
        self.events.emit("container", "started", rec["id"], rec["sandbox_id"])
        await self._refresh(rec)
        return {}

    async def _refresh(self, rec: dict[str, Any]) -> None:
        """Pick up the container's exit from conmon's exit file."""
        if rec["state"] not in ("created", "running"):
            return
        path = os.path.join(self.exit_dir, rec["id"])
        code = conmon.read_exit_file(path)
        if code is None:
            return
        try:
            finished = os.stat(path).st_mtime_ns
        except OSError:
            finished = time.time_ns()
        await self._mark_exited(rec, code, finished_at=finished)

    async def _mark_exited(self, rec: dict[str, Any], code: int, *, finished_at: int | None = None,
                           reason: str | None = None, message: str = "") -> None:
        if rec["state"] not in ("created", "running"):
            return
        oom = any(os.path.exists(os.path.join(rec.get("bundle", ""), p)) for p in ("oom", "persist/oom"))
        if reason is None:
            reason = "OOMKilled" if oom else ("Completed" if code == 0 else "Error")
        finished_at = max(finished_at or time.time_ns(), rec.get("started_at") or 0)
        rec.update(state="exited", exit_code=code, finished_at=finished_at,
                   reason=reason, message=message, oom=oom)
        if not rec.get("started_at"):
            rec["started_at"] = 0
        await self._save_container(rec)
        log.info("container_exited", container_id=rec["id"], exit_code=code, reason=reason)
        if oom:
            self.events.emit("container", "oom", rec["id"], rec["sandbox_id"], name=rec["name"])
        self.events.emit("container", "exited", rec["id"], rec["sandbox_id"], exit_code=code)

    def _note_monitor_gone(self, rec: dict[str, Any]) -> None:
        """A container's conmon died under it: said once, in the log and CRI-O's metric."""
        if rec.get("monitor_gone"):
            return
        rec["monitor_gone"] = True
        log.warning("container_monitor_gone", container_id=rec["id"], conmon_pid=rec.get("conmon_pid"))
        metrics.CRIO_CONTAINERS_STOPPED_MONITOR.labels(rec["name"]).inc()

    async def _watch_exits(self) -> None:
        ticks = 0
        while True:
            try:
                await asyncio.sleep(EXIT_POLL_INTERVAL)
                ticks += 1
                for rec in list(self.containers.values()):
                    if rec["state"] in ("created", "running"):
                        await self._refresh(rec)
                        # Monitors die rarely: looked for every few seconds, not at every poll.
                        if ticks % MONITOR_CHECK_TICKS == 0 and rec["state"] in ("created", "running") \
                                and not self._conmon_alive(rec):
                            self._note_monitor_gone(rec)
                for rec in list(self.sandboxes.values()):
                    self._refresh_infra(rec)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.error("exit_watcher_error", error=str(e))

    async def _wait_file(self, path: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def _wait_exit(self, rec: dict[str, Any], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            await self._refresh(rec)
            if rec["state"] == "exited":
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)

    @method
    async def stop_container(self, container_id: str, timeout: int = 0) -> dict:
        """Send the stop signal, then SIGKILL after `timeout` seconds. A stopped container is
        fine, and so is an unknown one: the kubelet retries stops after a restart."""
        rec = self._known_container(container_id)
        if rec is None:
            return {"id": ""}
        await self._stop_container(rec, int(timeout or 0))
        return {"id": rec["id"]}

    async def _stop_container(self, rec: dict[str, Any], timeout: int) -> None:
        async with self._lock(rec["id"]):
            await self._refresh(rec)
            if rec["state"] not in ("created", "running"):
                return
            runc = self._runc(rec)
            if timeout > 0 and rec["state"] == "running":
                try:
                    await runc.kill(rec["id"], rec.get("stop_signal") or "TERM")
                except NotFound:
                    pass
                except Internal as e:
                    log.warning("container_stop_signal_failed", container_id=rec["id"], error=str(e))
                if await self._wait_exit(rec, timeout):
                    return
            try:
                await runc.kill(rec["id"], "KILL", all_processes=True)
            except (NotFound, Internal) as e:
                log.info("container_kill_failed", container_id=rec["id"], error=str(e))
            if not await self._wait_exit(rec, 30.0):
                if not self._conmon_alive(rec):
                    self._note_monitor_gone(rec)
                    await self._mark_exited(rec, 137, reason="Error", message="killed; conmon is gone")
                else:
                    raise Internal(f"container {rec['id']} did not exit after SIGKILL")

    @method
    async def remove_container(self, container_id: str) -> dict:
        """Stop (if needed) and remove the container; one already gone is success.
        {"id"}: the full id removed, "" when there was none."""
        rec = self._known_container(container_id)
        if rec is None:
            return {"id": ""}
        await self._remove_container(rec)
        await self._notify()
        return {"id": rec["id"]}

    async def _remove_container(self, rec: dict[str, Any]) -> None:
        if rec["state"] in ("created", "running"):
            await self._stop_container(rec, 0)
        async with self._lock(rec["id"]):
            if rec["id"] not in self.containers:
                return
            rec["state"] = "removing"
            await self._save_container(rec)
            await self._remove_container_locked(rec)

    async def _remove_container_locked(self, rec: dict[str, Any]) -> None:
        await self._runc(rec).delete(rec["id"], force=True)
        await self._wait_conmon_gone(rec.get("conmon_pid"), rec.get("conmon_start"))
        self._cleanup_container_files(rec)
        await self._forget("containers", rec)
        self.events.emit("container", "removed", rec["id"], rec["sandbox_id"], name=rec["name"])
        log.info("container_removed", container_id=rec["id"])

    def _container_entry(self, rec: dict[str, Any]) -> dict[str, Any]:
        cfg = rec["config"]
        return {
            "id": rec["id"],
            "pod_sandbox_id": rec["sandbox_id"],
            "metadata": cfg.get("metadata") or {},
            "image": {"image": rec.get("image_name", "")},
            "image_ref": rec.get("image_ref", ""),
            "image_id": rec.get("image_id", ""),
            "state": _CONTAINER_STATES[rec["state"]],
            "created_at": rec.get("created_at", 0),
            "labels": cfg.get("labels") or {},
            "annotations": cfg.get("annotations") or {},
        }

    @method
    async def container_status(self, container_id: str, verbose: bool = False) -> dict:
        rec = self._container(container_id, visible=True)
        await self._refresh(rec)
        if rec["state"] not in _CONTAINER_STATES:
            raise NotFound(f"container {container_id} not found")
        status = self._container_entry(rec)
        del status["pod_sandbox_id"]
        status.update(
            started_at=rec.get("started_at", 0) or 0,
            finished_at=rec.get("finished_at", 0) or 0,
            exit_code=rec.get("exit_code", 0) or 0,
            reason=rec.get("reason", ""),
            message=rec.get("message", ""),
            mounts=rec.get("mounts") or [],
            log_path=rec.get("log_path", ""),
            resources={"linux": rec.get("resources") or {}},
        )
        if rec.get("uid") is not None:
            # The identity the container's process really has (CRI-O reports the spec's process user).
            linux_user = {"uid": rec["uid"]}
            if rec.get("gid") is not None:
                linux_user.update(gid=rec["gid"], supplemental_groups=rec.get("supplemental_groups") or [])
            status["user"] = {"linux": linux_user}
        result: dict[str, Any] = {"status": status}
        if verbose:
            try:
                with open(os.path.join(rec["bundle"], "config.json")) as f:
                    runtime_spec = json.load(f)
            except (OSError, ValueError):
                runtime_spec = None
            result["info"] = {"info": json.dumps({
                "sandboxID": rec["sandbox_id"], "pid": rec.get("pid", 0), "runtimeSpec": runtime_spec,
                "conmonPid": rec.get("conmon_pid"), "bundle": rec.get("bundle"), "privileged": rec.get("privileged"),
            })}
        return result

    @method
    async def list_containers(self, filter: dict | None = None) -> list:
        f = filter or {}
        want_state = f.get("state")
        if isinstance(want_state, dict):
            want_state = want_state.get("state")
        if isinstance(want_state, int):
            want_state = ["CONTAINER_CREATED", "CONTAINER_RUNNING", "CONTAINER_EXITED", "CONTAINER_UNKNOWN"][want_state]
        selector = f.get("label_selector") or {}
        out = []
        for rec in list(self.containers.values()):
            if rec["state"] not in _CONTAINER_STATES:
                continue
            if f.get("id") and not rec["id"].startswith(f["id"]):
                continue
            if f.get("pod_sandbox_id") and not rec["sandbox_id"].startswith(f["pod_sandbox_id"]):
                continue
            await self._refresh(rec)
            entry = self._container_entry(rec)
            if _selected(entry, want_state, selector):
                out.append(entry)
        return out

    @method
    async def exec_sync(self, container_id: str, cmd: list, timeout: float = 0) -> dict:
        """Run `cmd` in the running container; its stdout, stderr and exit code."""
        rec = self._container(container_id, visible=True)
        await self._refresh(rec)
        if rec["state"] != "running":
            raise FailedPrecondition(f"container {container_id} is not running")
        if not cmd or not all(isinstance(c, str) for c in cmd):
            raise InvalidArgument("exec command must be a non-empty list of strings")
        with open(os.path.join(rec["bundle"], "config.json")) as f:
            proc_spec = json.load(f)["process"]
        proc_spec.update(args=list(cmd), terminal=False)
        token = secrets.token_hex(8)
        process_file = os.path.join(rec["bundle"], f"exec-{token}.json")
        pid_file = os.path.join(rec["bundle"], f"exec-{token}.pid")
        with open(process_file, "w") as f:
            json.dump(proc_spec, f)
        args = self._runc(rec).exec_args(rec["id"], process_file, pid_file)
        try:
            proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True)
            out_task = asyncio.ensure_future(_read_limited(proc.stdout))
            err_task = asyncio.ensure_future(_read_limited(proc.stderr))
            try:
                await asyncio.wait_for(proc.wait(), timeout if timeout and timeout > 0 else None)
            except asyncio.TimeoutError:
                pid = conmon.read_pidfile(pid_file)
                if pid:
                    try:
                        os.kill(pid, signals.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except asyncio.TimeoutError:
                    os.killpg(proc.pid, signals.SIGKILL)
                    await proc.wait()
                out_task.cancel()
                err_task.cancel()
                raise DeadlineExceeded(f"command {cmd[0]!r} timed out after {timeout:g}s") from None
            stdout = await out_task
            stderr = await err_task
        finally:
            _unlink(process_file)
            _unlink(pid_file)
        return {"stdout": stdout, "stderr": stderr, "exit_code": proc.returncode}

    @method
    async def reopen_log(self, container_id: str) -> dict:
        """Have conmon reopen the log file after the kubelet rotated it."""
        rec = self._container(container_id, visible=True)
        await self._refresh(rec)
        if rec["state"] != "running":
            raise FailedPrecondition(f"container {container_id} is not running")
        conmon.reopen_log(rec["bundle"])
        if not await self._wait_file(rec["log_path"], 5.0):
            raise Internal(f"conmon did not reopen the log of {container_id}")
        return {}

    @method
    async def update_resources(self, container_id: str, linux: dict | None = None,
                               annotations: dict | None = None) -> dict:
        """Change the container's cgroup limits live (runc update)."""
        rec = self._container(container_id, visible=True)
        async with self._lock(rec["id"]):
            await self._refresh(rec)
            if rec["state"] not in ("created", "running"):
                raise FailedPrecondition(f"container {container_id} is not running")
            resources, _oom = spec.linux_resources(linux or {}, pids_limit=self.rc.pids_limit,
                                                   hugetlb=self.features.hugetlb)
            await self._runc(rec).update(rec["id"], resources)
            spec_path = os.path.join(rec["bundle"], "config.json")
            with open(spec_path) as f:
                current = json.load(f)
            devices = current["linux"].get("resources", {}).get("devices")
            current["linux"]["resources"] = {**resources, **({"devices": devices} if devices else {})}
            tmp = spec_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(current, f)
            os.replace(tmp, spec_path)
            rec["resources"] = dict(linux or {})
            await self._save_container(rec)
        return {}

    # -- stats, metrics, checkpoint, pod resources (stats.py, checkpoint.py, pod_resources.py) --

    def _stats_reader(self) -> stats.StatsReader:
        reader = getattr(self, "_stats", None)
        if reader is None:
            reader = self._stats = stats.StatsReader()
        return reader

    @method
    async def list_container_stats(self, filter: dict | None = None, container_id: str | None = None) -> list:
        """CRI ContainerStats (cgroup CPU, memory, swap) of one container, or of those matching `filter`."""
        if container_id is not None:
            rec = self._container(container_id, visible=True)
            return [stats.container_stats(self._stats_reader(), rec, self.sandboxes.get(rec["sandbox_id"]))]
        return stats.list_container_stats(self._stats_reader(), self.containers, self.sandboxes, filter or {})

    @method
    async def list_sandbox_stats(self, filter: dict | None = None, sandbox_id: str | None = None) -> list:
        """CRI PodSandboxStats without network counters (netd's), with each pod's netns path."""
        flt = dict(filter or {})
        if sandbox_id is not None:
            flt = {"id": self._sandbox(sandbox_id, visible=True)["id"]}
        return stats.list_sandbox_stats(self._stats_reader(), self.containers, self.sandboxes, flt)

    @method
    async def metric_samples(self, families: list | None = None) -> list:
        """Raw cgroup samples of every ready pod's running containers, for ListPodSandboxMetrics."""
        return stats.metric_samples(self._stats_reader(), self.containers, self.sandboxes,
                                    families if families is not None else sorted(stats.ALL_FAMILIES))

    @method
    async def checkpoint_container(self, container_id: str, location: str, upper_dir: str | None = None,
                                   timeout: float = 0) -> dict:
        """Checkpoint a running container with CRIU into the archive `location` (it keeps running)."""
        rec = self._container(container_id, visible=True)
        async with self._lock(rec["id"]):
            await self._refresh(rec)
            return await checkpoint.checkpoint(
                self._runc(rec), rec, location=location, upper_dir=upper_dir,
                work_root=os.path.join(self.run_dir, "checkpoints"),
                timeout=float(timeout) if timeout and timeout > 0 else checkpoint.DEFAULT_TIMEOUT)

    @method
    async def update_sandbox_resources(self, sandbox_id: str, resources: dict | None = None,
                                       overhead: dict | None = None) -> dict:
        """Apply pod-level limits to the pod's own cgroup (cgroupfs driver)."""
        rec = self._sandbox(sandbox_id, visible=True)
        async with self._lock(rec["id"]):
            if rec["state"] != "ready":
                raise FailedPrecondition(f"pod sandbox {sandbox_id} is not ready")
            if self.systemd:
                raise FailedPrecondition("pod cgroups of the systemd cgroup driver are managed by systemd")
            path = stats.pod_cgroup_path(rec, self.sandboxes)
            if path is None:
                raise FailedPrecondition(f"pod sandbox {sandbox_id} has no cgroup of its own "
                                         f"(cgroup parent {rec.get('cgroup_parent')!r} is shared)")
            written = await asyncio.to_thread(pod_resources.apply, path, resources or {})
            rec["pod_resources"] = {"resources": resources or {}, "overhead": overhead or {}}
            await self._save_sandbox(rec)
        return {"cgroup": path, "written": written}

    # -- streaming exec/attach sessions (exec_session.py) -------------------

    async def _running_for_stream(self, container_id: str) -> dict[str, Any]:
        rec = self._container(container_id, visible=True)
        await self._refresh(rec)
        if rec["state"] != "running":
            raise FailedPrecondition(f"container {container_id} is not running")
        return rec

    @method
    async def exec_start(self, container_id: str, cmd: list, tty: bool = False, stdin: bool = False,
                         stdout: bool = True, stderr: bool = True) -> dict:
        """Start `cmd` in the running container for a streaming exec; {"session"}."""
        exec_session.check_streams(cmd, tty=tty, stdin=stdin, stdout=stdout, stderr=stderr)
        rec = await self._running_for_stream(container_id)
        return await exec_session.sessions_of(self).add(exec_session.ExecSession(
            self._runc(rec), rec["id"], rec["bundle"], list(cmd), tty=tty, stdin=stdin))

    @method
    async def attach_start(self, container_id: str, tty: bool = False, stdin: bool = False,
                           stdout: bool = True, stderr: bool = True) -> dict:
        """Connect to the running container's stdio through conmon; {"session"}."""
        exec_session.check_streams(None, tty=tty, stdin=stdin, stdout=stdout, stderr=stderr)
        rec = await self._running_for_stream(container_id)
        return await exec_session.sessions_of(self).add(exec_session.AttachSession(
            rec["id"], rec["bundle"], self.attach_dir, tty=bool(rec.get("tty")), stdin=stdin,
            stdin_once=bool(rec["config"].get("stdin_once"))))

    @method
    async def session_write(self, session: str, data: bytes, wait_seconds: float = 5.0) -> dict:
        return await exec_session.sessions_of(self).get(session).write(data, wait_seconds)

    @method
    async def session_read(self, session: str, max_bytes: int = 65536, wait_seconds: float = 5.0) -> dict:
        return await exec_session.sessions_of(self).get(session).read(max_bytes, wait_seconds)

    @method
    async def session_close_stdin(self, session: str) -> dict:
        await exec_session.sessions_of(self).get(session).close_stdin()
        return {}

    @method
    async def session_resize(self, session: str, width: int, height: int) -> dict:
        await exec_session.sessions_of(self).get(session).resize(width, height)
        return {}

    @method
    async def session_close(self, session: str) -> dict:
        await exec_session.sessions_of(self).close(session)
        return {}


async def _read_limited(stream: asyncio.StreamReader | None, limit: int = EXEC_OUTPUT_LIMIT) -> bytes:
    """Read a stream to its end, keeping at most `limit` bytes."""
    if stream is None:
        return b""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            break
        if size < limit:
            chunks.append(chunk[: limit - size])
            size += len(chunks[-1])
    return b"".join(chunks)


def _unlink(path: str) -> None:
    try:
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
    except FileNotFoundError:
        pass


def _unmount_quiet(path: str) -> None:
    try:
        unmount(path)
    except OSError as e:
        log.warning("unmount_failed", path=path, error=str(e))


def _rmtree_same_fs(path: str) -> None:
    """Remove a directory tree, never descending into something still mounted."""
    if not os.path.isdir(path):
        return
    mounted = {m.mount_point for m in mountinfo.current()}
    prefix = os.path.realpath(path)
    for mp in sorted((m for m in mounted if m == prefix or m.startswith(prefix + "/")), key=len, reverse=True):
        try:
            unmount(mp)
        except OSError as e:
            log.warning("unmount_failed", path=mp, error=str(e))
    shutil.rmtree(path, ignore_errors=True)
