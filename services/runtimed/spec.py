"""The OCI runtime spec of a container, built from plain dicts.

Inputs are the CRI `ContainerConfig` as `MessageToDict(..., preserving_proto_field_name=True)`
gives it (int64 values may arrive as strings, enums as their names, defaults
left out), the image config from imaged and facts about the pod sandbox.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any

from services.runtimed import cgroups, seccomp, users
from services.runtimed.paths import clean_absolute, resolve_in_root
from shared import privileges
from shared.mountinfo import mount_of
from shared.config import RuntimeConfig
from shared.errors import InvalidArgument

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MIN_MEMORY_LIMIT = 12 * 1024 * 1024

# Masked and read-only paths of the pod's infra process; a container's come from the CRI.
DEFAULT_MASKED_PATHS = [
    "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
    "/sys/devices/virtual/powercap",
]
DEFAULT_READONLY_PATHS = [
    "/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
]

_PROPAGATION = {
    None: "rprivate", "PROPAGATION_PRIVATE": "rprivate", 0: "rprivate",
    "PROPAGATION_HOST_TO_CONTAINER": "rslave", 1: "rslave",
    "PROPAGATION_BIDIRECTIONAL": "rshared", 2: "rshared",
}
_NS_MODES = {None: "POD", 0: "POD", 1: "CONTAINER", 2: "NODE", 3: "TARGET",
             "POD": "POD", "CONTAINER": "CONTAINER", "NODE": "NODE", "TARGET": "TARGET"}


# ---------------------------------------------------------------------------
# small parsers for MessageToDict values


def i64(value: Any, what: str, default: int | None = None) -> int | None:
    """An int64 field: MessageToDict writes them as strings."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise InvalidArgument(f"{what} must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    raise InvalidArgument(f"{what} must be an integer, not {value!r:.40}")


def wrapped_int(value: Any, what: str) -> int | None:
    """An Int64Value wrapper: {"value": "1000"}; absent means unset."""
    if value is None:
        return None
    if isinstance(value, dict):
        return i64(value.get("value", 0), what, 0)
    return i64(value, what)


def ns_mode(options: dict[str, Any] | None, kind: str) -> str:
    value = (options or {}).get(kind)
    if value not in _NS_MODES:
        raise InvalidArgument(f"unknown namespace mode for {kind}: {value!r}")
    return _NS_MODES[value]


# ---------------------------------------------------------------------------


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


def runtime_capabilities() -> frozenset[str]:
    """Capabilities this process can hand on to a container."""
    return privileges.bounding_capabilities() & privileges.effective_capabilities()


def _cap_name(name: str) -> str:
    name = str(name).upper()
    return name if name.startswith("CAP_") else "CAP_" + name


def capabilities(sc: dict[str, Any], default: list[str], available: frozenset[str],
                 privileged: bool) -> tuple[list[str], list[str]]:
    """(bounding/effective/permitted, ambient) capability names."""
    if privileged:
        return sorted(available), []
    caps_cfg = sc.get("capabilities") or {}
    add = [_cap_name(c) for c in caps_cfg.get("add_capabilities") or []]
    drop = [_cap_name(c) for c in caps_cfg.get("drop_capabilities") or []]
    ambient = [_cap_name(c) for c in caps_cfg.get("add_ambient_capabilities") or []]
    for name in add + drop + ambient:
        if name != "CAP_ALL" and name not in privileges.CAPABILITY_NUMBERS:
            raise InvalidArgument(f"unknown capability {name}")
    caps = {_cap_name(c) for c in default}
    if "CAP_ALL" in drop:
        caps = set()
    else:
        caps -= set(drop)
    if "CAP_ALL" in add:
        caps |= set(privileges.CAPABILITY_NAMES)
    else:
        caps |= set(add) | set(ambient)
    caps &= available
    return sorted(caps), sorted(set(ambient) & caps)


def _cpuset(value: str, what: str) -> str:
    if value and not re.fullmatch(r"\s*\d+(-\d+)?(\s*,\s*\d+(-\d+)?)*\s*", value):
        raise InvalidArgument(f"{what} is not a cpu/node list: {value!r}")
    return value.replace(" ", "")


def _own_oom_score_adj() -> int:
    try:
        with open("/proc/self/oom_score_adj") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def swap_accounting() -> bool:
    if cgroups.is_v2():
        return True
    directory = cgroups.controller_dir("/", "memory")
    return bool(directory) and os.path.exists(os.path.join(directory, "memory.memsw.limit_in_bytes"))


