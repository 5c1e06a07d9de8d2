"""crio-py with a real bridge network for pod tests, and a cleanup that leaves nothing behind."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cri_api.v1 import api_pb2

from shared import mountinfo
from tests.support import images
from tests.support.registry import Registry, launch_registry
from tests.support.stack import Dirs, Stack, remove_dirs, short_tempdir, start_stack


@contextmanager
def busybox_registry(workdir: Path, repo: str, **image_options: object) -> Iterator[tuple[Registry, str]]:
    """A docker-registry on loopback holding a busybox image; yields it and the image's reference."""
    registry = launch_registry(workdir)
    try:
        images.push_busybox_image(registry, repo, "latest", **image_options)  # type: ignore[arg-type]
        yield registry, f"{registry.host}/{repo}:latest"
    finally:
        registry.stop()


def conmon_pids(base: Path) -> list[int]:
    """conmon processes started for containers under `base`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd[0].endswith(b"conmon") and any(str(base).encode() in a for a in cmd):
                pids.append(int(entry))
    return pids


def runc_ids(stack: Stack) -> set[str]:
    root = stack.dirs.root / "runtimed" / "runc"
    return set(os.listdir(root)) if root.is_dir() else set()


def leftover_mounts(stack: Stack) -> list[str]:
    """Mounts under the stack's directories, but for the netns directory (netd shares it once)."""
    base = str(stack.dirs.base) + "/"
    return [m.mount_point for m in mountinfo.current()
            if m.mount_point.startswith(base) and m.mount_point != str(stack.dirs.netns)]


def pod_network(stack: Stack) -> tuple[str, Path]:
    """The bridge of a `bridge_stack`'s pod network, and the directory of its IP leases."""
    conflist = json.loads((stack.dirs.cni / "10-pods.conflist").read_text())
    bridge = conflist["plugins"][0]
    return bridge["bridge"], Path(bridge["ipam"]["dataDir"]) / conflist["name"]


def leftovers(stack: Stack, cgroup_parent: str) -> dict[str, list[str]]:
    """What pods and containers leave on the machine, by kind; all empty when none is left."""
    bridge, lease_dir = pod_network(stack)
    links = subprocess.run(["ip", "-o", "link", "show", "master", bridge], capture_output=True, text=True).stdout
    root = stack.dirs.root
    return {
        "mounts": leftover_mounts(stack),
        "netns": sorted(p.name for p in stack.dirs.netns.iterdir()),
        "veths": sorted(line.split(":")[1].strip() for line in links.splitlines()),
        # host-local keeps one file per leased address (and `lock`, `last_reserved_ip.*`).
        "ip_leases": sorted(p.name for p in lease_dir.glob("*") if p.name[0].isdigit()) if lease_dir.is_dir() else [],
        "cgroups": sorted(str(d) for top in Path("/sys/fs/cgroup").glob(f"*{cgroup_parent}")
                          for d in [top, *top.rglob("*")] if d.is_dir()),
        "conmon": [str(p) for p in conmon_pids(stack.dirs.base)],
        "runc": sorted(runc_ids(stack)),
        "records": sorted(str(p.relative_to(root)) for pattern in (
            "runtimed/records/*/*.json", "netd/pods/*", "storaged/rootfs/*") for p in root.glob(pattern)),
    }


def new_leftovers(stack: Stack, cgroup_parent: str, before: dict[str, list[str]],
                  timeout: float = 30.0) -> dict[str, list[str]]:
    """What `leftovers` finds beyond `before`, once background clean-up had `timeout` to run; {} when none."""
    deadline = time.monotonic() + timeout
    while True:
        now = leftovers(stack, cgroup_parent)
        extra = {kind: sorted(set(items) - set(before[kind])) for kind, items in now.items()}
        extra = {kind: items for kind, items in extra.items() if items}
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.3)


def remove_pods(stack: Stack) -> None:
    for pod in stack.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=30).items:
        stack.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)


def _remove_cgroups(cgroup_parent: str) -> None:
    for top in Path("/sys/fs/cgroup").glob(f"*{cgroup_parent}"):
        for d in sorted(top.rglob("*"), key=lambda p: len(str(p)), reverse=True):
            if d.is_dir():
                os.rmdir(d)
        os.rmdir(top)


@contextmanager
def bridge_stack(prefix: str, cgroup_parent: str, *extra_flags: str,
                 registry: Registry | None = None, env: dict[str, str] | None = None) -> Iterator[Stack]:
    """All five services with a bridge CNI network of their own (a random bridge and subnet).

    On the way out every pod is removed through the CRI, then whatever a
    failed test left is cleaned by hand: conmon, runc containers, mounts, the
    bridge, the pod cgroups under `cgroup_parent`, the directories.
    """
    dirs = Dirs(short_tempdir(prefix)).make()
    bridge = f"{prefix.strip('-')[:6]}{secrets.token_hex(3)}"
    subnet = f"10.{100 + secrets.randbelow(100)}.{secrets.randbelow(250)}.0/24"
    (dirs.cni / "10-pods.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "criopy-pods",
        "plugins": [{"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                              "dataDir": str(dirs.base / "ipam")}},
                    {"type": "loopback"}]}))
    flags = list(extra_flags)
    if registry is not None:
        flags += ["--set", f"crio.image.insecure_registries={json.dumps([registry.host])}"]
    stack: Stack | None = None
    try:
        stack = start_stack(dirs, *flags, env=env)
        yield stack
    finally:
        try:
            if stack is not None:
                remove_pods(stack)
        finally:
            if stack is not None:
                stack.stop()
            for pid in conmon_pids(dirs.base):
                os.kill(pid, signal.SIGKILL)
            runc_root = dirs.root / "runtimed" / "runc"
            if runc_root.is_dir():
                for cid in os.listdir(runc_root):
                    subprocess.run(["runc", "--root", str(runc_root), "delete", "-f", cid], capture_output=True)
            subprocess.run(["ip", "link", "del", bridge], capture_output=True)
            _remove_cgroups(cgroup_parent)
            remove_dirs(dirs)
