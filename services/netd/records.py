"""netd's journal of pod attachments: one JSON file per pod, written before acting.

A record is written as `attaching` before the namespace or any plugin is
touched, becomes `attached` when ADD succeeded, and `detaching` before
teardown starts; it is removed when teardown is complete. After a crash,
`attaching` and `detaching` records say exactly what to roll back or finish.
A record found torn or garbage at start is moved to netd's quarantine/
(recovery.py rebuilds it from the CNI result cache or the namespace pin).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from services.netd import statefiles
from shared import quarantine

log = structlog.get_logger(__name__)

ATTACHING = "attaching"
ATTACHED = "attached"
DETACHING = "detaching"
STATES = (ATTACHING, ATTACHED, DETACHING)


@dataclass
class PodRecord:
    pod_id: str
    state: str
    netns_path: str
    network_name: str
    config: str                           # the network list JSON used for ADD
    ifname: str
    cni_args: list[list[str]]
    capability_args: dict[str, Any]
    pod_name: str = ""
    pod_namespace: str = ""
    pod_uid: str = ""
    ips: list[str] = field(default_factory=list)
    interfaces: list[dict[str, str]] = field(default_factory=list)
    updated_at: float = 0.0


class RecordStore:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _path(self, pod_id: str) -> Path:
        return self.directory / f"{pod_id}.json"

    def save(self, record: PodRecord) -> None:
        record.updated_at = time.time()
        statefiles.write_json(self._path(record.pod_id), dataclasses.asdict(record))

    def remove(self, pod_id: str) -> None:
        statefiles.remove(self._path(pod_id))

    def load_all(self) -> list[PodRecord]:
        """Every readable record; the others are moved to quarantine (blocks)."""
        records = []
        try:
            paths = sorted(self.directory.glob("*.json"))
        except OSError:
            return []
        names = {f.name for f in dataclasses.fields(PodRecord)}
        for path in paths:
            try:
                data = statefiles.read_json(path)
                if not isinstance(data, dict) or data.get("state") not in STATES:
                    raise ValueError("not a pod record")
                record = PodRecord(**{k: v for k, v in data.items() if k in names})
                if record.pod_id != path.stem:
                    raise ValueError("not the record its file name says")
            except (OSError, ValueError, TypeError) as e:
                quarantine.set_aside(self.directory.parent, [path], kind="pod_network", name=path.stem,
                                     error=str(e) or type(e).__name__)
                continue
            records.append(record)
        return records