def linux_resources(res: dict[str, Any] | None, *, pids_limit: int = 0, available: frozenset[str] | None = None,
                    hugetlb: bool = True) -> tuple[dict[str, Any], int | None]:
    """The spec's linux.resources from CRI LinuxContainerResources, and the oom_score_adj.

    `hugetlb`: whether runc can set hugepage limits here; the kubelet sends them
    for every page size the node has, and where the controller is not usable
    they are checked, then left out, rather than failing every container.
    """
    res = res or {}
    out: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    shares = i64(res.get("cpu_shares"), "cpu_shares", 0)
    quota = i64(res.get("cpu_quota"), "cpu_quota", 0)
    period = i64(res.get("cpu_period"), "cpu_period", 0)
    if shares < 0 or period < 0:
        raise InvalidArgument("cpu_shares and cpu_period may not be negative")
    if quota < -1:
        raise InvalidArgument(f"cpu_quota may not be below -1: {quota}")
    if shares:
        cpu["shares"] = max(2, min(shares, 262144))
    if quota:
        cpu["quota"] = quota
    if period:
        if not 1000 <= period <= 1_000_000:
            raise InvalidArgument(f"cpu_period must be between 1000 and 1000000 microseconds: {period}")
        cpu["period"] = period
    if res.get("cpuset_cpus"):
        cpu["cpus"] = _cpuset(res["cpuset_cpus"], "cpuset_cpus")
    if res.get("cpuset_mems"):
        cpu["mems"] = _cpuset(res["cpuset_mems"], "cpuset_mems")
    if cpu:
        out["cpu"] = cpu
    memory: dict[str, Any] = {}
    limit = i64(res.get("memory_limit_in_bytes"), "memory_limit_in_bytes", 0)
    swap = i64(res.get("memory_swap_limit_in_bytes"), "memory_swap_limit_in_bytes", 0)
    if limit < 0 or swap < -1:
        raise InvalidArgument("memory limits may not be negative")
    if limit:
        if limit < MIN_MEMORY_LIMIT:
            raise InvalidArgument(f"memory limit {limit} is below the minimum of {MIN_MEMORY_LIMIT} bytes (12MiB)")
        memory["limit"] = limit
        if swap_accounting():
            if swap and swap != -1 and swap < limit:
                raise InvalidArgument(f"memory_swap_limit_in_bytes ({swap}) is below memory_limit_in_bytes ({limit})")
            memory["swap"] = swap or limit
    elif swap:
        raise InvalidArgument("memory_swap_limit_in_bytes needs memory_limit_in_bytes")
    if memory:
        out["memory"] = memory
    if pids_limit > 0:
        out["pids"] = {"limit": pids_limit}
    hugepages = []
    for i, hp in enumerate(res.get("hugepage_limits") or []):
        size = hp.get("page_size", "")
        if not re.fullmatch(r"\d+[KMG]B", size or ""):
            raise InvalidArgument(f"hugepage_limits[{i}].page_size is not like 2MB: {size!r}")
        hugepages.append({"pageSize": size, "limit": i64(hp.get("limit"), "hugepage limit", 0)})
    if hugepages and hugetlb:
        out["hugepageLimits"] = hugepages
    unified = res.get("unified") or {}
    if unified:
        for key, value in unified.items():
            if "/" in key or "." not in key or not isinstance(value, str):
                raise InvalidArgument(f"invalid unified cgroup key {key!r}")
        if cgroups.is_v2():
            out["unified"] = dict(unified)
    oom = i64(res.get("oom_score_adj"), "oom_score_adj", None)
    if oom is not None:
        if not -1000 <= oom <= 1000:
            raise InvalidArgument(f"oom_score_adj must be between -1000 and 1000: {oom}")
        caps = available if available is not None else runtime_capabilities()
        if "CAP_SYS_RESOURCE" not in caps:
            # Without CAP_SYS_RESOURCE the kernel refuses to lower it below our own.
            oom = max(oom, _own_oom_score_adj())
    return out, oom


