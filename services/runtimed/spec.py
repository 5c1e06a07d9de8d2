"""The OCI runtime spec of a container, and of a pod's infra process, built from plain dicts.

Inputs are the CRI `ContainerConfig` as `MessageToDict(..., preserving_proto_field_name=True)`
gives it (see spec_values.py), the image config from imaged and facts about the
pod sandbox. The parts with rules of their own are built by spec_resources.py,
spec_mounts.py and spec_security.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from services.runtimed import cgroups, users
from services.runtimed.paths import clean_absolute, resolve_in_root
from services.runtimed.spec_mounts import check_recursive_read_only, devices, host_devices, user_mounts
from services.runtimed.spec_resources import linux_resources
from services.runtimed.spec_rlimits import process_rlimits
from services.runtimed.spec_security import (apparmor_enabled, apparmor_profile, capabilities, runtime_capabilities,
                                             seccomp_profile, unique_paths)
from services.runtimed.spec_values import i64, ns_mode, wrapped_int
from shared.config import RuntimeConfig
from shared.errors import InvalidArgument

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Masked and read-only paths of the pod's infra process; a container's come from the CRI.
DEFAULT_MASKED_PATHS = [
    "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
    "/sys/devices/virtual/powercap",
]
DEFAULT_READONLY_PATHS = [
    "/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
]


@dataclass
class SandboxFacts:
    """What a container's spec needs to know about its pod."""

    id: str
    cgroup_parent: str
    hostname: str = ""
    netns_path: str | None = None
    network_mode: str = "POD"          # POD: pod netns; NODE: host network
    ipc_mode: str = "POD"
    ipc_ns_path: str | None = None
    uts_ns_path: str | None = None
    pid_ns_path: str | None = None     # the infra process's pid ns when the pod shares one
    hosts_path: str | None = None
    resolv_path: str | None = None
    hostname_path: str | None = None
    shm_path: str | None = None
    privileged: bool = False


@dataclass
class Built:
    spec: dict[str, Any]
    user: users.User
    stop_signal: str | None
    privileged: bool
    resources: dict[str, Any]
    mounts: list[dict[str, Any]] = field(default_factory=list)


def check_request(config: dict[str, Any], *, rro: bool = False, rro_reason: str = "") -> None:
    """What can be refused from the container's config alone, before anything is reserved or made."""
    sc = (config.get("linux") or {}).get("security_context") or {}
    users.check_run_as_group(sc)
    users.supplemental_groups_policy(sc.get("supplemental_groups_policy"))
    for i, m in enumerate(config.get("mounts") or []):
        check_recursive_read_only(i, m, rro, rro_reason)


def _env_merge(*sources: list[str]) -> list[str]:
    keys: dict[str, int] = {}
    env: list[str] = []
    for source in sources:
        for item in source:
            key = item.split("=", 1)[0]
            if key in keys:
                env[keys[key]] = item
            else:
                keys[key] = len(env)
                env.append(item)
    return env


def process_args(config: dict[str, Any], image: dict[str, Any]) -> list[str]:
    """Kubernetes' rule: command replaces ENTRYPOINT (and drops CMD); args replace CMD."""
    command = list(config.get("command") or [])
    args = list(config.get("args") or [])
    entrypoint = list(image.get("entrypoint") or [])
    cmd = list(image.get("cmd") or [])
    if command:
        result = command + args
    elif args:
        result = entrypoint + args
    else:
        result = entrypoint + cmd
    if not result:
        raise InvalidArgument("no command specified: the container config and the image give none")
    return result


