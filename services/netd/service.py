"""netd: pod network namespaces and CNI plugin calls."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import structlog

from services.netd import cni_result, netns, orphans, pod_args, recovery
from services.netd import net_stats, pod_cidr
from services.netd import port_forward
from services.netd.cni_cache import CachedAttachment, ResultCache
from services.netd.cni_config import InvalidNetworkConfig, NetworkList, parse_network_list
from services.netd.cni_network import AddFailed, CniRunner, RuntimeConf
from services.netd.cni_watch import ConfigWatcher
from services.netd.records import ATTACHED, ATTACHING, DETACHING, PodRecord, RecordStore
from shared import faults
from shared.bus.api import NETD
from shared.bus.service import Service, method
from shared.config import Config
from shared.errors import CriopyError, FailedPrecondition, Internal, NotFound

log = structlog.get_logger(__name__)

IFNAME = "eth0"
# How often failed teardowns (left `detaching`) are retried in the background.
JANITOR_INTERVAL = 30.0

T = TypeVar("T")


class Netd(Service):
    api = NETD
    # Creating and pinning namespaces (SYS_ADMIN: unshare, mount; plugins setns
    # into the pod namespace), configuring links, addresses, routes and
    # iptables through the CNI plugins (NET_ADMIN, NET_RAW for iptables'
    # raw socket use).
    capabilities = frozenset({"CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_NET_RAW"})

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        net = config.crio.network
        self._netns_dir = Path(net.netns_dir)
        self._timeout = float(net.cni_timeout)
        state = config.state_dir("netd")
        self._records = RecordStore(state / "pods")
        self._cache = ResultCache(state / "cni-cache")
        self._watcher = ConfigWatcher(net.network_dir, list(net.plugin_dirs), net.cni_default_network)
        self._owner = str(state)
        self._runner = CniRunner(list(net.plugin_dirs), self._timeout, self._owner)
        self._pods: dict[str, PodRecord] = {}
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background: list[asyncio.Task[None]] = []
        # The first namespace also makes the pin directory a shared mount;
        # concurrent first creations would stack several.
        self._netns_dir_lock = asyncio.Lock()
        self._netns_dir_ready = False

    # -- life cycle -------------------------------------------------------

    async def start(self) -> None:
        self._watcher.current()
        for record in await asyncio.to_thread(self._records.load_all):
            self._pods[record.pod_id] = record
        await self._reconcile()
        self._background = [
            asyncio.create_task(self._watcher.run(), name="netd-cni-watch"),
            asyncio.create_task(self._janitor(), name="netd-janitor"),
        ]
        self.ready = True

    async def stop(self) -> None:
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._background = []
        # Attach/detach work is shielded from callers; let it finish.
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self._timeout * 2)
        self.ready = False

    def readiness(self) -> dict[str, Any]:
        scan = self._watcher.current()
        if scan.network is None:
            return {"network_ready": False, "network_reason": scan.reason, "network_message": scan.message}
        return {"network_ready": True, "network_reason": "", "network_message": ""}

    # -- bus API ------------------------------------------------------------

    @method
    async def attach(self, pod_id: str, pod_name: str, pod_namespace: str, pod_uid: str,
                     port_mappings: list[dict[str, Any]] | None = None,
                     bandwidth: dict[str, Any] | None = None) -> dict[str, Any]:
        """Create and pin the pod's network namespace and run CNI ADD; idempotent on pod_id.

        On failure everything done so far is undone and the error names the plugin.
        """
        path = netns.pin_path(self._netns_dir, pod_id)
        args = pod_args.cni_args(pod_id, pod_name, pod_namespace, pod_uid)
        caps: dict[str, Any] = {"portMappings": pod_args.port_mappings(port_mappings)}
        shaping = pod_args.bandwidth(bandwidth)
        if shaping:
            caps["bandwidth"] = shaping
        caps.update(pod_cidr.capability(self._pod_cidrs()))
        record = PodRecord(pod_id=pod_id, state=ATTACHING, netns_path=str(path), network_name="", config="",
                           ifname=IFNAME, cni_args=args, capability_args=caps, pod_name=pod_name,
                           pod_namespace=pod_namespace, pod_uid=pod_uid)
        return await self._shielded(pod_id, lambda: self._attach(record))

    @method
    async def detach(self, pod_id: str) -> dict[str, Any]:
        """CNI DEL with the cached configuration and result, then remove the namespace; idempotent."""
        netns.pin_path(self._netns_dir, pod_id)  # validates the id
        return await self._shielded(pod_id, lambda: self._detach(pod_id))

    @method
    async def pod_network(self, pod_id: str) -> dict[str, Any] | None:
        """{"netns_path", "ips", "interfaces", "network"} of an attached pod, None if none."""
        record = self._pods.get(pod_id)
        if record is None or record.state != ATTACHED:
            return None
        return self._describe(record)

    @method
    async def list_pod_networks(self) -> list[dict[str, Any]]:
        return [{"pod_id": r.pod_id, "state": r.state, **self._describe(r)} for r in self._pods.values()]

    @method
    async def check_pod_network(self, pod_id: str) -> dict[str, Any]:
        """CNI CHECK of an attached pod (spec 0.4.0 and later)."""
        record = self._pods.get(pod_id)
        if record is None or record.state != ATTACHED:
            raise NotFound(f"pod {pod_id!r:.80} has no network attachment")
        cached = await asyncio.to_thread(self._cache.load, record.network_name, pod_id, record.ifname)
        if cached is None:
            raise Internal(f"cached CNI result of pod {pod_id} is missing")
        if not netns.is_pinned(record.netns_path):
            raise FailedPrecondition(f"network namespace {record.netns_path} of pod {pod_id} is gone")
        await self._runner.check(self._network_of(record), self._runtime_conf(record), cached.result)
        return {"ok": True}

    # -- attach / detach ----------------------------------------------------

    async def _attach(self, record: PodRecord) -> dict[str, Any]:
        pod_id = record.pod_id
        existing = self._pods.get(pod_id)
        if existing is not None and existing.state == ATTACHED:
            return self._describe(existing)
        if existing is not None:
            await self._teardown(existing)  # leftover of an interrupted or failed attempt

        scan = self._watcher.current()
        if scan.network is None:
            raise FailedPrecondition(scan.message)
        network = scan.network
        await self._runner.check_versions(network)

        record.network_name = network.name
        record.config = network.raw
        await self._save(record)  # intent first: a crash from here on is rolled back at start
        rt = self._runtime_conf(record)
        try:
            await self._create_netns(Path(record.netns_path))
            faults.point("netd.attach.after_netns")
            result = await self._runner.add(network, rt)
            faults.point("netd.attach.after_cni_add")
            await asyncio.to_thread(self._cache.save, CachedAttachment(
                network_name=network.name, container_id=pod_id, ifname=record.ifname, config=network.raw,
                cni_args=record.cni_args, capability_args=record.capability_args, result=result))
        except BaseException as e:
            error = e.error if isinstance(e, AddFailed) else e
            partial = e.result if isinstance(e, AddFailed) else None
            await self._rollback(record, partial, error)
            if isinstance(error, CriopyError):
                raise error from None
            raise
        record.ips = cni_result.pod_ips(result)
        record.interfaces = cni_result.interfaces(result)
        record.state = ATTACHED
        await self._save(record)
        log.info("pod_network_attached", pod_id=pod_id, network=network.name, ips=record.ips,
                 netns=record.netns_path)
        return self._describe(record)

    async def _create_netns(self, path: Path) -> None:
        if self._netns_dir_ready:
            await netns.create(path, self._timeout, self._owner)
            return
        async with self._netns_dir_lock:
            await netns.create(path, self._timeout, self._owner)
            self._netns_dir_ready = True

    async def _rollback(self, record: PodRecord, partial: dict[str, Any] | None, error: BaseException) -> None:
        log.warning("pod_network_attach_failed", pod_id=record.pod_id, network=record.network_name,
                    error=getattr(error, "message", repr(error)))
        try:
            await self._teardown(record, prev_result=partial)
        except CriopyError as e:
            # The record stays `detaching`; the janitor and the next detach retry it.
            log.error("pod_network_rollback_failed", pod_id=record.pod_id, error=e.message)
            if isinstance(error, CriopyError):
                error.message = f"{error.message} (cleanup incomplete, will be retried: {e.message})"
                error.args = (error.message,)

    async def _detach(self, pod_id: str) -> dict[str, Any]:
        record = self._pods.get(pod_id)
        if record is None:
            # Nothing recorded: make sure no pin of ours is left behind either.
            await netns.remove(netns.pin_path(self._netns_dir, pod_id))
            return {"pod_id": pod_id, "detached": False}
        await self._teardown(record)
        log.info("pod_network_detached", pod_id=pod_id, network=record.network_name)
        return {"pod_id": pod_id, "detached": True}

    async def _teardown(self, record: PodRecord, prev_result: dict[str, Any] | None = None) -> None:
        """DEL, remove the namespace, forget the pod. Raises (record kept `detaching`) if DEL fails."""
        if record.state != DETACHING:
            record.state = DETACHING
            await self._save(record)
        if record.config:
            cached = await asyncio.to_thread(self._cache.load, record.network_name, record.pod_id, record.ifname)
            if cached is not None:
                prev_result = cached.result
            network = self._network_of(record)
            rt = self._runtime_conf(record)
            if not netns.is_pinned(record.netns_path):
                # Spec: DEL without a namespace still frees what lives outside it (IPAM, iptables).
                rt = RuntimeConf(rt.container_id, "", rt.ifname, rt.args, rt.capability_args)
            await self._runner.delete(network, rt, prev_result)
            faults.point("netd.detach.after_cni_del")
            await asyncio.to_thread(self._cache.remove, record.network_name, record.pod_id, record.ifname)
        await netns.remove(Path(record.netns_path))
        await asyncio.to_thread(self._records.remove, record.pod_id)
        self._pods.pop(record.pod_id, None)

    # -- start-up reconciliation and background work -----------------------

    async def _reconcile(self) -> None:
        # Calls still running from a killed predecessor would race the rollback.
        await orphans.wait_for_orphans(self._owner, self._timeout)
        await self._recover()
        for record in list(self._pods.values()):
            if record.state in (ATTACHING, DETACHING):
                log.info("pod_network_unfinished", pod_id=record.pod_id, state=record.state,
                         action="rollback" if record.state == ATTACHING else "finish teardown")
                try:
                    await self._teardown(record)
                except CriopyError as e:
                    log.error("pod_network_teardown_failed", pod_id=record.pod_id, error=e.message)
                except Exception as e:  # a record that makes no sense: netd starts all the same
                    log.exception("pod_network_teardown_failed", pod_id=record.pod_id, error=str(e))
            elif not netns.is_pinned(record.netns_path):
                log.warning("pod_netns_missing", pod_id=record.pod_id, netns=record.netns_path)

    async def _recover(self) -> None:
        """Records again for attachments whose record was lost, from the result cache or the pin (recovery.py)."""
        for entry in await asyncio.to_thread(self._cache.load_all):
            if entry.container_id not in self._pods:
                try:
                    await self._save(recovery.from_cache(entry, self._netns_dir))
                except Exception as e:  # netd starts all the same
                    log.exception("pod_network_record_rebuild_failed", pod_id=entry.container_id, error=str(e))
        known = {Path(r.netns_path) for r in self._pods.values()}
        network = self._watcher.current().network
        for pin in netns.list_pins(self._netns_dir):
            if pin in known:
                continue
            if network is not None and netns.is_pinned(pin):
                await self._save(recovery.from_pin(pin, network, IFNAME))
            else:
                log.info("orphan_netns_removed", netns=str(pin))
                await netns.remove(pin)

    async def _janitor(self) -> None:
        while True:
            await asyncio.sleep(JANITOR_INTERVAL)
            for record in list(self._pods.values()):
                if record.state != DETACHING or record.pod_id in self._locks:
                    continue
                try:
                    await self._shielded(record.pod_id, lambda r=record: self._teardown(r))
                    log.info("pod_network_teardown_retried", pod_id=record.pod_id)
                except CriopyError as e:
                    log.warning("pod_network_teardown_failed", pod_id=record.pod_id, error=e.message)

    # -- helpers --------------------------------------------------------------

    async def _shielded(self, pod_id: str, work: Callable[[], Awaitable[T]]) -> T:
        """Run `work` under the pod's lock, to completion even if the caller goes away."""

        async def locked() -> T:
            async with self._pod_lock(pod_id):
                return await work()

        task = asyncio.ensure_future(locked())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    @contextlib.asynccontextmanager
    async def _pod_lock(self, pod_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(pod_id, (asyncio.Lock(), 0))
        self._locks[pod_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[pod_id]
            if users <= 1:
                del self._locks[pod_id]
            else:
                self._locks[pod_id] = (lock, users - 1)

    async def _save(self, record: PodRecord) -> None:
        await asyncio.to_thread(self._records.save, record)
        self._pods[record.pod_id] = record

    def _network_of(self, record: PodRecord) -> NetworkList:
        try:
            return parse_network_list(json.loads(record.config), f"record of pod {record.pod_id}")
        except (ValueError, InvalidNetworkConfig) as e:
            raise Internal(f"recorded network configuration of pod {record.pod_id} is unreadable: {e}") from None

    @staticmethod
    def _runtime_conf(record: PodRecord) -> RuntimeConf:
        return RuntimeConf(container_id=record.pod_id, netns=record.netns_path, ifname=record.ifname,
                           args=tuple((k, v) for k, v in record.cni_args),
                           capability_args=record.capability_args)

    @staticmethod
    def _describe(record: PodRecord) -> dict[str, Any]:
        return {"netns_path": record.netns_path, "ips": list(record.ips),
                "interfaces": list(record.interfaces), "network": record.network_name}

    # -- network counters and the pod CIDR (net_stats.py, pod_cidr.py) ------------

    @method
    async def pod_network_stats(self, pod_ids: list[str] | None = None) -> dict[str, Any]:
        """Interface counters of attached pods' namespaces: {pod_id: usage} (see net_stats.pod_usage)."""
        wanted = None if pod_ids is None else set(pod_ids)
        records = [r for r in self._pods.values()
                   if r.state == ATTACHED and (wanted is None or r.pod_id in wanted)]
        counters = await net_stats.read_counters([r.netns_path for r in records], self._timeout)
        return {r.pod_id: net_stats.pod_usage(counters.get(r.netns_path) or {"error": "not read"}, r.ifname)
                for r in records}

    def _pod_cidr_file(self) -> Path:
        return Path(self.config.state_dir("netd")) / "pod-cidr.json"

    def _pod_cidrs(self) -> list[str]:
        cached = getattr(self, "_pod_cidr_networks", None)
        if cached is None:
            cached = self._pod_cidr_networks = pod_cidr.load(self._pod_cidr_file())
        return cached

    @method
    async def update_pod_cidr(self, cidr: str) -> dict[str, Any]:
        """Set the node's pod CIDR; pods attached from now on get it as the CNI `ipRanges` capability."""
        networks = pod_cidr.parse(cidr)
        if networks != self._pod_cidrs():
            await asyncio.to_thread(pod_cidr.save, self._pod_cidr_file(), networks)
            self._pod_cidr_networks = networks
            log.info("pod_cidr_updated", networks=networks)
        return {"networks": networks}

    # -- port forwarding (port_forward.py) ------------------------------------

    @method
    async def pf_open(self, pod_id: str, port: int, host_network: bool = False) -> dict[str, Any]:
        """Connect to `port` on the pod's loopback from inside its namespace; {"token"} of its stream."""
        netns_path = None
        if not host_network:
            record = self._pods.get(pod_id)
            if record is None or record.state != ATTACHED:
                raise NotFound(f"pod {pod_id} has no network namespace")
            netns_path = record.netns_path
        return await self.open_stream(port_forward.ForwardedConnection(netns_path, port))