def _check_recursive_read_only(i: int, m: dict[str, Any], rro: bool, rro_reason: str) -> None:
    """The CRI's rules for a recursive read-only mount: read-only, private, and a runtime that can."""
    if not m.get("recursive_read_only"):
        return
    what = f"mounts[{i}] ({m.get('host_path', '')})"
    if not m.get("readonly"):
        raise InvalidArgument(f"{what}: recursive_read_only needs readonly")
    if _PROPAGATION.get(m.get("propagation"), "") != "rprivate":
        raise InvalidArgument(f"{what}: recursive_read_only needs propagation PROPAGATION_PRIVATE, "
                              f"not {m.get('propagation')}")
    if not rro:
        raise InvalidArgument(f"{what}: recursive read-only mounts are not supported by the runtime handler: "
                              f"{rro_reason}")


def check_request(config: dict[str, Any], *, rro: bool = False, rro_reason: str = "") -> None:
    """What can be refused from the container's config alone, before anything is reserved or made."""
    sc = (config.get("linux") or {}).get("security_context") or {}
    users.check_run_as_group(sc)
    users.supplemental_groups_policy(sc.get("supplemental_groups_policy"))
    for i, m in enumerate(config.get("mounts") or []):
        _check_recursive_read_only(i, m, rro, rro_reason)


def _user_mounts(config: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None, list[dict[str, Any]]]:
    """Bind mounts from CRI mounts; the rootfs propagation they need; their status records.

    The recursive read-only rules were applied by check_request.
    """
    out: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    rootfs_propagation: str | None = None
    for i, m in enumerate(config.get("mounts") or []):
        dest = clean_absolute(m.get("container_path", ""), f"mounts[{i}].container_path")
        host = m.get("host_path", "")
        if not host or not host.startswith("/"):
            raise InvalidArgument(f"mounts[{i}].host_path must be an absolute path: {host!r}")
        if not os.path.exists(host):
            raise InvalidArgument(f"mounts[{i}]: host path {host} does not exist")
        source = os.path.realpath(host)
        propagation = _PROPAGATION.get(m.get("propagation"))
        if propagation is None:
            raise InvalidArgument(f"mounts[{i}]: unknown propagation {m.get('propagation')!r}")
        if propagation != "rprivate":
            info = mount_of(source)
            if propagation == "rshared" and not (info and info.shared):
                raise InvalidArgument(f"mounts[{i}]: {host} is not on a shared mount, needed for bidirectional propagation")
            if propagation == "rslave" and not (info and (info.shared or info.slave)):
                raise InvalidArgument(f"mounts[{i}]: {host} is not on a shared or slave mount, needed for host-to-container propagation")
            if propagation == "rshared" or rootfs_propagation is None:
                rootfs_propagation = "rshared" if propagation == "rshared" else "rslave"
        readonly = bool(m.get("readonly"))
        recursive = bool(m.get("recursive_read_only"))
        # As CRI-O: runc's `rro` makes the whole tree read-only, submounts included; `ro` only the top.
        options = ["rbind", propagation] + (["rro"] if recursive else ["ro"] if readonly else [])
        out.append({"destination": dest, "type": "bind", "source": source, "options": options})
        records.append({"container_path": dest, "host_path": host, "readonly": readonly,
                        "recursive_read_only": recursive,
                        "propagation": m.get("propagation") or "PROPAGATION_PRIVATE"})
    return out, rootfs_propagation, records