def build(*, container_id: str, config: dict[str, Any], image: dict[str, Any], rootfs: str,
          sandbox: SandboxFacts, rc: RuntimeConfig, systemd_cgroup: bool = False,
          target_pid_ns: str | None = None, pids_limit: int = 0, privileged_host_devices: bool = True,
          available_caps: frozenset[str] | None = None, hugetlb: bool = True, rro: bool = False,
          rro_reason: str = "not known to be supported") -> Built:
    """The OCI spec of one container.

    `hugetlb`: whether hugepage limits can be applied here; `rro`: whether the
    runtime handler can make mounts read-only recursively (`rro_reason` says why not).
    """
    if not os.path.isdir(rootfs):
        raise InvalidArgument(f"rootfs {rootfs} is not a directory")
    check_request(config, rro=rro, rro_reason=rro_reason)
    available = available_caps if available_caps is not None else runtime_capabilities()
    linux_cfg = config.get("linux") or {}
    sc = linux_cfg.get("security_context") or {}
    privileged = bool(sc.get("privileged"))
    if privileged and not sandbox.privileged:
        raise InvalidArgument("a privileged container needs a privileged pod sandbox")

    user = users.resolve(
        rootfs, image_user=image.get("user") or "",
        run_as_user=wrapped_int(sc.get("run_as_user"), "run_as_user"),
        run_as_username=sc.get("run_as_username") or "",
        run_as_group=wrapped_int(sc.get("run_as_group"), "run_as_group"),
        supplemental_groups=[i64(g, "supplemental_groups") for g in sc.get("supplemental_groups") or []],
        groups_policy=users.supplemental_groups_policy(sc.get("supplemental_groups_policy")))
    args = process_args(config, image)
    envs = []
    for e in config.get("envs") or []:
        key = e.get("key", "")
        if not key or "=" in key or "\0" in key:
            raise InvalidArgument(f"invalid environment variable name {key!r}")
        envs.append(f"{key}={e.get('value', '')}")
    image_env = list(image.get("env") or [])
    base = [] if any(v.startswith("PATH=") for v in image_env + envs) else [f"PATH={DEFAULT_PATH}"]
    extra = []
    if config.get("tty"):
        extra.append("TERM=xterm")
    if sandbox.hostname:
        extra.append(f"HOSTNAME={sandbox.hostname}")
    env = _env_merge(base, extra, list(rc.default_env), image_env, envs)
    if not any(v.startswith("HOME=") for v in env):
        env.append(f"HOME={user.home}")

    cwd = config.get("working_dir") or image.get("working_dir") or "/"
    cwd = clean_absolute(cwd, "working_dir")
    host_cwd = resolve_in_root(rootfs, cwd)
    if not os.path.isdir(host_cwd):
        try:
            os.makedirs(host_cwd, 0o755, exist_ok=True)
        except OSError as e:
            raise InvalidArgument(f"cannot create working directory {cwd}: {e.strerror}") from None

    caps, ambient = capabilities(sc, rc.default_capabilities, available, privileged)
    resources, oom = linux_resources(linux_cfg.get("resources"), pids_limit=pids_limit, available=available,
                                     hugetlb=hugetlb)

    proc: dict[str, Any] = {
        "terminal": bool(config.get("tty")),
        "user": {"uid": user.uid, "gid": user.gid, **({"additionalGids": user.additional_gids} if user.additional_gids else {})},
        "args": args,
        "env": env,
        "cwd": cwd,
        # A non-root process keeps only its ambient capabilities (which need inheritable ones too);
        # the others stay in the bounding set for setuid programs.
        "capabilities": {"bounding": caps, "effective": caps if user.uid == 0 else ambient,
                         "permitted": caps if user.uid == 0 else ambient,
                         "inheritable": [] if user.uid == 0 else ambient, "ambient": ambient},
        "noNewPrivileges": bool(sc.get("no_new_privs")),
    }
    if oom is not None:
        proc["oomScoreAdj"] = oom
    if rc.default_ulimits:
        proc["rlimits"] = process_rlimits(rc.default_ulimits, available)

    # Namespaces.
    ns_opts = sc.get("namespace_options") or {}
    namespaces: list[dict[str, str]] = [{"type": "mount"}]
    net_mode = sandbox.network_mode
    if net_mode != "NODE":
        namespaces.append({"type": "network", "path": sandbox.netns_path} if sandbox.netns_path else {"type": "network"})
    ipc_mode = ns_mode(ns_opts, "ipc")
    if ipc_mode == "POD" and sandbox.ipc_mode == "NODE":
        ipc_mode = "NODE"
    if ipc_mode == "POD":
        namespaces.append({"type": "ipc", "path": sandbox.ipc_ns_path} if sandbox.ipc_ns_path else {"type": "ipc"})
    elif ipc_mode == "CONTAINER":
        namespaces.append({"type": "ipc"})
    if net_mode != "NODE":
        namespaces.append({"type": "uts", "path": sandbox.uts_ns_path} if sandbox.uts_ns_path else {"type": "uts"})
    pid_mode = ns_mode(ns_opts, "pid")
    if pid_mode == "POD":
        namespaces.append({"type": "pid", "path": sandbox.pid_ns_path} if sandbox.pid_ns_path else {"type": "pid"})
    elif pid_mode == "CONTAINER":
        namespaces.append({"type": "pid"})
    elif pid_mode == "TARGET":
        if not target_pid_ns:
            raise InvalidArgument("pid namespace TARGET needs a running target container")
        namespaces.append({"type": "pid", "path": target_pid_ns})
    if cgroups.is_v2():
        namespaces.append({"type": "cgroup"})

    # Mounts: defaults, then the pod's files, then the request's; a later one replaces an earlier one.
    readonly_rootfs = bool(sc.get("readonly_rootfs"))
    sys_opts = ["nosuid", "noexec", "nodev"] + ([] if privileged else ["ro"])
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sys_opts},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime"] + ([] if privileged else ["ro"])},
    ]
    if ipc_mode == "NODE":
        mounts.append({"destination": "/dev/shm", "type": "bind", "source": "/dev/shm", "options": ["rbind", "rprivate"]})
    elif ipc_mode == "POD" and sandbox.shm_path:
        mounts.append({"destination": "/dev/shm", "type": "bind", "source": sandbox.shm_path, "options": ["rbind", "rprivate"]})
    else:
        mounts.append({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                       "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]})
    pod_file_opts = ["rbind", "rprivate"] + (["ro"] if readonly_rootfs else [])
    for dest, source in (("/etc/hosts", sandbox.hosts_path), ("/etc/resolv.conf", sandbox.resolv_path),
                         ("/etc/hostname", sandbox.hostname_path)):
        if source:
            mounts.append({"destination": dest, "type": "bind", "source": source, "options": list(pod_file_opts)})
    requested, rootfs_propagation, mount_records = user_mounts(config)
    user_dests = {m["destination"] for m in requested}
    mounts = [m for m in mounts if m["destination"] not in user_dests] + requested

    dev_nodes, dev_rules = devices(config)
    if privileged:
        if privileged_host_devices:
            known = {n["path"] for n in dev_nodes}
            dev_nodes += [n for n in host_devices() if n["path"] not in known]
        dev_rules = [{"allow": True, "access": "rwm"}]
    else:
        dev_rules = [{"allow": False, "access": "rwm"}] + dev_rules
    resources["devices"] = dev_rules

    if systemd_cgroup:
        cgroups_path = cgroups.systemd_path(sandbox.cgroup_parent, "crio", container_id)
    else:
        cgroups_path = f"{sandbox.cgroup_parent.rstrip('/')}/crio-{container_id}"

    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "resources": resources,
        "cgroupsPath": cgroups_path,
        "devices": dev_nodes,
    }
    if rootfs_propagation:
        linux["rootfsPropagation"] = rootfs_propagation
    if not privileged:
        # As CRI-O: the lists as the CRI gives them, no defaults of ours. The kubelet sends its
        # defaults for procMount Default and nothing for Unmasked (proto3 cannot tell empty from absent).
        linux["maskedPaths"] = unique_paths(sc.get("masked_paths") or [])
        linux["readonlyPaths"] = unique_paths(sc.get("readonly_paths") or [])
        profile, _label = seccomp_profile(sc, set(caps), rc)
        if profile is not None:
            linux["seccomp"] = profile
        if apparmor_enabled():
            proc["apparmorProfile"] = apparmor_profile(sc, rc)

    annotations = {str(k): str(v) for k, v in (config.get("annotations") or {}).items()}
    annotations.update({
        "io.kubernetes.cri-o.ContainerType": "container",
        "io.kubernetes.cri-o.SandboxID": sandbox.id,
        "io.kubernetes.cri-o.ContainerID": container_id,
    })
    spec = {
        "ociVersion": "1.0.2-dev",
        "process": proc,
        "root": {"path": os.path.realpath(rootfs), "readonly": readonly_rootfs},
        "mounts": mounts,
        "annotations": annotations,
        "linux": linux,
    }
    return Built(spec=spec, user=user, stop_signal=image.get("stop_signal") or None,
                 privileged=privileged, resources=resources, mounts=mount_records)


def infra_spec(*, sandbox_id: str, rootfs: str, command: str, sandbox: SandboxFacts,
               systemd_cgroup: bool = False) -> dict[str, Any]:
    """The spec of a pod's infra process: the init of the pod's shared PID namespace."""
    namespaces = [{"type": "mount"}, {"type": "pid"}]
    if sandbox.network_mode != "NODE":
        namespaces.append({"type": "network", "path": sandbox.netns_path} if sandbox.netns_path else {"type": "network"})
        namespaces.append({"type": "uts", "path": sandbox.uts_ns_path} if sandbox.uts_ns_path else {"type": "uts"})
    if sandbox.ipc_mode != "NODE" and sandbox.ipc_ns_path:
        namespaces.append({"type": "ipc", "path": sandbox.ipc_ns_path})
    if systemd_cgroup:
        cgroups_path = cgroups.systemd_path(sandbox.cgroup_parent, "crio", sandbox_id)
    else:
        cgroups_path = f"{sandbox.cgroup_parent.rstrip('/')}/crio-{sandbox_id}"
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False, "user": {"uid": 65535, "gid": 65535},
            "args": [command, "-P"], "env": [f"PATH={DEFAULT_PATH}"], "cwd": "/",
            "capabilities": {k: [] for k in ("bounding", "effective", "permitted", "inheritable", "ambient")},
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": True},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        ],
        "annotations": {"io.kubernetes.cri-o.ContainerType": "sandbox", "io.kubernetes.cri-o.SandboxID": sandbox_id},
        "linux": {
            "namespaces": namespaces,
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "cgroupsPath": cgroups_path,
            "maskedPaths": list(DEFAULT_MASKED_PATHS),
            "readonlyPaths": list(DEFAULT_READONLY_PATHS),
        },
    }
