"""At start: a pod network whose record was lost is given one again, so that its DEL still runs.

A record found torn or garbage (records.py moved it to quarantine) leaves the
pod's namespace pin and its CNI result cache entry, which holds the
configuration list, CNI_ARGS, capability arguments and result that ADD used:
from it the record is made again, `attached` while the namespace is pinned
(the pod keeps its network; its detach runs DEL as for any pod), `detaching`
when the pin is gone (start-up finishes the teardown, releasing the address
and whatever the plugins made outside the namespace). A pin with neither a
record nor a readable cache entry gets a record with the network configured
now and no addresses: its DEL then runs as libcni runs one without a cache.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from services.netd import cni_result, netns
from services.netd.cni_cache import CachedAttachment
from services.netd.cni_config import NetworkList
from services.netd.records import ATTACHED, DETACHING, PodRecord

log = structlog.get_logger(__name__)


def from_cache(entry: CachedAttachment, netns_dir: Path) -> PodRecord:
    """The record of an attachment whose cache entry survived its record."""
    path = netns.pin_path(netns_dir, entry.container_id)
    args = {pair[0]: pair[1] for pair in entry.cni_args if isinstance(pair, list) and len(pair) == 2}
    record = PodRecord(
        pod_id=entry.container_id, state=ATTACHED if netns.is_pinned(path) else DETACHING, netns_path=str(path),
        network_name=entry.network_name, config=entry.config, ifname=entry.ifname,
        cni_args=[list(pair) for pair in entry.cni_args], capability_args=entry.capability_args,
        pod_name=args.get("K8S_POD_NAME", ""), pod_namespace=args.get("K8S_POD_NAMESPACE", ""),
        pod_uid=args.get("K8S_POD_UID", ""), ips=cni_result.pod_ips(entry.result),
        interfaces=cni_result.interfaces(entry.result))
    log.warning("pod_network_record_rebuilt", pod_id=record.pod_id, state=record.state, source="cni cache",
                network=record.network_name, ips=record.ips)
    return record


def from_pin(pin: Path, network: NetworkList, ifname: str) -> PodRecord:
    """The record of a pinned namespace nothing else is known of, on the network configured now."""
    pod_id = pin.name.removeprefix(netns.PIN_PREFIX)
    record = PodRecord(pod_id=pod_id, state=ATTACHED, netns_path=str(pin), network_name=network.name,
                       config=network.raw, ifname=ifname, capability_args={},
                       cni_args=[["IgnoreUnknown", "1"], ["K8S_POD_INFRA_CONTAINER_ID", pod_id]])
    log.warning("pod_network_record_rebuilt", pod_id=pod_id, state=record.state, source="namespace pin",
                network=network.name)
    return record