def _device_entries(host: str, container: str, permissions: str) -> list[tuple[dict, dict]]:
    st = os.stat(host)
    if stat.S_ISDIR(st.st_mode):
        entries = []
        for root, _dirs, files in os.walk(host):
            for name in files:
                path = os.path.join(root, name)
                rel = os.path.relpath(path, host)
                try:
                    entries += _device_entries(path, os.path.join(container, rel), permissions)
                except InvalidArgument:
                    continue
        return entries
    if stat.S_ISCHR(st.st_mode):
        kind = "c"
    elif stat.S_ISBLK(st.st_mode):
        kind = "b"
    else:
        raise InvalidArgument(f"{host} is not a device")
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    node = {"path": container, "type": kind, "major": major, "minor": minor,
            "fileMode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
    rule = {"allow": True, "type": kind, "major": major, "minor": minor, "access": permissions}
    return [(node, rule)]


def devices(config: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    nodes, rules = [], []
    for i, d in enumerate(config.get("devices") or []):
        host = d.get("host_path", "")
        container = clean_absolute(d.get("container_path") or host, f"devices[{i}].container_path")
        permissions = d.get("permissions") or "rwm"
        if not re.fullmatch(r"[rwm]{1,3}", permissions):
            raise InvalidArgument(f"devices[{i}].permissions must be made of r, w and m: {permissions!r}")
        if not host.startswith("/") or not os.path.exists(host):
            raise InvalidArgument(f"devices[{i}]: host device {host!r} does not exist")
        for node, rule in _device_entries(host, container, permissions):
            nodes.append(node)
            rules.append(rule)
    return nodes, rules


def host_devices() -> list[dict]:
    """Every device node of the host, for privileged containers."""
    nodes = []
    for root, dirs, files in os.walk("/dev"):
        dirs[:] = [d for d in dirs if d not in ("pts", "shm", "mqueue")]
        for name in files:
            path = os.path.join(root, name)
            try:
                for node, _rule in _device_entries(path, path, "rwm"):
                    if path in ("/dev/console", "/dev/ptmx", "/dev/tty") or path.startswith("/dev/tty"):
                        continue
                    nodes.append(node)
            except (OSError, InvalidArgument):
                continue
    return nodes


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


def apparmor_enabled() -> bool:
    try:
        with open("/sys/module/apparmor/parameters/enabled") as f:
            return f.read().strip() == "Y"
    except OSError:
        return False


def seccomp_profile(sc: dict[str, Any], caps: set[str], rc: RuntimeConfig) -> tuple[dict | None, str]:
    """The seccomp section for the bounding set `caps`, and where it came from.

    As CRI-O: no profile at all runs unconfined; RuntimeDefault is crio.conf's
    seccomp_profile or the built-in profile. Without the `seccomp` field, the
    deprecated seccomp_profile_path is read the way CRI-O read it before it was
    dropped: "", "unconfined", "runtime/default", "docker/default", "localhost/<path>".
    """
    prof = sc.get("seccomp")
    if prof is not None:
        kind = prof.get("profile_type", "RuntimeDefault")
        kind = {0: "RuntimeDefault", 1: "Unconfined", 2: "Localhost"}.get(kind, kind)
        if kind == "Unconfined":
            return None, "unconfined"
        if kind == "Localhost":
            ref = prof.get("localhost_ref", "")
            return seccomp.load_profile(ref, caps), "localhost/" + ref
        if kind != "RuntimeDefault":
            raise InvalidArgument(f"unknown seccomp profile type {kind!r}")
    else:
        path = sc.get("seccomp_profile_path", "")
        if path in ("", "unconfined"):
            return None, "unconfined"
        if path.startswith("localhost/"):
            ref = path[len("localhost/"):]
            return seccomp.load_profile(ref, caps), path
        if path not in ("runtime/default", "docker/default"):
            raise InvalidArgument(f"unknown seccomp profile path {path!r}")
    if rc.seccomp_profile:
        return seccomp.load_profile(rc.seccomp_profile, caps), "runtime/default"
    return seccomp.default_profile(caps), "runtime/default"


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
    user_mounts, rootfs_propagation, mount_records = _user_mounts(config)
    user_dests = {m["destination"] for m in user_mounts}
    mounts = [m for m in mounts if m["destination"] not in user_dests] + user_mounts

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
        linux["maskedPaths"] = _unique_paths(sc.get("masked_paths") or [])
        linux["readonlyPaths"] = _unique_paths(sc.get("readonly_paths") or [])
        profile, _label = seccomp_profile(sc, set(caps), rc)
        if profile is not None:
            linux["seccomp"] = profile
        if apparmor_enabled():
            proc["apparmorProfile"] = _apparmor(sc, rc)

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


def _unique_paths(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        p = clean_absolute(p, "masked or read-only path")
        if p not in out:
            out.append(p)
    return out


def _apparmor(sc: dict[str, Any], rc: RuntimeConfig) -> str:
    prof = sc.get("apparmor")
    if prof:
        kind = prof.get("profile_type", "RuntimeDefault")
        if kind == "Unconfined":
            return "unconfined"
        if kind == "Localhost":
            return prof.get("localhost_ref", "")
        return rc.apparmor_profile
    name = sc.get("apparmor_profile", "")
    if name == "unconfined":
        return "unconfined"
    if name.startswith("localhost/"):
        return name[len("localhost/"):]
    return rc.apparmor_profile


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
